"""A radiologist's annotations on the follow-up being analysed (issue 31 item 3): a re-measured line, an arrow or a
point on a lesion tracking lost, saved to the PACS with (or after) the follow-up's CT. They are person-made prompts
at that timepoint: the tracking loop segments those lesions there from the person's drawing
(``track_lesions(confirmed={1: ...})``) and propagates only the others from the prior.

* :func:`person_annotations_on` — the annotation objects (SEG, TID 1500 SR, GSPS, RTSTRUCT) of the follow-up's study
  that reference its CT series and were not written by us, and not a correction of our result (taken in, or a SEG
  or SR received after our first result of the series: issue 16's verification path decides on those), oldest
  first;
* :func:`unmarked_lesions` — lesions the chosen prior annotation does not mark (a follow-up's annotation of a few
  lesions is the nearest of the next follow-up): tracked from their own nearest annotation
  (:mod:`pipeline.jobs.lesion_sources`), else reported "not assessed" and flagged, never silently dropped;
* :func:`followup_prompts` — their prompts on the follow-up CT, each lesion under the prior's identity when its
  Tracking UID or label is the prior's (the same label on a later study is the same lesion); a later annotation of
  a lesion replaces an earlier one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import (
    AnalysisJob,
    Instance,
    Lesion,
    LesionObservation,
    LesionOrigin,
    Series,
    TimepointVerification,
    VerificationMethod,
)
from lesiontrack.db.session import session_scope
from lesiontrack.db.status import LesionStatus
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt
from lesiontrack.pipeline.dicom.annotations.common import AnnotationWarning, normalise_label
from lesiontrack.pipeline.dicom.annotations.refs import PRIOR_ANNOTATION_MODALITIES, prior_annotation_references
from lesiontrack.pipeline.dicom.prompt_sources import PromptSourceError, prompts_from_object
from lesiontrack.pipeline.dicom.seg.reader import UnassessedSegment
from lesiontrack.pipeline.jobs.contract import WriteSegSrOutput, read_output
from lesiontrack.pipeline.jobs.ports import PriorAnnotation
from lesiontrack.pipeline.science.prompt_selection import content_key, is_our_object


def person_annotations_on(sf: sessionmaker[Session], series_uid: str) -> list[PriorAnnotation]:
    """The person-made annotation objects of ``series_uid``'s study that reference that CT series, oldest first."""
    found: list[tuple[str, PriorAnnotation]] = []
    with session_scope(sf) as s:
        ct = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if ct is None:
            return []
        rows = s.execute(
            select(Instance, Series.modality)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == ct.study_pk, Series.modality.in_(sorted(PRIOR_ANNOTATION_MODALITIES)))
        ).all()
        taken_in = set(  # corrections decide on their own; a late annotation (method annotation) is a prompt here
            s.scalars(
                select(TimepointVerification.source_sop_instance_uid).where(
                    TimepointVerification.method != VerificationMethod.ANNOTATION
                )
            )
        )
        first_result = _first_result_at(s, series_uid)
        for inst, modality in rows:
            path = Path(inst.file_path)
            if inst.sop_instance_uid in taken_in or not path.is_file() or is_our_object(path):
                continue
            if (
                first_result is not None
                and (modality or "").upper() in ("SEG", "SR")
                and _naive(inst.received_at) > first_result
            ):
                continue  # a SEG/SR after our result corrects it: issue 16's take-in decides (also when it refuses)
            try:
                hdr = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            kind, refs = prior_annotation_references(hdr)
            if kind is None or series_uid not in refs:
                continue
            found.append((content_key(path), PriorAnnotation(inst.sop_instance_uid, inst.sop_class_uid, kind, [path])))
    return [a for _key, a in sorted(found, key=lambda x: x[0])]


def _naive(t: datetime) -> datetime:
    return t.replace(tzinfo=None) if t.tzinfo is None else t.astimezone(UTC).replace(tzinfo=None)


def _first_result_at(session: Session, series_uid: str) -> datetime | None:
    """When the first job of this series that issued results finished (UTC, naive); None: none did."""
    times = []
    for j in session.scalars(select(AnalysisJob).where(AnalysisJob.followup_series_uid == series_uid)):
        written = read_output(j.step_outputs or {}, WriteSegSrOutput)
        if j.finished_at is not None and written is not None and written.files:
            times.append(_naive(j.finished_at))
    return min(times, default=None)


def followup_prompts(
    annotations: Sequence[PriorAnnotation],
    followup_ct: Volume,
    prior_prompts: Sequence[Prompt],
    warnings: list[str] | None = None,
) -> list[Prompt]:
    """The lesions the ``annotations`` mark on ``followup_ct``, under the prior's identities where they match
    (Tracking UID, else the label); a lesion the prior does not have keeps its own identity with a new label number.
    An object that gives no lesion is a warning naming it, never an error of the job."""
    by_uid = {p.identity.tracking_uid: p.identity for p in prior_prompts}
    by_label = {normalise_label(p.identity.tracking_id): p.identity for p in prior_prompts}
    next_label = max((p.identity.label for p in prior_prompts), default=0) + 1
    out: dict[str, Prompt] = {}
    for ann in annotations:
        said: list[AnnotationWarning] = []
        try:
            read = prompts_from_object(ann.files[0], ann.modality, followup_ct, said)
        except PromptSourceError as exc:  # NoLesionInAnnotation included
            if warnings is not None:
                warnings.append(f"follow-up {ann.modality} {ann.sop_instance_uid}: {exc}")
            continue
        if warnings is not None:
            warnings.extend(f"follow-up {ann.modality} {ann.sop_instance_uid}: {w}" for w in said)
        for p in read:
            ident = by_uid.get(p.identity.tracking_uid) or by_label.get(normalise_label(p.identity.tracking_id))
            if ident is None:
                ident = replace(p.identity, label=next_label)
                by_uid[ident.tracking_uid] = ident
                next_label += 1
            meta = {**p.meta, "sop_instance_uid": ann.sop_instance_uid}
            out[ident.tracking_uid] = replace(p, identity=ident, meta=meta)  # a later annotation replaces it
    return sorted(out.values(), key=lambda p: p.identity.label)


def unmarked_lesions(
    session: Session, patient_pk: int | None, marked: set[str], prior_label: str
) -> list[UnassessedSegment]:
    """Lesions a person marked on an earlier timepoint of this patient, still seen at their last observation, that
    the chosen prior annotation does not mark (a radiologist's annotation of a few lesions on a follow-up is the
    nearest annotation of the next one): reported "not assessed" with the reason and flagged, never silently
    dropped. The job then looks for each one's own nearest annotation (:mod:`pipeline.jobs.lesion_sources`); those
    it finds are tracked from there, the others keep this reason."""
    if patient_pk is None:
        return []
    out: list[UnassessedSegment] = []
    drawn = (LesionOrigin.SEG, LesionOrigin.SR, LesionOrigin.GSPS, LesionOrigin.RTSTRUCT, LesionOrigin.PROMPT)
    lesions = session.scalars(
        select(Lesion).where(Lesion.patient_pk == patient_pk, Lesion.origin.in_(drawn)).order_by(Lesion.id)
    ).all()
    label = 1000
    for lesion in lesions:
        if lesion.tracking_uid in marked or lesion.retired_at_series_uid is not None:
            continue
        last = session.scalars(
            select(LesionObservation)
            .where(LesionObservation.lesion_pk == lesion.id, LesionObservation.superseded_by_job.is_(None))
            .order_by(LesionObservation.id.desc())
        ).first()
        if last is None or last.status is LesionStatus.VANISHED:
            continue  # vanished ones stay in the report through pipeline.jobs.steps.track.vanished_earlier
        label += 1
        ident = LesionIdentity(lesion.tracking_uid, lesion.tracking_id, label, anatomic_site=lesion.anatomic_site)
        out.append(
            UnassessedSegment(
                ident,
                f"not marked on {prior_label}, the nearest annotation a person made, nor on an earlier "
                "annotation of a person that can be read here",
            )
        )
    return out
