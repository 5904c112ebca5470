"""Each lesion from its own nearest annotation (issue 31 C, LinGuinE's nearest-annotation propagation per lesion).

A job propagates from the annotation a person made nearest in time before the follow-up
(:func:`pipeline.science.prompt_selection.choose_prompt_source`). When that annotation marks only some lesions (a
radiologist's arrow on a follow-up), the others were marked on an earlier timepoint: :func:`earlier_sources` finds,
for each of them, the person's annotation nearest in time that marks *that* lesion
(:func:`~pipeline.science.prompt_selection.choose_lesion_sources`), reads its CT and the lesion's prompt there, so that
the track step propagates it from there (``pipeline.jobs.steps.track``). A lesion no readable earlier annotation
marks stays "not assessed", with the reason.

An earlier study only on the PACS: prior matching fetched its annotation series; the lesions they name are read
without a CT (:mod:`pipeline.dicom.annotations.names`), and its CT is retrieved through the prior source's port
(:class:`PacsAccess`) only when one of them names a lesion still looked for, newest first. Each retrieval is recorded
(``EarlierRetrievalRecord``); one that fails leaves those lesions "not assessed" with the failure as the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import Instance, Lesion, Series, Study
from lesiontrack.db.session import session_scope
from lesiontrack.models.imaging.dicom_read import SeriesError, read_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt
from lesiontrack.pipeline.dicom.annotations.common import AnnotationWarning, normalise_label
from lesiontrack.pipeline.dicom.annotations.names import UnreadableNames, named_lesions
from lesiontrack.pipeline.dicom.prompt_sources import PromptSourceError, prompts_from_object
from lesiontrack.pipeline.dicom.seg.reader import UnassessedSegment
from lesiontrack.pipeline.jobs.contract import EarlierRetrievalRecord, EarlierSource
from lesiontrack.pipeline.jobs.followup_annotations import person_annotations_on
from lesiontrack.pipeline.jobs.ports import PriorAnnotation, PriorTimepoint
from lesiontrack.pipeline.science.prompt_selection import (
    AnnotationCandidate,
    AnnotationOrigin,
    MarkedLesions,
    choose_lesion_sources,
    content_key,
    time_key,
)

log = logging.getLogger(__name__)


def _earlier_series(session: Session, patient_pk: int, before_key: str) -> list[tuple[str, str, str | None, str]]:
    """(series, study, study date, time key) of the patient's CT series before ``before_key``, newest first."""
    rows = session.execute(
        select(Series.series_instance_uid, Study.study_instance_uid, Study.study_date, Study.study_time)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.patient_pk == patient_pk, Series.created_by_us.is_(False), Series.modality == "CT")
    ).all()
    keyed = [(uid, study, date, time_key(date, time)) for uid, study, date, time in rows]
    return sorted((r for r in keyed if r[3] < before_key), key=lambda r: r[3], reverse=True)


def _ct_files(session: Session, series_uid: str) -> list[Path]:
    return [
        Path(p)
        for p in session.scalars(
            select(Instance.file_path)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
            .order_by(Instance.instance_number, Instance.id)
        )
    ]


def _marked(
    annotations: list[PriorAnnotation], ct: Volume, series_uid: str, key: str, warnings: list[str]
) -> list[tuple[MarkedLesions, list[Prompt]]]:
    """Each readable annotation of one timepoint with the lesions (Tracking UIDs and labels) it marks."""
    out = []
    for ann in annotations:
        said: list[AnnotationWarning] = []
        try:
            prompts = prompts_from_object(ann.files[0], ann.modality, ct, said)
        except PromptSourceError as exc:
            warnings.append(f"earlier {ann.modality} {ann.sop_instance_uid}: {exc}")
            continue
        keys = {p.identity.tracking_uid for p in prompts} | {normalise_label(p.identity.tracking_id) for p in prompts}
        cand = AnnotationCandidate(
            ann.sop_instance_uid,
            ann.modality,
            series_uid,
            key,
            AnnotationOrigin.PERSON,
            content_key=content_key(ann.files[0]),
        )
        out.append((MarkedLesions(cand, frozenset(keys)), prompts))
    return out


@dataclass(frozen=True)
class PacsAccess:
    """How the job brings an earlier study here: the prior source's ``retrieve`` (the port prior retrieval uses:
    C-MOVE, C-GET or DICOMweb as the peer is configured) and where matching found each CT series (its source:
    "local" or the PACS peer, from ``MatchPriorsOutput.priors_found``)."""

    retrieve: Callable[[PriorTimepoint], PriorTimepoint] | None
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass
class EarlierLookup:
    """What :func:`earlier_sources` found: the timepoints that prompt lesions (oldest first), the lesions none
    prompts (with the reason), and the studies it retrieved from the PACS for them."""

    sources: list[EarlierSource] = field(default_factory=list)
    unassessed: list[UnassessedSegment] = field(default_factory=list)
    retrieved: list[EarlierRetrievalRecord] = field(default_factory=list)


def earlier_sources(
    sf: sessionmaker[Session],
    patient_pk: int | None,
    unmarked: list[UnassessedSegment],
    prior_key: str,
    warnings: list[str],
    *,
    prior_marks: set[str] | None = None,
    pacs: PacsAccess | None = None,
) -> EarlierLookup:
    """The earlier timepoints that prompt the ``unmarked`` lesions (each from the person's annotation nearest in
    time that marks it, matched by Tracking UID, else label), oldest first, and the lesions none marks.

    With ``prior_marks`` (the Tracking UIDs and normalised labels the chosen prior annotation marks), a lesion a
    person named on an earlier annotation that neither the prior annotation nor any lesion known here names (a
    baseline that is only on the PACS) is looked for too. A timepoint whose CT is not held here is retrieved through
    ``pacs`` — only when one of its annotations names a lesion still looked for, newest first; a failed retrieval
    leaves those lesions "not assessed" with the reason."""
    if patient_pk is None or (not unmarked and prior_marks is None):
        return EarlierLookup(unassessed=unmarked)
    with session_scope(sf) as s:
        series = _earlier_series(s, patient_pk, prior_key)
        known = _known_keys(s, patient_pk) | (prior_marks or set())
    search = _Search(sf, unmarked, known, warnings, pacs or PacsAccess(None), discover=prior_marks is not None)
    for row in series:
        search.visit(*row)
    return EarlierLookup(search.found[::-1], [*search.left.values(), *search.failed], search.retrieved)


def _keys(ident: LesionIdentity) -> set[str]:
    return {ident.tracking_uid, normalise_label(ident.tracking_id)}


def _known_keys(session: Session, patient_pk: int) -> set[str]:
    """The Tracking UIDs and normalised labels of every lesion of the patient known here."""
    rows = session.execute(select(Lesion.tracking_uid, Lesion.tracking_id).where(Lesion.patient_pk == patient_pk))
    return {k for uid, tid in rows for k in (uid, normalise_label(tid or ""))} - {""}


class _Search:
    """One pass over the earlier timepoints, newest first (see :func:`earlier_sources`)."""

    def __init__(
        self,
        sf: sessionmaker[Session],
        unmarked: list[UnassessedSegment],
        known: set[str],
        warnings: list[str],
        pacs: PacsAccess,
        *,
        discover: bool,
    ) -> None:
        self.sf, self.warnings, self.pacs, self.discover = sf, warnings, pacs, discover
        self.left = {g.identity.tracking_uid: g for g in unmarked}
        self.known = known | {k for g in unmarked for k in _keys(g.identity)}
        self.next_label = max((g.identity.label for g in unmarked), default=1000) + 1
        self.found: list[EarlierSource] = []
        self.failed: list[UnassessedSegment] = []
        self.retrieved: list[EarlierRetrievalRecord] = []

    def visit(self, series_uid: str, study_uid: str, study_date: str | None, key: str) -> None:
        annotations = person_annotations_on(self.sf, series_uid)
        if not annotations or (not self.left and not self.discover):  # nothing left to look for on it
            return
        named = self._named(annotations)
        if self.discover:
            self._discover(named, series_uid)
        if not self.left:
            return
        with session_scope(self.sf) as s:
            files = _ct_files(s, series_uid)
        source = self.pacs.sources.get(series_uid, "local")
        if not files:  # not held here (source is only for the record): retrieved only for a lesion its annotations name
            wanted = [g for g in self.left.values() if _keys(g.identity) & named.keys()]
            if not wanted:
                return
            tp = PriorTimepoint(study_uid, study_date, None, series_uid, annotations=annotations, source=source)
            got = self._retrieve(tp, wanted)
            if got is None:
                return
            files = got
        try:
            ct = read_series(files, series_uid=series_uid)
        except SeriesError as exc:
            self.warnings.append(f"earlier CT {series_uid}: {exc}")
            return
        marked = _marked(annotations, ct, series_uid, key, self.warnings)
        prompts = _prompts_for(marked, self.left)
        if prompts:
            self.found.append(EarlierSource(series_uid, study_uid, study_date, key, ct, prompts))

    def _named(self, annotations: list[PriorAnnotation]) -> dict[str, tuple[PriorAnnotation, LesionIdentity]]:
        """Each key (Tracking UID, normalised label) the annotations name, with the annotation and the identity."""
        out: dict[str, tuple[PriorAnnotation, LesionIdentity]] = {}
        for ann in annotations:
            try:
                idents = named_lesions(ann.files[0], ann.modality)
            except UnreadableNames as exc:
                self.warnings.append(f"earlier {ann.modality} {ann.sop_instance_uid}: {exc}")
                continue
            for ident in idents:
                for k in _keys(ident):
                    out.setdefault(k, (ann, ident))
        return out

    def _discover(self, named: dict[str, tuple[PriorAnnotation, LesionIdentity]], series_uid: str) -> None:
        """Lesions named here that neither the prior annotation nor a lesion known here names: looked for too."""
        for ann, ident in list(named.values()):
            if _keys(ident) & self.known:
                continue
            self.known |= _keys(ident)
            gap = UnassessedSegment(
                replace(ident, label=self.next_label),
                f"marked by a person only on the earlier {ann.modality} {ann.sop_instance_uid} (series {series_uid}), "
                "which could not be read here",
            )
            self.next_label += 1
            self.left[ident.tracking_uid] = gap

    def _retrieve(self, tp: PriorTimepoint, wanted: list[UnassessedSegment]) -> list[Path] | None:
        """The CT files of ``tp`` brought here through the retrieve port; None (the ``wanted`` lesions "not
        assessed" with the reason) when it fails."""
        names = sorted(g.identity.tracking_id for g in wanted)
        log.info(
            "lesion(s) %s: nearest annotation on earlier study %s (%s), CT not held here: retrieving series %s",
            ", ".join(names), tp.study_uid, tp.source, tp.ct_series_uid,
        )  # fmt: skip
        record = EarlierRetrievalRecord(
            study_uid=tp.study_uid, ct_series_uid=tp.ct_series_uid, source=tp.source, lesions=names
        )
        self.retrieved.append(record)
        try:
            if self.pacs.retrieve is None:
                raise RuntimeError("no prior source configured to retrieve it")
            files = [Path(f) for f in self.pacs.retrieve(tp).ct_files]
            if not files or not all(f.is_file() for f in files):
                raise RuntimeError(f"{len(files)} CT files retrieved, not all on disk")
        except Exception as exc:  # a PACS or network failure: the lesions say why, the job goes on
            record.error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("earlier study %s not retrieved: %s", tp.study_uid, record.error)
            for g in wanted:
                del self.left[g.identity.tracking_uid]
                self.failed.append(
                    replace(
                        g,
                        reason=f"its nearest annotation by a person is on the earlier study {tp.study_uid}, only on "
                        f"{tp.source}; retrieving that study's CT series {tp.ct_series_uid} failed: {record.error}",
                    )
                )
            return None
        record.ct_files = len(files)
        return files


def _prompts_for(marked: list[tuple[MarkedLesions, list[Prompt]]], left: dict[str, UnassessedSegment]) -> list[Prompt]:
    """The prompts of one timepoint for the lesions still ``left`` (taken out of it), each from the annotation the
    per-lesion choice picks (a SEG over contours over lines, then the newest), under the lesion's identity."""
    chosen = choose_lesion_sources([m for m, _ in marked], "99999999999999")
    by_sop = {m.annotation.sop_instance_uid: ps for m, ps in marked}
    out: list[Prompt] = []
    for uid, gap in list(left.items()):
        ident = gap.identity
        for key in (uid, normalise_label(ident.tracking_id)):
            if key not in chosen.by_lesion:
                continue
            ann = chosen.by_lesion[key]
            match = next(
                (
                    p
                    for p in by_sop[ann.sop_instance_uid]
                    if p.identity.tracking_uid == uid or normalise_label(p.identity.tracking_id) == key
                ),
                None,
            )
            if match is not None:
                meta = {**match.meta, "sop_instance_uid": ann.sop_instance_uid}
                out.append(replace(match, identity=ident, meta=meta))
                del left[uid]
                break
    return out
