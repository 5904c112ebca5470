"""The analysis steps of one follow-up series, one function each, in order (see :func:`build_pipeline`).

match_priors → retrieve_priors → load_volumes → register → track → measure → write_seg_sr → send.

Durable steps (match_priors, retrieve_priors, write_seg_sr, send) leave their results on disk or in the database
and return where; a resumed job starts after the last durable step whose results are still there. The others
hold volumes, registrations and masks in ``ctx.memory`` and are recomputed when needed. Re-running a step never
creates duplicates: write_seg_sr writes into a per-job folder it reuses, persists lesions/observations by
(lesion, series, job), and send reuses the deliveries already queued for the job.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.models import (
    AnalysisJob,
    Delivery,
    Instance,
    Lesion,
    LesionObservation,
    LesionOrigin,
    ObservationStatus,
    RoutingDecision,
    Series,
    SeriesState,
    Study,
)
from db.repository import audit
from db.session import session_scope
from pipeline.analysis import JobContext, Step
from pipeline.jobs import NothingToTrack, PermanentError, TransientError
from pipeline.ports import PriorAnnotation, PriorSource, PriorTimepoint, ResultSender

log = logging.getLogger(__name__)

SEG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}


@dataclass
class PipelineServices:
    settings: Settings
    session_factory: sessionmaker[Session]
    prior_source: PriorSource | None
    sender: ResultSender | None

    @property
    def results_root(self) -> Path:
        return Path(self.settings.data_dir) / "results"


def _svc(ctx: JobContext) -> PipelineServices:
    return ctx.services  # type: ignore[no-any-return]


# -- serialisation of the port records ----------------------------------------------------------------------------
def prior_to_json(p: PriorTimepoint) -> dict[str, Any]:
    d = asdict(p)
    d["ct_files"] = [str(f) for f in p.ct_files]
    d["annotations"] = [{**asdict(a), "files": [str(f) for f in a.files]} for a in p.annotations]
    return d


def prior_from_json(d: dict[str, Any]) -> PriorTimepoint:
    anns = [
        PriorAnnotation(a["sop_instance_uid"], a["sop_class_uid"], a["modality"], [Path(f) for f in a["files"]])
        for a in d.get("annotations", [])
    ]
    return PriorTimepoint(
        d["study_uid"],
        d.get("study_date"),
        d.get("study_time"),
        d["ct_series_uid"],
        [Path(f) for f in d.get("ct_files", [])],
        anns,
        d.get("source", "local"),
    )


def _followup_info(sf: sessionmaker[Session], series_uid: str) -> dict[str, Any]:
    with session_scope(sf) as s:
        row = s.execute(
            select(Series, Study)
            .join(Study, Series.study_pk == Study.id)
            .where(Series.series_instance_uid == series_uid)
        ).first()
        if row is None:
            raise PermanentError(f"follow-up series {series_uid} is not in the database")
        series, study = row
        files = [
            i.file_path
            for i in s.scalars(
                select(Instance).where(Instance.series_pk == series.id).order_by(Instance.instance_number, Instance.id)
            )
        ]
        return {
            "series_uid": series_uid,
            "study_uid": study.study_instance_uid,
            "study_date": study.study_date,
            "study_time": study.study_time,
            "patient_pk": study.patient_pk,
            "files": files,
            "modality": series.modality,
        }


def _sort_key(date: str | None, time: str | None) -> str:
    return f"{date or '00000000'}{(time or '').split('.')[0]:0<6}"


# -- 1. match priors ----------------------------------------------------------------------------------------------
def match_priors(ctx: JobContext) -> dict[str, Any]:
    svc = _svc(ctx)
    fu = _followup_info(svc.session_factory, ctx.series_uid)
    if not fu["files"]:
        raise PermanentError(f"follow-up series {ctx.series_uid} has no stored instances")
    if svc.prior_source is None:
        raise PermanentError("no prior source configured (dicom_node unavailable)")
    try:
        priors = svc.prior_source.find_priors(ctx.series_uid)
    except (NothingToTrack, PermanentError):
        raise
    except Exception as exc:
        raise TransientError(f"prior lookup failed: {type(exc).__name__}: {exc}") from exc
    fu_key = _sort_key(fu["study_date"], fu["study_time"])
    earlier = [
        p
        for p in priors
        if p.study_uid != fu["study_uid"]
        and p.ct_series_uid != ctx.series_uid
        and _sort_key(p.study_date, p.study_time) <= fu_key
    ]
    summary = [
        {
            "study_uid": p.study_uid,
            "study_date": p.study_date,
            "ct_series_uid": p.ct_series_uid,
            "annotations": [a.modality for a in p.annotations],
            "source": p.source,
        }
        for p in earlier
    ]
    if not earlier:
        raise NothingToTrack("no prior study of this patient")
    annotated = [p for p in earlier if p.annotations]
    if not annotated:
        raise NothingToTrack(
            f"no lesions marked on any of {len(earlier)} prior stud{'y' if len(earlier) == 1 else 'ies'}"
        )
    source = max(annotated, key=lambda p: _sort_key(p.study_date, p.study_time))
    segs = [a for a in source.annotations if a.modality == "SEG" or a.sop_class_uid in SEG_SOP_CLASSES]
    chosen = _newest(segs or source.annotations)
    source.annotations = [chosen]
    return {
        "followup": {k: v for k, v in fu.items() if k != "files"},
        "prior": prior_to_json(source),
        "priors_found": summary,
    }


def _newest(annotations: list[PriorAnnotation]) -> PriorAnnotation:
    """The most recent annotation (by content date/time where the file is at hand), e.g. our latest SEG."""
    import pydicom

    def key(item: tuple[int, PriorAnnotation]) -> tuple[str, int]:
        i, a = item
        if a.files and Path(a.files[0]).is_file():
            try:
                ds = pydicom.dcmread(
                    a.files[0],
                    stop_before_pixels=True,
                    specific_tags=["ContentDate", "ContentTime", "SeriesDate", "SeriesTime"],
                )
                return (f"{ds.get('ContentDate', ds.get('SeriesDate', ''))}{ds.get('ContentTime', '')}", i)
            except Exception:
                pass
        return ("", i)

    return max(enumerate(annotations), key=key)[1]


# -- 2. retrieve priors -------------------------------------------------------------------------------------------
def retrieve_priors(ctx: JobContext) -> dict[str, Any]:
    svc = _svc(ctx)
    assert svc.prior_source is not None
    prior = prior_from_json(ctx.outputs["match_priors"]["prior"])
    try:
        filled = svc.prior_source.retrieve(prior)
    except Exception as exc:
        raise TransientError(f"retrieving prior study {prior.study_uid} failed: {type(exc).__name__}: {exc}") from exc
    missing = [str(f) for f in filled.ct_files if not Path(f).is_file()]
    if not filled.ct_files or missing:
        raise TransientError(
            f"prior CT series {prior.ct_series_uid} incomplete after retrieval "
            f"({len(filled.ct_files)} files, {len(missing)} missing)"
        )
    for a in filled.annotations:
        if not a.files or not all(Path(f).is_file() for f in a.files):
            raise TransientError(f"prior {a.modality} {a.sop_instance_uid} not retrieved")
    return {"prior": prior_to_json(filled), "ct_files": len(filled.ct_files)}


def _retrieved_still_there(out: dict[str, Any]) -> bool:
    p = prior_from_json(out["prior"])
    return (
        bool(p.ct_files)
        and all(Path(f).is_file() for f in p.ct_files)
        and all(Path(f).is_file() for a in p.annotations for f in a.files)
    )


# -- 3. load volumes and prompts ----------------------------------------------------------------------------------
def load_volumes(ctx: JobContext) -> dict[str, Any]:
    from models.imaging.dicom_read import SeriesError, read_series

    svc = _svc(ctx)
    fu = _followup_info(svc.session_factory, ctx.series_uid)
    prior = prior_from_json(ctx.outputs["retrieve_priors"]["prior"])
    try:
        followup_ct = read_series([Path(f) for f in fu["files"]], series_uid=ctx.series_uid)
    except SeriesError as exc:
        raise PermanentError(f"follow-up series {ctx.series_uid}: {exc}") from exc
    try:
        prior_ct = read_series(prior.ct_files, series_uid=prior.ct_series_uid)
    except SeriesError as exc:
        raise PermanentError(f"prior series {prior.ct_series_uid}: {exc}") from exc
    prompts = _read_prompts(prior, prior_ct)
    if not prompts:
        raise NothingToTrack(
            f"the prior {prior.annotations[0].modality} {prior.annotations[0].sop_instance_uid} marks no lesion"
        )
    ctx.memory.update(
        followup_ct=followup_ct,
        prior_ct=prior_ct,
        prompts=prompts,
        prior=prior,
        followup_files=[Path(f) for f in fu["files"]],
    )
    return {
        "followup_shape": list(followup_ct.shape),
        "followup_spacing": [round(float(v), 4) for v in followup_ct.spacing],
        "prior_shape": list(prior_ct.shape),
        "prompts": len(prompts),
        "lesions": [
            {"tracking_uid": p.identity.tracking_uid, "tracking_id": p.identity.tracking_id, "kind": p.kind.value}
            for p in prompts
        ],
    }


def _read_prompts(prior: PriorTimepoint, prior_ct: Any) -> list[Any]:
    ann = prior.annotations[0]
    files = [Path(f) for f in ann.files]
    from pipeline.prompt_sources import PromptSourceError, prompts_from_seg, prompts_from_sr

    try:
        if ann.modality == "SEG" or ann.sop_class_uid in SEG_SOP_CLASSES:
            return list(prompts_from_seg(files[0], prior_ct))
        return list(prompts_from_sr(files[0], prior_ct))
    except PromptSourceError as exc:
        raise PermanentError(f"prior {ann.modality} {files[0]}: {exc}") from exc


# -- 4. register --------------------------------------------------------------------------------------------------
def register(ctx: JobContext) -> dict[str, Any]:
    from pipeline.tracking import get_registration_engine

    svc = _svc(ctx)
    name = svc.settings.engines.registration
    engine = (
        get_registration_engine(name)
        if name == "none"
        else get_registration_engine(
            name, settings=svc.settings.engines, device=ctx.device, seed=svc.settings.compute.seed
        )
    )
    reg = engine.register(ctx.memory["prior_ct"], ctx.memory["followup_ct"])
    ctx.memory["registration"] = reg
    q = reg.quality
    return {
        "engine": getattr(engine, "name", svc.settings.engines.registration),
        "version": getattr(engine, "version", ""),
        "device": q.device,
        "similarity": q.similarity_metric,
        "before": q.similarity_before,
        "after": q.similarity_after,
        "folding_fraction": q.folding_fraction,
        "stage_seconds": dict(q.stage_seconds),
    }


class _Precomputed:
    """Hands the tracking loop the registration computed by the register step."""

    def __init__(self, reg: Any, name: str) -> None:
        self.reg, self.name, self.version = reg, name, ""

    def register(self, baseline: Any, followup: Any) -> Any:
        return self.reg


# -- 5. track -----------------------------------------------------------------------------------------------------
def track(ctx: JobContext) -> dict[str, Any]:
    from models.segmentation.base import get_engine as get_seg_engine
    from pipeline.lesions import Timepoint
    from pipeline.tracking import track_lesions

    svc = _svc(ctx)
    eng = svc.settings.engines
    weights = (
        eng.lesionlocator_weights
        if eng.segmentation == "lesionlocator"
        else (eng.nninteractive_weights if eng.segmentation == "nninteractive" else None)
    )
    seg = get_seg_engine(eng.segmentation, weights=weights, device=ctx.device)
    prior: PriorTimepoint = ctx.memory["prior"]
    fu = ctx.outputs["match_priors"]["followup"]
    tps = [
        Timepoint(prior.ct_series_uid, ctx.memory["prior_ct"], prior.study_date, prior.study_uid),
        Timepoint(ctx.series_uid, ctx.memory["followup_ct"], fu["study_date"], fu["study_uid"]),
    ]
    track_lesions(
        tps,
        ctx.memory["prompts"],
        source_index=0,
        registration=_Precomputed(ctx.memory["registration"], "precomputed"),
        segmentation=seg,
    )
    tps[1].lesions.extend(_vanished_earlier(svc.session_factory, fu["patient_pk"], tps, ctx.memory["registration"]))
    ctx.memory["timepoints"] = tps
    return {
        "engine": seg.name,
        "version": seg.version,
        "lesions": [
            {
                "tracking_uid": l.identity.tracking_uid,
                "tracking_id": l.identity.tracking_id,
                "status": l.status.value,
                "notes": list(l.notes),
            }
            for l in tps[1].lesions
        ],
    }


def _vanished_earlier(sf: sessionmaker[Session], patient_pk: int | None, tps: list[Any], reg: Any) -> list[Any]:
    """Lesions of this patient that had vanished before the prior (so our prior SEG has no segment for them):
    they stay in the report as vanished, at their last known position, instead of silently dropping out."""
    import numpy as np

    from models.segmentation.prompts import LesionIdentity
    from pipeline.lesions import LesionStatus, TrackedLesion

    if patient_pk is None:
        return []
    tracked = {l.identity.tracking_uid for tp in tps for l in tp.lesions}
    labels = [l.identity.label for tp in tps for l in tp.lesions]
    next_label = max(labels, default=0) + 1
    out = []
    with session_scope(sf) as s:
        for lesion in s.scalars(select(Lesion).where(Lesion.patient_pk == patient_pk).order_by(Lesion.id)):
            if lesion.tracking_uid in tracked:
                continue
            obs = s.scalars(
                select(LesionObservation).where(LesionObservation.lesion_pk == lesion.id).order_by(LesionObservation.id)
            ).all()
            if not obs or obs[-1].status is not ObservationStatus.VANISHED:
                continue
            seen = [o for o in obs if o.centre_x_mm is not None]
            centre = None
            if seen:
                last = np.array([[seen[-1].centre_x_mm, seen[-1].centre_y_mm, seen[-1].centre_z_mm]], float)
                centre = np.asarray(reg.map_points_to_followup(last), float)[0]
            ident = LesionIdentity(
                lesion.tracking_uid, lesion.tracking_id, next_label, anatomic_site=lesion.anatomic_site
            )
            next_label += 1
            empty = tps[1].ct.with_array(np.zeros(tps[1].ct.shape, np.uint8))
            out.append(
                TrackedLesion(
                    ident,
                    LesionStatus.VANISHED,
                    empty,
                    engine="",
                    propagated_centre_mm=centre,
                    notes=["vanished before the prior timepoint; not re-segmented"],
                )
            )
    return out


# -- 6. measure ---------------------------------------------------------------------------------------------------
def _history(sf: sessionmaker[Session], patient_pk: int | None, exclude_series: set[str]) -> dict[str, Any]:
    """Earlier observations per lesion (latest per series), ordered by study date: {uid: [(key, meas)]}."""
    from pipeline.measurements import LesionMeasurement

    out: dict[str, dict[str, tuple[str, int, LesionMeasurement]]] = {}
    if patient_pk is None:
        return {}
    with session_scope(sf) as s:
        rows = s.execute(
            select(LesionObservation, Lesion.tracking_uid, Study.study_date, Study.study_time)
            .join(Lesion, LesionObservation.lesion_pk == Lesion.id)
            .join(Series, Series.series_instance_uid == LesionObservation.series_instance_uid)
            .join(Study, Series.study_pk == Study.id)
            .where(Lesion.patient_pk == patient_pk)
        ).all()
        for obs, uid, date, time in rows:
            if obs.series_instance_uid in exclude_series or not obs.measurements:
                continue
            key = _sort_key(date, time)
            prev = out.setdefault(uid, {}).get(obs.series_instance_uid)
            if prev is None or obs.id > prev[1]:
                out[uid][obs.series_instance_uid] = (key, obs.id, LesionMeasurement.from_dict(obs.measurements))
    return {uid: sorted(((k, m) for k, _i, m in v.values()), key=lambda t: t[0]) for uid, v in out.items()}


def measure(ctx: JobContext) -> dict[str, Any]:
    from pipeline.measurements import lesion_changes, measure_lesion
    from pipeline.recist import RecistLesion, RecistRules, assess

    svc = _svc(ctx)
    fu = ctx.outputs["match_priors"]["followup"]
    prior: PriorTimepoint = ctx.memory["prior"]
    tps = ctx.memory["timepoints"]
    fu_key = _sort_key(fu["study_date"], fu["study_time"])
    prior_key = _sort_key(prior.study_date, prior.study_time)
    history = _history(svc.session_factory, fu["patient_pk"], exclude_series={ctx.series_uid})
    prior_meas = {}
    for les in tps[0].lesions:
        ident = les.identity
        prior_meas[ident.tracking_uid] = measure_lesion(
            les.mask,
            tps[0].ct,
            tracking_uid=ident.tracking_uid,
            tracking_id=ident.tracking_id,
            is_node=ident.is_node,
            status=les.status.value,
            series_uid=prior.ct_series_uid,
            anatomic_site=ident.anatomic_site,
        )
    current = {}
    changes = {}
    for les in tps[1].lesions:
        ident = les.identity
        m = measure_lesion(
            les.mask,
            tps[1].ct,
            tracking_uid=ident.tracking_uid,
            tracking_id=ident.tracking_id,
            is_node=ident.is_node,
            status=les.status.value,
            series_uid=ctx.series_uid,
            anatomic_site=ident.anatomic_site,
        )
        current[ident.tracking_uid] = m
        hist = dict(history.get(ident.tracking_uid, []))
        hist.setdefault(prior_key, prior_meas.get(ident.tracking_uid))
        seq = [hist[k] for k in sorted(hist) if k < fu_key] + [m]
        changes[ident.tracking_uid] = lesion_changes(seq)
    # RECIST over every timepoint seen for this patient: earlier observations + the prior + this follow-up
    by_tp: dict[str, dict[str, Any]] = {}
    for uid, entries in history.items():
        for key, meas in entries:
            if key < fu_key:
                by_tp.setdefault(key, {})[uid] = meas
    for uid, meas in prior_meas.items():
        by_tp.setdefault(prior_key, {}).setdefault(uid, meas)
    by_tp[fu_key] = dict(current)
    keys = sorted(by_tp)
    series_of = [next(iter(by_tp[k].values())).series_uid if by_tp[k] else None for k in keys]
    rec_tps = [[RecistLesion.from_measurement(m) for m in by_tp[k].values()] for k in keys]
    assessment = assess(
        rec_tps, RecistRules.from_settings(svc.settings.recist), slice_thickness_mm=float(tps[0].ct.spacing[2])
    )
    ctx.memory.update(
        measurements=current,
        prior_measurements=prior_meas,
        changes=changes,
        recist=assessment,
        timepoint_index=len(keys) - 1,
        baseline_date=keys[0][:8],
    )
    last = assessment.timepoints[-1]
    return {
        "timepoints": [{"key": k, "series_uid": su} for k, su in zip(keys, series_of)],
        "lesions": [{**current[u].to_dict(), "changes": changes[u].to_dict() if changes[u] else None} for u in current],
        "recist": {
            "overall_response": last.overall_response.value,
            "target_response": last.target_response.value,
            "sum_of_diameters_mm": last.sum_of_diameters_mm,
            "change_from_baseline_pct": last.change_from_baseline_pct,
            "best_overall_response": assessment.best_overall_response.value,
            "targets": assessment.selection.targets,
        },
    }


# -- 7. write SEG + SR, persist lesions and observations ----------------------------------------------------------
def write_seg_sr(ctx: JobContext) -> dict[str, Any]:
    import pydicom
    from pydicom.uid import generate_uid

    from pipeline.seg_writer import save_new, write_seg
    from pipeline.sr_writer import LesionReport, TimePoint, write_sr

    svc = _svc(ctx)
    out_dir = svc.results_root / f"job-{ctx.job_id}" / f"attempt-{ctx.attempt}"
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in ctx.memory["followup_files"]]
    tps = ctx.memory["timepoints"]
    lesions = tps[1].lesions
    present = [l for l in lesions if l.status.value != "vanished" and l.mask.array.any()]
    seg_path = None
    seg_res = None
    seg_series = generate_uid()
    if present:
        seg_res = write_seg(sources, lesions, series_instance_uid=seg_series)
        seg_path = save_new(seg_res.dataset, out_dir)
    assessment = ctx.memory["recist"]
    roles = {d.tracking_uid: d.role for d in assessment.selection.decisions}
    reports = [
        LesionReport(
            ctx.memory["measurements"][l.identity.tracking_uid],
            ctx.memory["changes"].get(l.identity.tracking_uid),
            roles.get(l.identity.tracking_uid),
            _expected_centre(l),
            l.identity.description,
        )
        for l in lesions
    ]
    prior: PriorTimepoint = ctx.memory["prior"]
    evidence = [pydicom.dcmread(f, stop_before_pixels=True) for a in prior.annotations for f in a.files]
    previous = _previous_srs(svc.session_factory, ctx.series_uid, ctx.job_id)
    fu = ctx.outputs["match_priors"]["followup"]
    idx = ctx.memory["timepoint_index"]
    sr_path = None
    if seg_res is not None:
        sr_res = write_sr(
            sources,
            seg_res,
            reports,
            time_point=TimePoint(f"T{idx}", idx, fu["study_date"]),
            recist=assessment.timepoints[-1],
            best_overall=assessment.best_overall_response,
            prior_evidence=evidence,
            previous_versions=previous,
        )
        sr_path = save_new(sr_res.dataset, out_dir)
    files = [str(p) for p in (seg_path, sr_path) if p is not None]
    seg_uid = str(seg_res.dataset.SOPInstanceUID) if seg_res is not None else None
    _persist(svc.session_factory, ctx, seg_uid, seg_res.segment_numbers if seg_res else {})
    _record_our_objects(svc, [Path(f) for f in files])
    return {
        "files": files,
        "seg": str(seg_path) if seg_path else None,
        "sr": str(sr_path) if sr_path else None,
        "seg_sop_instance_uid": seg_uid,
        "present": len(present),
        "vanished": len(lesions) - len(present),
    }


def _expected_centre(lesion: Any) -> tuple[float, float, float] | None:
    """Where a vanished lesion was looked for (its propagated centre), so the SR can point at it."""
    c = lesion.propagated_centre_mm
    if c is None:
        return None
    c = [float(v) for v in c]
    return (c[0], c[1], c[2])


def _previous_srs(sf: sessionmaker[Session], series_uid: str, job_id: int) -> list[Any]:
    import pydicom

    out = []
    with session_scope(sf) as s:
        jobs = s.scalars(
            select(AnalysisJob)
            .where(AnalysisJob.followup_series_uid == series_uid, AnalysisJob.id != job_id)
            .order_by(AnalysisJob.id)
        ).all()
        paths = [(j.step_outputs or {}).get("write_seg_sr", {}).get("sr") for j in jobs]
    for p in paths:
        if p and Path(p).is_file():
            out.append(pydicom.dcmread(p, stop_before_pixels=True))
    return out[-1:]


def _persist(sf: sessionmaker[Session], ctx: JobContext, seg_uid: str | None, segment_numbers: dict[str, int]) -> None:
    """Lesions (by Tracking UID) and this job's observations of them; a re-run replaces this job's rows only."""
    fu = ctx.outputs["match_priors"]["followup"]
    prior: PriorTimepoint = ctx.memory["prior"]
    tps = ctx.memory["timepoints"]
    with session_scope(sf) as s:
        s.execute(delete(LesionObservation).where(LesionObservation.job_pk == ctx.job_id))
        patient_pk = fu["patient_pk"]
        if patient_pk is None:
            raise PermanentError(f"series {ctx.series_uid} has no patient")
        for tp_index, tp in enumerate(tps):
            measurements = ctx.memory["prior_measurements"] if tp_index == 0 else ctx.memory["measurements"]
            for les in tp.lesions:
                ident = les.identity
                lesion = s.scalar(select(Lesion).where(Lesion.tracking_uid == ident.tracking_uid))
                if lesion is None:
                    origin = (
                        LesionOrigin.NEW
                        if les.status.value == "new"
                        else (LesionOrigin.SEG if prior.annotations[0].modality == "SEG" else LesionOrigin.SR)
                    )
                    lesion = Lesion(
                        tracking_uid=ident.tracking_uid,
                        tracking_id=ident.tracking_id,
                        patient_pk=patient_pk,
                        anatomic_site=ident.anatomic_site,
                        origin=origin,
                        origin_series_uid=prior.ct_series_uid,
                    )
                    s.add(lesion)
                    s.flush()
                    audit(
                        s,
                        ctx.worker,
                        "lesion.created",
                        "lesion",
                        lesion.id,
                        tracking_uid=ident.tracking_uid,
                        job_id=ctx.job_id,
                    )
                if tp_index == 0:
                    known = s.scalar(
                        select(LesionObservation.id).where(
                            LesionObservation.lesion_pk == lesion.id,
                            LesionObservation.series_instance_uid == tp.series_uid,
                        )
                    )
                    if known is not None:
                        continue  # the prior was measured already (by the job that analysed it)
                m = measurements[ident.tracking_uid]
                changes = ctx.memory["changes"].get(ident.tracking_uid) if tp_index == 1 else None
                data = m.to_dict()
                if changes is not None:
                    data["changes"] = changes.to_dict()
                rec = ctx.memory["recist"]
                data["recist"] = {"role": rec.selection.role_of(ident.tracking_uid)}
                if tp_index == 1:
                    data["recist"]["overall_response"] = rec.timepoints[-1].overall_response.value
                s.add(
                    LesionObservation(
                        lesion_pk=lesion.id,
                        series_instance_uid=tp.series_uid,
                        job_pk=ctx.job_id,
                        seg_sop_instance_uid=seg_uid if tp_index == 1 else prior.annotations[0].sop_instance_uid,
                        segment_number=segment_numbers.get(ident.tracking_uid) if tp_index == 1 else None,
                        volume_mm3=m.volume_mm3,
                        long_axis_mm=m.long_axis_mm,
                        short_axis_mm=m.short_axis_mm,
                        centre_x_mm=m.centre_mm[0] if m.centre_mm else None,
                        centre_y_mm=m.centre_mm[1] if m.centre_mm else None,
                        centre_z_mm=m.centre_mm[2] if m.centre_mm else None,
                        status=ObservationStatus(les.status.value),
                        engine=les.engine or None,
                        engine_version=(les.engine_version or None),
                        measurements=data,
                    )
                )


def _record_our_objects(svc: PipelineServices, files: list[Path]) -> None:
    """Our SEG/SR become local instances too (so the next follow-up finds them as priors), marked as ours."""
    import pydicom

    from db.repository import get_or_create_patient, get_or_create_series, get_or_create_study

    with session_scope(svc.session_factory) as s:
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            patient = get_or_create_patient(s, str(ds.get("PatientID", "")), ds.get("IssuerOfPatientID") or None)
            study = get_or_create_study(
                s, patient, str(ds.StudyInstanceUID), study_date=ds.get("StudyDate"), study_time=ds.get("StudyTime")
            )
            series = get_or_create_series(
                s,
                study,
                str(ds.SeriesInstanceUID),
                modality=str(ds.Modality),
                series_number=int(ds.get("SeriesNumber") or 0) or None,
                series_description=str(ds.get("SeriesDescription", ""))[:64] or None,
            )
            series.created_by_us = True
            series.state = SeriesState.COMPLETE
            series.routing_decision = RoutingDecision.SKIP
            series.routing_reason = "created by LesionTrack"
            if s.scalar(select(Instance.id).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))) is None:
                data = Path(f).read_bytes()
                s.add(
                    Instance(
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        sop_class_uid=str(ds.SOPClassUID),
                        series_pk=series.id,
                        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                        file_path=str(f),
                        size_bytes=len(data),
                        sha256=_dataset_sha256(data),
                        instance_number=int(ds.get("InstanceNumber") or 1),
                    )
                )
                series.instance_count = (series.instance_count or 0) + 1


def _dataset_sha256(part10: bytes) -> str:
    """SHA-256 of the dataset after the file meta — what the SCP records for a received instance, so our own
    SEG/SR coming back from the PACS (e.g. with a prior retrieval) is recognised as the same bytes."""
    import hashlib
    from io import BytesIO

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = BytesIO(part10)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return hashlib.sha256(part10[fp.tell() :]).hexdigest()


def _written_still_there(out: dict[str, Any]) -> bool:
    return all(Path(f).is_file() for f in out.get("files", []))


# -- 8. send ------------------------------------------------------------------------------------------------------
def send(ctx: JobContext) -> dict[str, Any]:
    svc = _svc(ctx)
    files = ctx.outputs["write_seg_sr"]["files"]
    if not files:
        return {"deliveries": [], "note": "nothing to send"}
    if not svc.settings.sending.destinations:
        return {"deliveries": [], "note": "no destinations configured (sending.destinations)"}
    with session_scope(svc.session_factory) as s:
        existing = [
            d.id
            for d in s.scalars(select(Delivery).where(Delivery.job_pk == ctx.job_id))
            if list(d.file_paths) == list(files)
        ]
    if existing:
        return {"deliveries": existing, "reused": True}
    if svc.sender is None:
        raise PermanentError("no result sender configured (dicom_node unavailable)")
    ids = svc.sender.send([Path(f) for f in files], job_id=ctx.job_id)
    return {"deliveries": list(ids), "destinations": list(svc.settings.sending.destinations)}


def build_pipeline(
    settings: Settings,
    session_factory: sessionmaker[Session],
    prior_source: PriorSource | None = None,
    sender: ResultSender | None = None,
) -> tuple[list[Step], PipelineServices]:
    steps = [
        Step("match_priors", match_priors, durable=True),
        Step("retrieve_priors", retrieve_priors, durable=True, still_valid=_retrieved_still_there),
        Step("load_volumes", load_volumes),
        Step("register", register),
        Step("track", track),
        Step("measure", measure),
        Step("write_seg_sr", write_seg_sr, durable=True, still_valid=_written_still_there),
        Step("send", send, durable=True),
    ]
    return steps, PipelineServices(settings, session_factory, prior_source, sender)


STEP_NAMES = ["match_priors", "retrieve_priors", "load_volumes", "register", "track", "measure", "write_seg_sr", "send"]
