"""The DICOM-SEG of the prior lesions LesionTrack derived from a radiologist's drawing (a line, an arrow, an ellipse,
contours), on the PRIOR study, so the radiologist sees in the viewer what will be tracked and can correct it.

* :func:`drawn_lesions` — the prior timepoint's lesions that were derived from a drawing (``prompt_origin`` of
  :mod:`pipeline.science.drawn_priors`); a lesion prompted by a SEG is the radiologist's own outline and is not
  re-issued;
* :func:`derivation_key` — what the SEG is a function of (the annotation it was derived from and the masks): an
  earlier job's SEG with the same key is not issued again by the next follow-up;
* :func:`write_drawn_prior_seg` — the SEG: "derived from the radiologist's measurement", one segment per lesion
  with its confidence (:data:`models.segmentation.drawing.WEAK_PRIOR_SCORE`, until a person confirms it) and the
  drawing it came from in the segment description; a re-derived one is the next revision (the job's output names
  the SEG it supersedes);
* :func:`earlier_drawn_prior_seg` — the newest such SEG an earlier job of the patient issued for a prior CT series
  (recorded in that job's :class:`~pipeline.jobs.contract.WriteSegSrOutput`).

A person's correction of it, saved to the PACS, is taken in as a verification of the prior timepoint
(:func:`pipeline.jobs.verification.take_in_series`) and is the prior's annotation from then on (a person's SEG).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from lesiontrack.db.models import AnalysisJob
from lesiontrack.models.segmentation.drawing import WEAK_PRIOR_SCORE, DrawingKind
from lesiontrack.pipeline.dicom.seg.writer import SegWriteResult, write_seg
from lesiontrack.pipeline.jobs.contract import WriteSegSrOutput, read_output
from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion

SERIES_DESCRIPTION = "LesionTrack prior lesions from radiologist's measurement"  # + " rev<n>", within LO's 64
CONTENT_DESCRIPTION = "Derived from the radiologist's measurement"
SERIES_NUMBER = 905

_DRAWN = {k.value for k in DrawingKind}


@dataclass(frozen=True)
class EarlierDrawnPriorSeg:
    """A drawn-prior SEG an earlier job issued: where it is, what it is, and what it was derived from."""

    path: str
    sop_instance_uid: str
    key: str
    revision: int


def drawn_lesions(prior_lesions: Sequence[TrackedLesion]) -> list[TrackedLesion]:
    """The present prior lesions whose 3-D mask LesionTrack derived from a drawing on one image."""
    return [
        les
        for les in prior_lesions
        if les.status is not LesionStatus.VANISHED
        and les.mask.array.any()
        and les.meta.get("annotated")  # derived here from the drawing, not propagated from another timepoint
        and str(les.meta.get("prompt_origin", "")) in _DRAWN
    ]


def lesion_confidence(lesion: TrackedLesion) -> float:
    """The derived lesion's confidence: that of the drawing it came from, until a person confirms it."""
    return WEAK_PRIOR_SCORE[DrawingKind(str(lesion.meta["prompt_origin"]))]


def derivation_key(annotation_sop_uid: str, lesions: Sequence[TrackedLesion]) -> str:
    """SHA-256 over the annotation's SOP Instance UID and every lesion's Tracking UID and mask (grid and voxels)."""
    h = hashlib.sha256(annotation_sop_uid.encode())
    for les in sorted(lesions, key=lambda x: x.identity.tracking_uid):
        m = les.mask
        h.update(les.identity.tracking_uid.encode())
        h.update(repr((m.shape, tuple(round(float(v), 4) for v in m.spacing), tuple(m.origin))).encode())
        h.update(m.array.astype(bool).tobytes())
    return h.hexdigest()


def segment_description(lesion: TrackedLesion) -> str:
    origin = str(lesion.meta["prompt_origin"])
    said = lesion.identity.description or ""
    drawn = lesion.meta.get("drawn_diameters_mm")
    size = ""
    if isinstance(drawn, list) and drawn and drawn[0]:
        size = f" ({' x '.join(f'{float(d):.1f}' for d in drawn if d)} mm)"
    text = f"{CONTENT_DESCRIPTION}: {origin}{size}; confidence {lesion_confidence(lesion):.2f}"
    return f"{said} — {text}" if said else text


def write_drawn_prior_seg(
    prior_sources: Sequence[Dataset],
    lesions: Sequence[TrackedLesion],
    *,
    revision: int = 1,
    supersedes: str | None = None,
    key: str | None = None,
) -> SegWriteResult:
    """The SEG of the drawn prior ``lesions`` on the prior CT series ``prior_sources`` (headers suffice).

    With the derivation ``key`` its UIDs follow from (key, revision, superseded SEG): follow-ups of one prior analysed
    at the same time, none seeing the other's SEG yet, issue the same instance, which the PACS and our database
    keep once."""

    def uid(part: str) -> str | None:
        return None if key is None else generate_uid(entropy_srcs=[key, str(revision), supersedes or "", part])

    res = write_seg(
        prior_sources,
        lesions,
        series_number=SERIES_NUMBER,
        series_instance_uid=uid("series") or generate_uid(),
        sop_instance_uid=uid("instance"),
        series_description=f"{SERIES_DESCRIPTION} rev{revision}"[:64],
    )
    ds = res.dataset
    # a SEG has no predecessor reference: the revision in the descriptions tells the viewer which is current, and
    # the job's output records the SOP Instance UID it supersedes (WriteSegSrOutput.prior_seg_supersedes)
    ds.ContentDescription = CONTENT_DESCRIPTION if supersedes is None else f"{CONTENT_DESCRIPTION} (rev{revision})"
    by_uid = {les.identity.tracking_uid: les for les in lesions}
    for item in ds.SegmentSequence:
        les = by_uid.get(str(item.get("TrackingUID", "")))
        if les is not None:
            item.SegmentDescription = segment_description(les)[:1024]
    return res


def earlier_drawn_prior_seg(
    session: Session, patient_pk: int | None, prior_series_uid: str, *, exclude_job: int | None = None
) -> EarlierDrawnPriorSeg | None:
    """The newest drawn-prior SEG an earlier job of this patient issued on ``prior_series_uid`` (file present)."""
    q = select(AnalysisJob).where(AnalysisJob.patient_pk == patient_pk).order_by(AnalysisJob.id.desc())
    for job in session.scalars(q):
        if job.id == exclude_job:
            continue
        out = read_output(job.step_outputs or {}, WriteSegSrOutput)
        if (
            out is not None
            and out.prior_seg
            and out.prior_seg_series_uid == prior_series_uid
            and out.prior_seg_sop_instance_uid
            and Path(out.prior_seg).is_file()
        ):
            return EarlierDrawnPriorSeg(
                out.prior_seg, out.prior_seg_sop_instance_uid, out.prior_seg_key or "", out.prior_seg_revision
            )
    return None
