"""Step 7: write the follow-up's DICOM-SEG, TID 1500 SR and OHIF measurements SR (new instances every time) and
persist the lesions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydantic import BaseModel
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import AnalysisJob
from lesiontrack.db.session import session_scope
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity
from lesiontrack.pipeline.dicom.seg.reader import UnassessedSegment
from lesiontrack.pipeline.dicom.seg.writer import SegWriteResult, save_new, write_seg
from lesiontrack.pipeline.dicom.sr.viewer import SERIES_DESCRIPTION as VIEWER_SERIES_DESCRIPTION
from lesiontrack.pipeline.dicom.sr.viewer import write_viewer_sr
from lesiontrack.pipeline.dicom.sr.writer import LesionReport, SrTimepoint, write_sr
from lesiontrack.pipeline.jobs.contract import CandidateSearch, MatchPriorsOutput, WriteSegSrOutput, read_output
from lesiontrack.pipeline.jobs.derived_prior_seg import (
    derivation_key,
    drawn_lesions,
    earlier_drawn_prior_seg,
    write_drawn_prior_seg,
)
from lesiontrack.pipeline.jobs.ports import PROMPT_FILE
from lesiontrack.pipeline.jobs.steps.persistence import (
    persist_observations,
    persist_search,
    persist_verification,
    record_our_objects,
)
from lesiontrack.pipeline.jobs.steps.services import Ctx
from lesiontrack.pipeline.jobs.verification import reanalyse_later, verified_sop_uids
from lesiontrack.pipeline.science.confidence import lesion_confidence
from lesiontrack.pipeline.science.drawn_priors import drawn_diameters
from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion
from lesiontrack.pipeline.science.measurements import LesionMeasurement, measure_lesion


def write_seg_sr(ctx: Ctx) -> WriteSegSrOutput:
    inputs = ctx.state.need_inputs()
    measured = ctx.state.need_measured()
    search = ctx.state.need_search()
    followup = ctx.state.need_timepoints()[1]
    lesions = followup.lesions
    candidates = _candidate_lesions(lesions, search)
    out_dir = ctx.services.results_root / f"job-{ctx.job_id}" / f"attempt-{ctx.attempt}"
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in inputs.followup_files]
    present = [les for les in lesions if les.status is not LesionStatus.VANISHED and les.mask.array.any()]
    seg_path = None
    seg_res = None
    sf = ctx.services.session_factory
    adoption = ctx.state.adoption
    revision = _revision(sf, ctx.series_uid, ctx.job_id)
    label = revision_label(revision, verified=adoption is not None)
    if present or candidates:
        seg_res = write_seg(
            sources,
            [*lesions, *candidates],
            series_instance_uid=generate_uid(),
            series_description=f"LesionTrack lesions {label}",
        )
        seg_path = save_new(seg_res.dataset, out_dir)
    reports = _lesion_reports(ctx, lesions, candidates)
    sr_path, sr_uid = _write_measurement_sr(ctx, sources, seg_res, reports, label, out_dir)
    fu = ctx.outputs.get(MatchPriorsOutput).followup
    idx = measured.timepoint_index
    # the same lesions' RECIST axes shaped as OHIF re-hydrates them (its own series, superseded like the SR)
    viewer = write_viewer_sr(
        sources,
        reports,
        time_point=SrTimepoint(f"T{idx}", idx, fu.study_date),
        seg=seg_res.dataset if seg_res is not None else None,
        previous_versions=_previous_srs(sf, ctx.series_uid, ctx.job_id, viewer=True),
        series_description=f"{VIEWER_SERIES_DESCRIPTION} {label}",
    )
    viewer_path = save_new(viewer, out_dir) if viewer is not None else None
    drawn = _drawn_prior_seg(ctx, out_dir)
    files = [str(p) for p in (seg_path, sr_path, viewer_path) if p is not None]
    if drawn is not None and not drawn.prior_seg_reused and drawn.prior_seg:
        files.append(drawn.prior_seg)  # sent with the results, so the radiologist sees what will be tracked
    seg_uid = str(seg_res.dataset.SOPInstanceUID) if seg_res is not None else None
    _record(ctx, seg_res, files, out_dir)
    return WriteSegSrOutput(
        files=files,
        seg=str(seg_path) if seg_path else None,
        sr=str(sr_path) if sr_path else None,
        seg_sop_instance_uid=seg_uid,
        sr_sop_instance_uid=sr_uid,
        present=len(present),
        vanished=len(lesions) - len(present),
        viewer_sr=str(viewer_path) if viewer_path else None,
        viewer_sr_sop_instance_uid=str(viewer.SOPInstanceUID) if viewer is not None else None,
        **(drawn.model_dump() if drawn is not None else {}),
    )


def _write_measurement_sr(
    ctx: Ctx,
    sources: Sequence[Dataset],
    seg_res: SegWriteResult | None,
    reports: list[LesionReport],
    label: str,
    out_dir: Path,
) -> tuple[Path | None, str | None]:
    """The TID 1500 measurement report of this follow-up (none without a SEG to reference): its path and UID."""
    measured = ctx.state.need_measured()
    adoption = ctx.state.adoption
    assessment = measured.recist
    evidence = _prior_evidence(ctx)
    previous = _previous_srs(ctx.services.session_factory, ctx.series_uid, ctx.job_id)
    fu = ctx.outputs.get(MatchPriorsOutput).followup
    idx = measured.timepoint_index
    if seg_res is None:
        return None, None
    sr_res = write_sr(
        sources,
        seg_res,
        reports,
        time_point=SrTimepoint(f"T{idx}", idx, fu.study_date),
        recist=assessment.timepoints[idx],
        best_overall=assessment.best_overall_response,
        prior_evidence=evidence,
        previous_versions=previous,
        verified_by=adoption.verification.verified_by if adoption is not None else None,
        series_description=f"LesionTrack measurements {label}",
    )
    return save_new(sr_res.dataset, out_dir), str(sr_res.dataset.SOPInstanceUID)


def _record(ctx: Ctx, seg_res: SegWriteResult | None, files: list[str], out_dir: Path) -> None:
    """What this job wrote, in the database: the lesions' observations, the new-lesion search, our objects and a
    verification (which re-analyses the later follow-ups from the verified timepoint)."""
    seg_uid = str(seg_res.dataset.SOPInstanceUID) if seg_res is not None else None
    persist_observations(ctx, seg_uid, seg_res.segment_numbers if seg_res else {})
    persist_search(ctx, seg_uid, seg_res.segment_numbers if seg_res else {}, out_dir)
    record_our_objects(ctx.services.session_factory, [Path(f) for f in files])
    verification = persist_verification(ctx)
    if verification is not None:  # later follow-ups are re-analysed from the verified timepoint
        reanalyse_later(
            ctx.services.session_factory, verification, actor=ctx.worker, settings=ctx.services.settings.verification
        )


class _DrawnPriorSeg(BaseModel):
    prior_seg: str | None
    prior_seg_sop_instance_uid: str | None
    prior_seg_series_uid: str
    prior_seg_key: str
    prior_seg_revision: int
    prior_seg_reused: bool
    prior_seg_supersedes: str | None = None


def _drawn_prior_seg(ctx: Ctx, out_dir: Path) -> _DrawnPriorSeg | None:
    """The SEG of the prior lesions derived from a radiologist's drawing, on the prior study — issued once per
    derivation: the next follow-up of the same prior reuses it; a different derivation (another annotation, other
    masks) issues a new one that supersedes it (pipeline.jobs.derived_prior_seg)."""
    inputs = ctx.state.need_inputs()
    lesions = drawn_lesions(ctx.state.need_timepoints()[0].lesions)
    if not lesions or not inputs.prior.annotations:
        return None
    prior_uid = inputs.prior.ct_series_uid
    key = derivation_key(inputs.prior.annotations[0].sop_instance_uid, lesions)
    patient_pk = ctx.outputs.get(MatchPriorsOutput).followup.patient_pk
    with session_scope(ctx.services.session_factory) as s:
        earlier = earlier_drawn_prior_seg(s, patient_pk, prior_uid, exclude_job=ctx.job_id)
    if earlier is not None and earlier.key == key:
        return _DrawnPriorSeg(
            prior_seg=earlier.path,
            prior_seg_sop_instance_uid=earlier.sop_instance_uid,
            prior_seg_series_uid=prior_uid,
            prior_seg_key=key,
            prior_seg_revision=earlier.revision,
            prior_seg_reused=True,
        )
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in inputs.prior.ct_files]
    revision = 1 if earlier is None else earlier.revision + 1
    supersedes = None if earlier is None else earlier.sop_instance_uid
    res = write_drawn_prior_seg(sources, lesions, revision=revision, supersedes=supersedes, key=key)
    path = save_new(res.dataset, out_dir)
    return _DrawnPriorSeg(
        prior_seg=str(path),
        prior_seg_sop_instance_uid=str(res.dataset.SOPInstanceUID),
        prior_seg_series_uid=prior_uid,
        prior_seg_key=key,
        prior_seg_revision=revision,
        prior_seg_reused=False,
        prior_seg_supersedes=supersedes,
    )


def _lesion_reports(ctx: Ctx, lesions: list[TrackedLesion], candidates: list[TrackedLesion]) -> list[LesionReport]:
    """What the reports say about each lesion at the follow-up, the prior's unassessed lesions and our candidates."""
    inputs = ctx.state.need_inputs()
    measured = ctx.state.need_measured()
    adoption = ctx.state.adoption
    roles = {d.tracking_uid: d.role for d in measured.recist.selection.decisions}
    with session_scope(ctx.services.session_factory) as s:
        prior_verified = bool(verified_sop_uids(s, [a.sop_instance_uid for a in inputs.prior.annotations]))

    def provenance(les: TrackedLesion) -> str:
        if adoption is not None and les.meta.get("verified"):
            return "verified"
        return "from-verified" if prior_verified else "machine"

    prior_lesions = {les.identity.tracking_uid: les for les in ctx.state.need_timepoints()[0].lesions}
    reports = [
        LesionReport(
            measured.current[les.identity.tracking_uid],
            measured.changes.get(les.identity.tracking_uid),
            roles.get(les.identity.tracking_uid),
            _expected_centre(les),
            les.identity.description,
            provenance(les),
            review=bool(les.meta.get("review", False)) if (conf := lesion_confidence(les)) is not None else None,
            confidence=None if conf is None else conf.confidence,
            review_reasons=[] if conf is None else list(conf.reasons),
            prompt_origin=les.meta.get("prompt_origin"),
            prompt_object=les.meta.get("prompt_object"),
            drawn=drawn_diameters(
                prior_lesions.get(les.identity.tracking_uid), measured.prior.get(les.identity.tracking_uid)
            ),
        )
        for les in lesions
    ]
    reports += [_not_assessed_report(g) for g in inputs.not_assessed]
    followup_ct = ctx.state.need_timepoints()[1].ct
    reports += [LesionReport(_candidate_measurement(c, followup_ct)) for c in candidates]
    return reports


def _prior_evidence(ctx: Ctx) -> list[Dataset]:
    """The prior's annotation objects (DICOM evidence of the report)."""
    return [
        pydicom.dcmread(f, stop_before_pixels=True)
        for a in ctx.state.need_inputs().prior.annotations
        if a.modality != PROMPT_FILE  # a prompts JSON is no DICOM evidence
        for f in a.files
    ]


def _not_assessed_report(gap: UnassessedSegment) -> LesionReport:
    """A prior lesion that could not be assessed: reported as such (status "not evaluated", no measurement),
    flagged for review, with the reason — never left out of the result (issue 29)."""
    ident = gap.identity
    m = LesionMeasurement(
        ident.tracking_uid,
        ident.tracking_id,
        status=LesionStatus.NOT_EVALUATED,
        is_node=ident.is_node,
        anatomic_site=ident.anatomic_site,
    )
    return LesionReport(m, description=ident.description, review=True, not_assessed_reason=gap.reason)


def _candidate_lesions(lesions: list[TrackedLesion], search: CandidateSearch) -> list[TrackedLesion]:
    """New-lesion candidates as extra SEG segments (own Tracking UID, labelled as unconfirmed)."""
    label = max((les.identity.label for les in lesions), default=0)
    out = []
    for i, c in enumerate(search.candidates, start=1):
        ident = LesionIdentity(c.record.tracking_uid, c.record.tracking_id, label + i, anatomic_site=c.record.tissue)
        out.append(
            TrackedLesion(
                ident,
                LesionStatus.NEW,
                c.mask,
                engine=search.detector,
                engine_version=search.version,
                meta={"candidate": True, "contrast_hu": c.contrast_hu},
            )
        )
    return out


def _candidate_measurement(candidate: TrackedLesion, ct: Volume) -> LesionMeasurement:
    ident = candidate.identity
    return measure_lesion(
        candidate.mask,
        ct,
        tracking_uid=ident.tracking_uid,
        tracking_id=ident.tracking_id,
        status=LesionStatus.CANDIDATE,
        anatomic_site=ident.anatomic_site,
    )


def _expected_centre(lesion: TrackedLesion) -> tuple[float, float, float] | None:
    """Where a vanished lesion was looked for (its propagated centre), so the SR can point at it."""
    c = lesion.propagated_centre_mm
    if c is None:
        return None
    x, y, z = (float(v) for v in c)
    return (x, y, z)


def revision_label(revision: int, *, verified: bool = False) -> str:
    """The revision part of our objects' series descriptions: ``rev1``; a re-issued result carries the mark of what
    it supersedes (``rev2 supersedes rev1``) — the old instances cannot be changed, so the new ones say it, and a
    reader who sees both series in the viewer knows which one is current."""
    label = f"rev{revision}" + (" verified" if verified else "")
    return label + (f" supersedes rev{revision - 1}" if revision > 1 else "")


def _revision(sf: sessionmaker[Session], series_uid: str, job_id: int) -> int:
    """1 + the number of earlier jobs of this series that issued results: the new objects' series descriptions say
    which revision they are, so a viewer tells the current result from the superseded ones."""
    with session_scope(sf) as s:
        jobs = s.scalars(
            select(AnalysisJob).where(AnalysisJob.followup_series_uid == series_uid, AnalysisJob.id < job_id)
        ).all()
        return 1 + sum(
            1 for j in jobs if (w := read_output(j.step_outputs or {}, WriteSegSrOutput)) is not None and w.files
        )


def _previous_srs(sf: sessionmaker[Session], series_uid: str, job_id: int, *, viewer: bool = False) -> list[Dataset]:
    """The SR (``viewer``: the OHIF measurements SR) of the latest earlier job of this series that wrote one (the new
    one names it as its predecessor)."""
    with session_scope(sf) as s:
        jobs = s.scalars(
            select(AnalysisJob)
            .where(AnalysisJob.followup_series_uid == series_uid, AnalysisJob.id != job_id)
            .order_by(AnalysisJob.id)
        ).all()
        written = [w for j in jobs if (w := read_output(j.step_outputs or {}, WriteSegSrOutput)) is not None]
        paths = [w.viewer_sr if viewer else w.sr for w in written]
    out: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths if p and Path(p).is_file()]
    return out[-1:]
