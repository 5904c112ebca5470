"""Per-patient lesion timeline read from the database: lesions × timepoints with measurements, change and RECIST.

One view model feeds the dashboard, the JSON API and the read-centre exports, so all three show the same numbers.
Timepoints are the CT series a patient's lesions were observed on, ordered by study date/time (oldest = baseline).
RECIST 1.1 per timepoint is computed with :mod:`pipeline.recist` from the stored observations; a lesion's stored
``is_target`` (when set) fixes its role, otherwise the engine's automatic baseline selection applies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AnalysisJob, Instance, Lesion, LesionObservation, Patient, Series, Study

if TYPE_CHECKING:
    from pipeline import recist


@dataclass
class TimepointInfo:
    index: int
    label: str  # "Baseline", "FU1", ...
    series_uid: str
    study_uid: str | None
    study_date: str | None  # DICOM DA (YYYYMMDD)
    study_time: str | None
    job_id: int | None = None
    seg_uids: list[str] = field(default_factory=list)
    sr_uids: list[str] = field(default_factory=list)
    sum_of_diameters_mm: float | None = None
    change_from_baseline_pct: float | None = None
    change_from_nadir_pct: float | None = None
    target_response: str | None = None
    non_target_response: str | None = None
    new_lesions: bool | None = None
    overall_response: str | None = None
    volumetric_response: str | None = None

    @property
    def date_iso(self) -> str | None:
        d = self.study_date
        return f"{d[0:4]}-{d[4:6]}-{d[6:8]}" if d and len(d) == 8 and d.isdigit() else d


@dataclass
class Cell:
    """One lesion at one timepoint (one LesionObservation)."""

    observation_id: int
    status: str
    volume_mm3: float | None
    long_axis_mm: float | None
    short_axis_mm: float | None
    volume_change_prev_pct: float | None = None
    volume_change_baseline_pct: float | None = None
    long_axis_change_baseline_pct: float | None = None
    seg_sop_instance_uid: str | None = None
    segment_number: int | None = None
    engine: str | None = None
    job_id: int | None = None
    is_node: bool = False
    propagated_from_series_uid: str | None = None  # the annotated series this result was propagated from

    @property
    def volume_ml(self) -> float | None:
        return None if self.volume_mm3 is None else self.volume_mm3 / 1000.0


@dataclass
class LesionRow:
    lesion_id: int
    tracking_id: str
    tracking_uid: str
    anatomic_site: str | None
    origin: str
    role: str  # "target", "non-target", "new" or "" (not assessed)
    cells: list[Cell | None]  # aligned with PatientTimeline.timepoints


@dataclass
class PatientTimeline:
    patient_pk: int
    timepoints: list[TimepointInfo]
    lesions: list[LesionRow]
    best_overall_response: str | None = None
    recist_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for tp, tpd in zip(self.timepoints, d["timepoints"]):
            tpd["date_iso"] = tp.date_iso
        return d


def _pct(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or ref == 0:
        return None
    return 100.0 * (value - ref) / ref


def _collect_uids(obj: Any, kinds: tuple[str, ...], out: dict[str, list[str]]) -> None:
    """Find SEG/SR SOP Instance UIDs in a job's step outputs (keys like ``seg_sop_instance_uid``, ``sr_uid``)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = str(k).lower()
            for kind in kinds:
                if key.startswith(kind) and ("uid" in key) and "series" not in key and "study" not in key:
                    vals = v if isinstance(v, list) else [v]
                    out[kind].extend(str(x) for x in vals if isinstance(x, str) and x and x[0].isdigit())
            _collect_uids(v, kinds, out)
    elif isinstance(obj, list):
        for v in obj:
            _collect_uids(v, kinds, out)


def build_timeline(session: Session, patient_pk: int, rules: recist.RecistRules | None = None) -> PatientTimeline:
    """The lesion × timepoint table of one patient (raises KeyError if the patient does not exist)."""
    if session.get(Patient, patient_pk) is None:
        raise KeyError(f"no patient with id {patient_pk}")
    lesions = list(session.scalars(select(Lesion).where(Lesion.patient_pk == patient_pk).order_by(Lesion.id)))
    lesion_ids = [l.id for l in lesions]
    observations = (
        list(
            session.scalars(
                select(LesionObservation)
                .where(LesionObservation.lesion_pk.in_(lesion_ids))
                .order_by(LesionObservation.id)
            )
        )
        if lesion_ids
        else []
    )

    series_uids = sorted({o.series_instance_uid for o in observations})
    info: dict[str, tuple[str | None, str | None, str | None]] = {}
    if series_uids:
        rows = session.execute(
            select(Series.series_instance_uid, Study.study_instance_uid, Study.study_date, Study.study_time)
            .join(Study, Series.study_pk == Study.id)
            .where(Series.series_instance_uid.in_(series_uids))
        )
        info = {r[0]: (r[1], r[2], r[3]) for r in rows}
    ordered = sorted(
        series_uids,
        key=lambda u: (
            (info.get(u, (None, None, None))[1] or "99999999"),
            (info.get(u, (None, None, None))[2] or ""),
            u,
        ),
    )
    timepoints: list[TimepointInfo] = []
    for i, uid in enumerate(ordered):
        study_uid, date, time = info.get(uid, (None, None, None))
        timepoints.append(TimepointInfo(i, "Baseline" if i == 0 else f"FU{i}", uid, study_uid, date, time))
    tp_index = {tp.series_uid: tp.index for tp in timepoints}

    # Latest observation per lesion per timepoint (a re-analysis adds newer rows; the newest wins).
    latest: dict[tuple[int, int], LesionObservation] = {}
    for o in observations:
        latest[(o.lesion_pk, tp_index[o.series_instance_uid])] = o

    # Result objects per timepoint: observations' SEG UIDs, UIDs named in the job outputs, our SR/SEG series.
    jobs = {
        j.followup_series_uid: j
        for j in session.scalars(
            select(AnalysisJob).where(AnalysisJob.followup_series_uid.in_(series_uids)).order_by(AnalysisJob.id)
        )
    }
    for tp in timepoints:
        found: dict[str, list[str]] = {"seg": [], "sr": []}
        job = jobs.get(tp.series_uid)
        if job is not None:
            tp.job_id = job.id
            _collect_uids(job.step_outputs or {}, ("seg", "sr"), found)
        found["seg"].extend(
            o.seg_sop_instance_uid for (lp, ti), o in latest.items() if ti == tp.index and o.seg_sop_instance_uid
        )
        if tp.study_uid:
            ours = session.execute(
                select(Series.modality, Instance.sop_instance_uid)
                .join(Instance, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .where(
                    Study.study_instance_uid == tp.study_uid,
                    Series.created_by_us.is_(True),
                    Series.modality.in_(["SEG", "SR"]),
                )
            )
            for modality, sop in ours:
                found[modality.lower()].append(sop)
        tp.seg_uids = list(dict.fromkeys(found["seg"]))
        tp.sr_uids = list(dict.fromkeys(found["sr"]))

    rows: list[LesionRow] = []
    for lesion in lesions:
        cells: list[Cell | None] = [None] * len(timepoints)
        for tp in timepoints:
            o = latest.get((lesion.id, tp.index))
            if o is not None:
                cells[tp.index] = Cell(
                    o.id,
                    o.status.value if hasattr(o.status, "value") else str(o.status),
                    o.volume_mm3,
                    o.long_axis_mm,
                    o.short_axis_mm,
                    seg_sop_instance_uid=o.seg_sop_instance_uid,
                    segment_number=o.segment_number,
                    engine=o.engine,
                    job_id=o.job_pk,
                    is_node=bool((o.measurements or {}).get("is_node", False)),
                    propagated_from_series_uid=o.propagated_from_series_uid,
                )
        first = next((c for c in cells if c is not None), None)
        prev: Cell | None = None
        for c in cells:
            if c is None:
                continue
            if c is not first and first is not None:
                c.volume_change_baseline_pct = _pct(_vol(c), _vol(first))
                c.long_axis_change_baseline_pct = _pct(_la(c), _la(first))
            if prev is not None:
                c.volume_change_prev_pct = _pct(_vol(c), _vol(prev))
            prev = c
        role = "" if lesion.is_target is None else ("target" if lesion.is_target else "non-target")
        rows.append(
            LesionRow(
                lesion.id,
                lesion.tracking_id,
                lesion.tracking_uid,
                lesion.anatomic_site,
                lesion.origin.value if hasattr(lesion.origin, "value") else str(lesion.origin),
                role,
                cells,
            )
        )
    timeline = PatientTimeline(patient_pk, timepoints, rows)
    _apply_recist(timeline, rules)
    return timeline


def _vol(c: Cell) -> float | None:
    return 0.0 if c.status == "vanished" else c.volume_mm3


def _la(c: Cell) -> float | None:
    return 0.0 if c.status == "vanished" else c.long_axis_mm


def _apply_recist(tl: PatientTimeline, rules: recist.RecistRules | None = None) -> None:
    """RECIST 1.1 per timepoint over the stored observations (roles from ``Lesion.is_target`` when set)."""
    from pipeline import recist

    if not tl.timepoints or not tl.lesions:
        return
    per_tp: list[list[recist.RecistLesion]] = []
    for tp in tl.timepoints:
        items = []
        for row in tl.lesions:
            c = row.cells[tp.index]
            if c is None:
                if tp.index > 0 and row.cells[0] is not None:
                    items.append(
                        recist.RecistLesion(
                            row.tracking_uid, row.tracking_id, row.anatomic_site, status="not_evaluated"
                        )
                    )
                continue
            status = c.status if c.status in ("present", "vanished", "new") else "present"
            items.append(
                recist.RecistLesion(
                    row.tracking_uid,
                    row.tracking_id,
                    row.anatomic_site,
                    c.is_node,
                    status,
                    c.long_axis_mm or 0.0,
                    c.short_axis_mm or 0.0,
                    c.volume_mm3 or 0.0,
                )
            )
        per_tp.append(items)
    baseline_uids = {r.tracking_uid for r in per_tp[0]}
    override = None
    forced_t = [r.tracking_uid for r in tl.lesions if r.role == "target" and r.tracking_uid in baseline_uids]
    forced_n = [r.tracking_uid for r in tl.lesions if r.role == "non-target" and r.tracking_uid in baseline_uids]
    if forced_t or forced_n:
        override = recist.TargetOverride(
            force_target=forced_t, force_non_target=forced_n, by="database", reason="is_target recorded for the lesion"
        )
    try:
        assessment = recist.assess(per_tp, rules, override=override)
    except (ValueError, KeyError) as exc:
        tl.recist_error = str(exc)
        return
    for tp, resp in zip(tl.timepoints, assessment.timepoints):
        d = resp.to_dict()
        tp.sum_of_diameters_mm = d.get("sum_of_diameters_mm")
        tp.change_from_baseline_pct = d.get("change_from_baseline_pct")
        tp.change_from_nadir_pct = d.get("change_from_nadir_pct")
        tp.target_response = d.get("target_response")
        tp.non_target_response = d.get("non_target_response")
        tp.new_lesions = d.get("new_lesions")
        tp.overall_response = d.get("overall_response")
        tp.volumetric_response = d.get("volumetric_response")
    tl.best_overall_response = assessment.best_overall_response.value
    for row in tl.lesions:
        if not row.role:
            role = assessment.selection.role_of(row.tracking_uid)
            row.role = role or ("new" if row.cells[0] is None else "")
