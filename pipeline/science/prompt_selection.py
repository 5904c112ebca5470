"""Which annotation a follow-up is propagated from: the nearest one a person made or confirmed, never our own result.

Clinical rule (issue 14, LinGuinE "auto-regressive propagation"): every follow-up is segmented with prompts
propagated *directly* from the nearest timepoint whose lesions a person drew or confirmed (a radiologist's SEG, SR
measurements or points on the baseline today; a verified follow-up once verification exists), never from a chain
of our own results — a chain compounds every registration and segmentation error (measured: Dice 0.80 → 0.50 over
five follow-ups, docs/models.md). Our own SEG/SR may still serve as a consistency check, never as the only source.

Pure functions (no I/O apart from :func:`is_our_object` / :func:`content_key`, which read one DICOM header, and
:func:`our_instance_uids`, one database query):

* :func:`choose_prompt_source` — the service: from the prior annotations of one patient, pick the person's
  annotation nearest in time before the follow-up (SEG over SR at one timepoint, then the newest).
* :func:`choose_lesion_sources` — the same choice per lesion: each lesion's own nearest annotation by a person
  (the job propagates from the one :func:`choose_prompt_source` picks, and the lesions it does not mark from their
  own, ``pipeline.jobs.lesion_sources``).
* :func:`nearest_source_index` — the tracking loop: for timepoint ``t`` the nearest annotated timepoint index
  (either direction; ties go to the earlier one).
* :func:`select_prior_annotation` — the service's ``match_priors``: the same choice over ``PriorTimepoint`` records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from sqlalchemy import select

from lesiontrack.db.models import Instance, Series
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.ports import PriorAnnotation, PriorTimepoint

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

OUR_MANUFACTURER = "LesionTrack"
"""``Manufacturer`` of every SEG/SR we write (pipeline.dicom.seg.writer.SOFTWARE_NAME)."""


_RANK = {"SEG": 3, "RTSTRUCT": 2, "SR": 1, "PR": 1}  # pipeline.dicom.annotations.common.RANK


def time_key(date: str | None, time: str | None) -> str:
    """A sortable key of a study's date and time (missing date sorts first)."""
    return f"{date or '00000000'}{(time or '').split('.')[0]:0<6}"


class AnnotationOrigin(StrEnum):
    """Who made an annotation."""

    PERSON = "person"  # drawn or measured by a radiologist (any other manufacturer)
    OURS = "ours"  # a result of ours (Manufacturer LesionTrack / Series.created_by_us)


@dataclass(frozen=True)
class AnnotationCandidate:
    """One SEG/SR (or prompt file) on one prior CT series, as far as source selection needs to know it."""

    sop_instance_uid: str
    modality: str  # "SEG", "RTSTRUCT", "SR", "PR", "points"
    ct_series_uid: str
    time_key: str  # sortable study date+time of the annotated CT (YYYYMMDDhhmmss)
    origin: AnnotationOrigin
    confirmed: bool = False  # a result of ours that a person verified (counts as the person's)
    content_key: str = ""  # sortable content date+time of the object itself (newest wins at one timepoint)

    @property
    def by_person(self) -> bool:
        return self.origin is AnnotationOrigin.PERSON or self.confirmed


@dataclass(frozen=True)
class SourceChoice:
    """The chosen annotation and why; ``skipped`` lists our own results passed over (newer than the choice)."""

    chosen: AnnotationCandidate
    reason: str
    skipped: tuple[AnnotationCandidate, ...] = field(default_factory=tuple)


class NoPersonAnnotation(Exception):
    """Only results of ours annotate the priors: nothing a person made to propagate from."""


def choose_prompt_source(candidates: Sequence[AnnotationCandidate], followup_key: str) -> SourceChoice | None:
    """The person's annotation nearest in time at or before ``followup_key`` (None when there are no candidates).

    Within the chosen timepoint a SEG beats an RT structure set beats an SR or a presentation state (an outline in
    3-D says more than contours, contours more than a measurement), then the newest object. Raises
    :class:`NoPersonAnnotation` when every candidate is ours.
    """
    earlier = [c for c in candidates if c.time_key <= followup_key]
    if not earlier:
        return None
    person = [c for c in earlier if c.by_person]
    if not person:
        raise NoPersonAnnotation(
            f"the {len(earlier)} annotation(s) on prior studies are all results of LesionTrack; a follow-up is only "
            "propagated from lesions a person marked or confirmed"
        )
    best_time = max(c.time_key for c in person)
    at_best = [c for c in person if c.time_key == best_time]
    chosen = max(at_best, key=lambda c: (_RANK.get(c.modality.upper(), 0), c.content_key, c.sop_instance_uid))
    skipped = tuple(c for c in earlier if not c.by_person and c.time_key >= best_time)
    reason = (
        f"{chosen.modality} {chosen.sop_instance_uid} made by a person"
        + (" (our result, confirmed by a person)" if chosen.origin is AnnotationOrigin.OURS else "")
        + f" on series {chosen.ct_series_uid}, the nearest annotated timepoint"
    )
    if skipped:
        reason += f"; {len(skipped)} newer result(s) of ours not used as prompt"
    return SourceChoice(chosen, reason, skipped)


@dataclass(frozen=True)
class MarkedLesions:
    """One annotation and the lesions (Tracking UIDs) it marks."""

    annotation: AnnotationCandidate
    tracking_uids: frozenset[str]


@dataclass(frozen=True)
class LesionSources:
    """Per lesion, the annotation it is prompted from (LinGuinE's nearest-annotation propagation, per lesion)."""

    by_lesion: dict[str, AnnotationCandidate]  # Tracking UID → the person's annotation nearest in time marking it
    unmarked: tuple[str, ...]  # lesions no annotation of a person marks at or before the follow-up

    def timepoints(self) -> dict[str, list[str]]:
        """CT series (prompt timepoint) → the lesions prompted from its annotation, nearest first."""
        out: dict[str, list[str]] = {}
        for uid, a in sorted(self.by_lesion.items(), key=lambda kv: (kv[1].time_key, kv[0]), reverse=True):
            out.setdefault(a.ct_series_uid, []).append(uid)
        return {k: sorted(v) for k, v in out.items()}


def choose_lesion_sources(marked: Sequence[MarkedLesions], followup_key: str) -> LesionSources:
    """The prompt timepoint of each lesion: the person's annotation nearest in time at or before ``followup_key``
    that marks *that* lesion (the same choice as :func:`choose_prompt_source`, per lesion): a follow-up's arrow on
    one lesion is that lesion's nearest annotation, and the lesions it does not mark keep their own earlier one
    instead of being reported "not assessed". Our own results never prompt; a lesion only they mark is unmarked."""
    lesions = sorted({uid for m in marked for uid in m.tracking_uids})
    by_lesion: dict[str, AnnotationCandidate] = {}
    unmarked: list[str] = []
    for uid in lesions:
        pool = [m.annotation for m in marked if uid in m.tracking_uids]
        try:
            choice = choose_prompt_source(pool, followup_key)
        except NoPersonAnnotation:
            choice = None
        if choice is None:
            unmarked.append(uid)
        else:
            by_lesion[uid] = choice.chosen
    return LesionSources(by_lesion, tuple(unmarked))


def nearest_source_index(t: int, annotated: Iterable[int]) -> int:
    """Index of the annotated timepoint nearest to ``t`` (ties: the earlier one)."""
    pool = sorted(set(annotated))
    if not pool:
        raise ValueError("no annotated timepoint")
    return min(pool, key=lambda s: (abs(s - t), s))


def is_our_object(path: Path) -> bool:
    """True when the DICOM object at ``path`` is a result of LesionTrack (not a person's annotation).

    Ours: ``Manufacturer`` LesionTrack, except a SEG whose segments are all ``MANUAL`` (drawn by a person, e.g. the
    demo's baseline or a verified result re-issued by a reader, which then counts as the person's).
    """

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return False
    if str(ds.get("Manufacturer", "")) != OUR_MANUFACTURER:
        return False
    if str(ds.get("Modality", "")) == "SEG":
        kinds = {str(seg.get("SegmentAlgorithmType", "")).upper() for seg in ds.get("SegmentSequence", [])}
        if kinds == {"MANUAL"}:
            return False
    return True


def content_key(path: Path) -> str:
    """Sortable content date+time of a DICOM object ('' when unreadable)."""

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["ContentDate", "ContentTime", "SeriesDate", "SeriesTime"]
        )
    except Exception:
        return ""
    return f"{ds.get('ContentDate', ds.get('SeriesDate', ''))}{ds.get('ContentTime', '')}"


# -- the service: prior records → the annotation to propagate from ---------------------------------------------
def select_prior_annotation(
    priors: Sequence[PriorTimepoint],
    followup_key: str,
    ours: Callable[[PriorAnnotation], bool],
    time_key: Callable[[PriorTimepoint], str],
) -> tuple[PriorTimepoint, SourceChoice]:
    """The prior timepoint and annotation to propagate a follow-up from (the person's, nearest in time).

    ``ours`` tells our own SEG/SR apart (Series.created_by_us, Manufacturer); ``time_key`` sorts the timepoints.
    Raises :class:`NoPersonAnnotation` when every prior annotation is a result of ours; returns the prior with only
    the chosen annotation in ``annotations``.
    """
    by_uid: dict[str, tuple[PriorTimepoint, PriorAnnotation]] = {}
    candidates = []
    for p in priors:
        for a in p.annotations:
            by_uid[a.sop_instance_uid] = (p, a)
            first = Path(a.files[0]) if a.files and Path(a.files[0]).is_file() else None
            candidates.append(
                AnnotationCandidate(
                    a.sop_instance_uid,
                    a.modality,
                    p.ct_series_uid,
                    time_key(p),
                    AnnotationOrigin.OURS if ours(a) else AnnotationOrigin.PERSON,
                    content_key=content_key(first) if first is not None else "",
                )
            )
    choice = choose_prompt_source(candidates, followup_key)
    if choice is None:
        raise NoPersonAnnotation("no annotation on a prior timepoint at or before the follow-up")
    prior, ann = by_uid[choice.chosen.sop_instance_uid]
    chosen = replace(prior, annotations=[ann])
    return chosen, choice


def written_by_us(path: str | Path) -> bool:
    """An instance of a series we created is ours unless its header says otherwise: OHIF saves the radiologist's SR
    into the series its measurements were hydrated from (our OHIF measurements SR's, docs/viewer.md), with a
    Manufacturer of its own. A file that is not there counts as ours."""
    p = Path(path)
    return not p.is_file() or is_our_object(p)


def our_instance_uids(session_factory: sessionmaker[Session], sop_uids: Iterable[str]) -> set[str]:
    """Which of ``sop_uids`` are our instances: in a series we created (Series.created_by_us) and
    :func:`written_by_us` (a person's object saved into such a series is not)."""

    uids = list(sop_uids)
    if not uids:
        return set()
    with session_scope(session_factory) as s:
        rows = s.execute(
            select(Instance.sop_instance_uid, Instance.file_path)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.created_by_us.is_(True), Instance.sop_instance_uid.in_(uids))
        ).all()
    return {uid for uid, path in rows if written_by_us(path)}
