"""Step 7: write the follow-up's DICOM-SEG and TID 1500 SR (new instances every time) and persist the lesions."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AnalysisJob
from db.session import session_scope
from pipeline.contract import MatchPriorsOutput, WriteSegSrOutput, read_output
from pipeline.lesions import LesionStatus, TrackedLesion
from pipeline.steps.persistence import persist_observations, record_our_objects
from pipeline.steps.services import Ctx


def write_seg_sr(ctx: Ctx) -> WriteSegSrOutput:
    from pydicom.uid import generate_uid

    from pipeline.seg_writer import save_new, write_seg
    from pipeline.sr_writer import LesionReport, TimePoint, write_sr

    inputs = ctx.state.need_inputs()
    measured = ctx.state.need_measured()
    lesions = ctx.state.need_timepoints()[1].lesions
    out_dir = ctx.services.results_root / f"job-{ctx.job_id}" / f"attempt-{ctx.attempt}"
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in inputs.followup_files]
    present = [les for les in lesions if les.status is not LesionStatus.VANISHED and les.mask.array.any()]
    seg_path = sr_path = None
    seg_res = None
    if present:
        seg_res = write_seg(sources, lesions, series_instance_uid=generate_uid())
        seg_path = save_new(seg_res.dataset, out_dir)
    assessment = measured.recist
    roles = {d.tracking_uid: d.role for d in assessment.selection.decisions}
    reports = [
        LesionReport(
            measured.current[les.identity.tracking_uid],
            measured.changes.get(les.identity.tracking_uid),
            roles.get(les.identity.tracking_uid),
            _expected_centre(les),
            les.identity.description,
        )
        for les in lesions
    ]
    evidence = [pydicom.dcmread(f, stop_before_pixels=True) for a in inputs.prior.annotations for f in a.files]
    previous = _previous_srs(ctx.services.session_factory, ctx.series_uid, ctx.job_id)
    fu = ctx.outputs.get(MatchPriorsOutput).followup
    idx = measured.timepoint_index
    sr_uid = None
    if seg_res is not None:
        sr_res = write_sr(
            sources,
            seg_res,
            reports,
            time_point=TimePoint(f"T{idx}", idx, fu.study_date),
            recist=assessment.timepoints[idx],
            best_overall=assessment.best_overall_response,
            prior_evidence=evidence,
            previous_versions=previous,
        )
        sr_path = save_new(sr_res.dataset, out_dir)
        sr_uid = str(sr_res.dataset.SOPInstanceUID)
    files = [str(p) for p in (seg_path, sr_path) if p is not None]
    seg_uid = str(seg_res.dataset.SOPInstanceUID) if seg_res is not None else None
    persist_observations(ctx, seg_uid, seg_res.segment_numbers if seg_res else {})
    record_our_objects(ctx.services.session_factory, [Path(f) for f in files])
    return WriteSegSrOutput(
        files=files,
        seg=str(seg_path) if seg_path else None,
        sr=str(sr_path) if sr_path else None,
        seg_sop_instance_uid=seg_uid,
        sr_sop_instance_uid=sr_uid,
        present=len(present),
        vanished=len(lesions) - len(present),
    )


def _expected_centre(lesion: TrackedLesion) -> tuple[float, float, float] | None:
    """Where a vanished lesion was looked for (its propagated centre), so the SR can point at it."""
    c = lesion.propagated_centre_mm
    if c is None:
        return None
    x, y, z = (float(v) for v in c)
    return (x, y, z)


def _previous_srs(sf: sessionmaker[Session], series_uid: str, job_id: int) -> list[Dataset]:
    """The SR of the latest earlier job of this series (the new SR names it as its predecessor)."""
    with session_scope(sf) as s:
        jobs = s.scalars(
            select(AnalysisJob)
            .where(AnalysisJob.followup_series_uid == series_uid, AnalysisJob.id != job_id)
            .order_by(AnalysisJob.id)
        ).all()
        paths = [w.sr for j in jobs if (w := read_output(j.step_outputs or {}, WriteSegSrOutput)) is not None]
    out: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths if p and Path(p).is_file()]
    return out[-1:]
