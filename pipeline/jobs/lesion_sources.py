"""Each lesion from its own nearest annotation (issue 31 C, LinGuinE's nearest-annotation propagation per lesion).

A job propagates from the annotation a person made nearest in time before the follow-up
(:func:`pipeline.science.prompt_selection.choose_prompt_source`). When that annotation marks only some lesions (a
radiologist's arrow on a follow-up), the others were marked on an earlier timepoint: :func:`earlier_sources` finds,
for each of them, the person's annotation nearest in time that marks *that* lesion
(:func:`~pipeline.science.prompt_selection.choose_lesion_sources`), reads its CT and the lesion's prompt there, so that
the track step propagates it from there (``pipeline.jobs.steps.track``). A lesion no readable earlier annotation
marks stays "not assessed", with the reason.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import Instance, Series, Study
from lesiontrack.db.session import session_scope
from lesiontrack.models.imaging.dicom_read import SeriesError, read_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import Prompt
from lesiontrack.pipeline.dicom.annotations.common import AnnotationWarning, normalise_label
from lesiontrack.pipeline.dicom.prompt_sources import PromptSourceError, prompts_from_object
from lesiontrack.pipeline.dicom.seg.reader import UnassessedSegment
from lesiontrack.pipeline.jobs.contract import EarlierSource
from lesiontrack.pipeline.jobs.followup_annotations import person_annotations_on
from lesiontrack.pipeline.jobs.ports import PriorAnnotation
from lesiontrack.pipeline.jobs.steps.services import time_key
from lesiontrack.pipeline.science.prompt_selection import (
    AnnotationCandidate,
    AnnotationOrigin,
    MarkedLesions,
    choose_lesion_sources,
    content_key,
)


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


def earlier_sources(
    sf: sessionmaker[Session],
    patient_pk: int | None,
    unmarked: list[UnassessedSegment],
    prior_key: str,
    warnings: list[str],
) -> tuple[list[EarlierSource], list[UnassessedSegment]]:
    """The earlier timepoints that prompt the ``unmarked`` lesions (each from the person's annotation nearest in
    time that marks it, matched by Tracking UID, else label), oldest first, and the lesions none marks."""
    if patient_pk is None or not unmarked:
        return [], unmarked
    left = {g.identity.tracking_uid: g for g in unmarked}
    found: list[EarlierSource] = []
    with session_scope(sf) as s:
        series = _earlier_series(s, patient_pk, prior_key)
    for series_uid, study_uid, study_date, key in series:
        annotations = person_annotations_on(sf, series_uid)
        if not left or not annotations:
            continue
        with session_scope(sf) as s:
            files = _ct_files(s, series_uid)
        try:
            ct = read_series(files, series_uid=series_uid)
        except SeriesError as exc:
            warnings.append(f"earlier CT {series_uid}: {exc}")
            continue
        marked = _marked(annotations, ct, series_uid, key, warnings)
        prompts = _prompts_for(marked, left)
        if prompts:
            found.append(EarlierSource(series_uid, study_uid, study_date, key, ct, prompts))
    return found[::-1], list(left.values())


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
