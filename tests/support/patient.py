"""A longitudinal patient in the database the way the pipeline leaves it (SEG + SR written, lesions measured,
RECIST assessed), for the API, dashboard, exports and viewer tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import (
    AnalysisJob,
    Delivery,
    DeliveryState,
    Instance,
    JobState,
    Lesion,
    LesionObservation,
    LesionOrigin,
    NewLesionSearchRun,
    RoutingDecision,
    SeriesState,
)
from lesiontrack.db.repository import audit, get_or_create_patient, get_or_create_series, get_or_create_study
from lesiontrack.db.session import session_scope
from lesiontrack.db.status import LesionStatus
from lesiontrack.demo_data import DemoPatient, FollowUps, make_patient
from lesiontrack.pipeline.jobs.contract import WriteSegSrOutput
from lesiontrack.pipeline.jobs.steps.measure import measure_timepoint

#: what a radiologist wrote on the baseline SEG (SegmentDescription), by site: carried into our SEG labels and SR
RADIOLOGIST_WORDS = {
    "lung": "spiculated nodule right upper lobe",
    "liver": "hypodense lesion segment VIII",
    "lymph node": "enlarged right paratracheal node",
    "soft tissue": "subcutaneous nodule left flank",
}


@dataclass
class BuiltTimepoint:
    index: int
    series_uid: str
    study_uid: str
    study_date: str
    seg_path: Path | None
    sr_path: Path | None
    ct_files: list[Path]
    job_id: int | None
    measurements: dict[str, Any] = field(default_factory=dict)  # tracking UID → LesionMeasurement


@dataclass
class BuiltPatient:
    patient_pk: int
    patient_id: str
    timepoints: list[BuiltTimepoint]
    lesion_ids: dict[str, int]  # tracking UID → lesion id
    failed_job_id: int | None = None


def _register_instances(s: Session, series_pk: int, files: list[Path], sender: str = "TESTPACS") -> None:
    for f in files:
        data = f.read_bytes()
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        s.add(
            Instance(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_pk=series_pk,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                file_path=str(f),
                size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                instance_number=int(ds.get("InstanceNumber", 0) or 0),
                sender_ae=sender,
            )
        )


def _last_centre(history: list) -> tuple[float, float, float] | None:
    """Where a lesion was last seen (a vanished lesion's SR group is anchored there)."""
    for m in reversed(history):
        if m is not None and m.centre_mm is not None:
            c = m.centre_mm
            return (float(c[0]), float(c[1]), float(c[2]))
    return None


def _add_failed_job(
    session_factory: sessionmaker[Session], built: list[BuiltTimepoint], patient_pk: int, t0: datetime
) -> int:
    """A failed job on the last follow-up (registration diverged) and its deliveries, one dead-lettered."""
    with session_scope(session_factory) as s:
        job = AnalysisJob(
            followup_series_uid=built[-1].series_uid,
            patient_pk=patient_pk,
            state=JobState.FAILED,
            step="register",
            attempts=5,
            worker="test-worker",
            error=f"PermanentError: registration diverged (NCC 0.12 < 0.30) for series {built[-1].series_uid}",
            step_timings={"load": 1.1, "priors": 0.4},
            step_outputs={},
            created_at=t0 + timedelta(days=200),
            finished_at=t0 + timedelta(days=200, minutes=3),
        )
        s.add(job)
        s.flush()
        audit(s, "test-worker", "job.state", "job", job.id, to="failed")
        s.add(
            Delivery(
                job_pk=built[-1].job_id,
                destination="main-pacs",
                file_paths=[str(built[-1].sr_path)],
                state=DeliveryState.DELIVERED,
                attempts=2,
            )
        )
        s.add(
            Delivery(
                job_pk=built[-1].job_id,
                destination="backup-pacs",
                file_paths=[str(built[-1].sr_path)],
                state=DeliveryState.DEAD_LETTER,
                attempts=4,
                last_error="association rejected",
            )
        )
        return job.id


def build_patient(
    session_factory: sessionmaker[Session],
    timepoints: list,
    out_dir: Path,
    *,
    patient_id: str = "LT-TEST-1",
    with_failed_job: bool = True,
) -> BuiltPatient:
    """Measure, assess, write SEG+SR for each timepoint (``tests.support.segsr.SyntheticTimepoint``-like objects
    with ``ct``, ``datasets``, ``files``, ``lesions``, ``study_uid``, ``series_uid``) and persist everything."""
    from lesiontrack.pipeline.dicom.seg.writer import save_new, write_seg
    from lesiontrack.pipeline.dicom.sr.writer import LesionReport, SrTimepoint, write_sr
    from lesiontrack.pipeline.science.measurements import lesion_changes
    from lesiontrack.pipeline.science.recist import NewLesionSearch, RecistLesion, assess

    history: dict[str, list] = {}
    per_tp_recist: list[list[RecistLesion]] = []
    built: list[BuiltTimepoint] = []
    lesion_ids: dict[str, int] = {}
    t0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    for t, tp in enumerate(timepoints):
        study_date = str(tp.datasets[0].StudyDate)
        meas = measure_timepoint(tp)
        for uid in set(history) | set(meas):
            history.setdefault(uid, [None] * t).append(meas.get(uid))
        per_tp_recist.append([RecistLesion.from_measurement(m) for m in meas.values()])
        assessment = assess(per_tp_recist, new_lesion_search=[NewLesionSearch(True)] * len(per_tp_recist))
        resp = assessment.timepoints[-1]
        seg = write_seg(tp.datasets, tp.lesions)
        reports = [
            LesionReport(
                m,
                lesion_changes(history[uid]),
                assessment.selection.role_of(uid),
                expected_centre_mm=_last_centre(history[uid]),
            )
            for uid, m in meas.items()
        ]
        sr = write_sr(
            tp.datasets,
            seg,
            reports,
            time_point=SrTimepoint(f"T{t}", t, study_date),
            recist=resp,
            best_overall=assessment.best_overall_response if t > 0 else None,
        )
        results = out_dir / "results" / f"tp{t}"
        seg_path = save_new(seg.dataset, results)
        sr_path = save_new(sr.dataset, results)

        with session_scope(session_factory) as s:
            ds0 = tp.datasets[0]
            patient = get_or_create_patient(s, patient_id, None)
            study = get_or_create_study(
                s,
                patient,
                tp.study_uid,
                study_date=study_date,
                study_time=str(ds0.get("StudyTime", "")) or None,
                accession_number=str(ds0.get("AccessionNumber", "")) or None,
            )
            ct = get_or_create_series(
                s,
                study,
                tp.series_uid,
                modality="CT",
                series_number=int(ds0.get("SeriesNumber", 1) or 1),
                series_description=str(ds0.get("SeriesDescription", "")),
                frame_of_reference_uid=str(ds0.FrameOfReferenceUID),
                state=SeriesState.COMPLETE,
                instance_count=len(tp.files),
                routing_decision=RoutingDecision.ANALYSE,
                routing_reason="CT, enough slices",
                completed_at=t0 + timedelta(days=90 * t),
            )
            _register_instances(s, ct.id, list(tp.files))
            for path, modality in ((seg_path, "SEG"), (sr_path, "SR")):
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                ours = get_or_create_series(
                    s,
                    study,
                    ds.SeriesInstanceUID,
                    modality=modality,
                    series_number=int(ds.SeriesNumber),
                    series_description=str(ds.get("SeriesDescription", "")),
                    state=SeriesState.COMPLETE,
                    instance_count=1,
                    routing_decision=RoutingDecision.SKIP,
                    routing_reason="created by us",
                    created_by_us=True,
                )
                _register_instances(s, ours.id, [path], sender="LESIONTRACK")
            job_id = None
            if t > 0:
                start = t0 + timedelta(days=90 * t, minutes=5)
                job = AnalysisJob(
                    followup_series_uid=tp.series_uid,
                    patient_pk=patient.id,
                    state=JobState.DONE,
                    step="send",
                    attempts=1,
                    worker="test-worker",
                    step_timings={
                        "load": 1.25,
                        "priors": 0.5,
                        "register": 31.4,
                        "segment": 12.75,
                        "measure": 0.8,
                        "write": 1.1,
                        "send": 0.4,
                    },
                    step_outputs={
                        WriteSegSrOutput.step: WriteSegSrOutput(
                            files=[],
                            seg=None,
                            sr=None,
                            seg_sop_instance_uid=str(seg.dataset.SOPInstanceUID),
                            sr_sop_instance_uid=str(sr.dataset.SOPInstanceUID),
                            present=len(tp.lesions),
                            vanished=0,
                        ).model_dump(mode="json")
                    },
                    created_at=start,
                    started_at=start,
                    finished_at=start + timedelta(seconds=48),
                )
                s.add(job)
                s.flush()
                job_id = job.id
                # the follow-up was searched for new lesions and none were found (what the SR above states)
                s.add(
                    NewLesionSearchRun(
                        series_instance_uid=tp.series_uid,
                        job_pk=job.id,
                        detector="subtraction",
                        detector_version="1.0",
                        candidates_found=0,
                    )
                )
                audit(s, "test-worker", "job.created", "job", job.id, series_uid=tp.series_uid)
                audit(s, "test-worker", "job.state", "job", job.id, to="done")
            for les in tp.lesions:
                ident = les.identity
                lesion = s.query(Lesion).filter_by(tracking_uid=ident.tracking_uid).one_or_none()
                if lesion is None:
                    lesion = Lesion(
                        tracking_uid=ident.tracking_uid,
                        tracking_id=ident.tracking_id,
                        patient_pk=patient.id,
                        anatomic_site=ident.anatomic_site,
                        origin=LesionOrigin.SEG if t == 0 else LesionOrigin.NEW,
                        origin_series_uid=tp.series_uid,
                    )
                    s.add(lesion)
                    s.flush()
                lesion_ids[ident.tracking_uid] = lesion.id
                m = meas[ident.tracking_uid]
                c = m.centre_mm or (None, None, None)
                s.add(
                    LesionObservation(
                        lesion_pk=lesion.id,
                        series_instance_uid=tp.series_uid,
                        job_pk=job_id,
                        seg_sop_instance_uid=seg.dataset.SOPInstanceUID
                        if ident.tracking_uid in seg.segment_numbers
                        else None,
                        segment_number=seg.segment_numbers.get(ident.tracking_uid),
                        volume_mm3=m.volume_mm3,
                        long_axis_mm=m.long_axis_mm,
                        short_axis_mm=m.short_axis_mm,
                        centre_x_mm=c[0],
                        centre_y_mm=c[1],
                        centre_z_mm=c[2],
                        status=LesionStatus(m.status),
                        engine=les.engine or "test-engine",
                        engine_version=les.engine_version or "1.0",
                        measurements=m.to_dict(),
                    )
                )
            patient_pk = patient.id
        built.append(
            BuiltTimepoint(t, tp.series_uid, tp.study_uid, study_date, seg_path, sr_path, list(tp.files), job_id, meas)
        )
    failed = _add_failed_job(session_factory, built, patient_pk, t0) if with_failed_job else None
    return BuiltPatient(patient_pk, patient_id, built, lesion_ids, failed)


def synthetic_patient(session_factory: sessionmaker[Session], tmp: Path, **kw: Any) -> BuiltPatient:
    """Three synthetic timepoints from ``tests.support.segsr`` (lesions shrink, one vanishes, one appears)."""
    from tests.support.segsr import make_series

    return build_patient(session_factory, make_series(tmp), tmp, **kw)


@dataclass
class PhantomTimepoint:
    """One rendered timepoint of the procedural digital patient, shaped like ``segsr_fixtures.SyntheticTimepoint``."""

    index: int
    ct: Any
    files: list[Path]
    datasets: list[pydicom.Dataset]
    lesions: list
    study_uid: str
    series_uid: str


def phantom_timepoints(
    tmp: Path,
    *,
    seed: int = 3,
    shape: tuple[int, int, int] = (48, 160, 160),
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
    n_lesions: int = 4,
    patient_id: str = "LT-DEMO-7",
    n_followups: int = 2,
) -> list[PhantomTimepoint]:
    """Baseline + ``n_followups`` follow-ups of the procedural CT patient (``synthetic.phantom`` + ``synthesis``):
    realistic anatomy, lesions that grow, shrink, vanish or appear; each timepoint written as a real CT DICOM series."""
    import datetime as dt

    import numpy as np
    from pydicom.uid import generate_uid

    from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
    from lesiontrack.models.segmentation.prompts import LesionIdentity
    from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion
    from lesiontrack.synthetic.phantom import make_phantom
    from lesiontrack.synthetic.synthesis import SynthConfig, SynthIdentity, synthesize_patient

    ph = make_phantom(seed=seed, shape=shape, spacing=spacing, n_lesions=n_lesions, center_mm=(0.0, 0.0, 40.0))
    cfg = SynthConfig(
        rotation_deg=2.0,
        translation_mm=5.0,
        elastic_mm=2.0,
        breathing_mm=3.0,
        p_vanish=0.2,
        p_new=1.0,
        fov_shift_mm=0.0,
        slice_spacings_mm=(spacing[2],),
        inplane_scale=(1.0, 1.0),
    )
    synth = synthesize_patient(
        ph.ct,
        ph.lesions,
        np.random.default_rng(seed),
        n_followups=n_followups,
        config=cfg,
        identity=SynthIdentity(patient_id, seed=seed),
    )
    info = {li.label: li for li in ph.lesion_info}
    idents: dict[int, LesionIdentity] = {}
    frame_uid = generate_uid()
    base = dt.date(2026, 1, 12)
    out: list[PhantomTimepoint] = []
    for tp in synth.timepoints:
        study_uid, series_uid = generate_uid(), generate_uid()
        date = (base + dt.timedelta(days=tp.days_from_baseline)).strftime("%Y%m%d")
        files = write_ct_series(
            tp.ct,
            tmp / f"phantom-tp{tp.index}",
            CTSeriesHeader(
                patient_id=patient_id,
                patient_name="Demo^Patient",
                study_uid=study_uid,
                series_uid=series_uid,
                frame_of_reference_uid=frame_uid,
                study_date=date,
                series_number=2,
                series_description=f"CT chest-abdomen T{tp.index}",
                study_description="CT CHEST ABDOMEN",
                accession_number=f"A{seed}{tp.index}",
            ),
        )
        tracked = []
        for lab, st in sorted(tp.lesions.items()):
            if st.status == "out_of_fov":
                continue
            if lab not in idents:
                kind = info[lab].kind if lab in info else synth.lesion_kinds.get(lab, "lesion")
                site = (
                    "lymph node"
                    if "lymph node" in kind
                    else "lung"
                    if "lung" in kind
                    else "liver"
                    if ("liver" in kind or "hypodense" in kind)
                    else "soft tissue"
                )
                idents[lab] = LesionIdentity(
                    generate_uid(),
                    f"L{lab} {site}",
                    lab,
                    site,
                    "lymph node" in kind,
                    description=RADIOLOGIST_WORDS.get(site),
                )
            mask = tp.labels.with_array((tp.labels.array == lab).astype(np.uint8))
            status = {"present": LesionStatus.PRESENT, "new": LesionStatus.NEW}.get(st.status, LesionStatus.VANISHED)
            if status is LesionStatus.VANISHED:
                mask = mask.with_array(np.zeros_like(mask.array))
            tracked.append(TrackedLesion(idents[lab], status, mask, "lesiontrack-adaptive", "0.1"))
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        out.append(PhantomTimepoint(tp.index, tp.ct, files, datasets, tracked, study_uid, series_uid))
    return out


STILL_SEED = 7
STILL_SHAPE = (64, 112, 112)
STILL_SPACING = (2.5, 2.5, 3.0)


def still_patient(
    root: Path, *, n_followups: int, new_lesions: dict[int, list[tuple[str, float, float]]] | None = None
) -> DemoPatient:
    """The small still phantom (seed 7, 64 x 112 x 112 at 2.5 x 2.5 x 3 mm, three lesions that neither change nor
    move): the case the service-level tests run through registration "none", with ``new_lesions`` appearing at the
    follow-ups named (organ, diameter mm, HU)."""
    return make_patient(
        root,
        seed=STILL_SEED,
        shape=STILL_SHAPE,
        spacing=STILL_SPACING,
        n_lesions=3,
        n_followups=n_followups,
        follow_ups=FollowUps.STILL,
        new_lesions=new_lesions,
    )
