"""One patient history: lesions × timepoints with measurements, change and RECIST 1.1, built from the database.

The single source of a patient's longitudinal numbers: the measure step (with the follow-up being analysed added
as a pending timepoint), the SR writer (which reports what the measure step took from here), the dashboard, the
JSON API and the read-centre exports all read it, so they cannot disagree. Timepoints are the CT series a
patient's lesions were observed on, ordered by study date/time (oldest = baseline), each with its slice thickness.
Target lesions are chosen once, at baseline, with the baseline's slice thickness; the choice is stored in
``Lesion.is_target`` by the job that first measures the baseline and is never re-chosen later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from lesiontrack.db.models import (
    AnalysisJob,
    Instance,
    Lesion,
    LesionObservation,
    Patient,
    Series,
    Study,
    TimepointVerification,
    VerificationState,
)
from lesiontrack.db.status import LesionStatus
from lesiontrack.pipeline.dicom.object_kinds import has_mask, object_kinds
from lesiontrack.pipeline.jobs.candidates import CandidateView, latest_candidates, search_states
from lesiontrack.pipeline.jobs.contract import job_results
from lesiontrack.pipeline.science import recist
from lesiontrack.pipeline.science.confidence import review_text
from lesiontrack.pipeline.science.measurements import LesionChanges, LesionMeasurement, MeasurementDict, lesion_changes


@dataclass
class TimepointInfo(recist.RecistStatement):
    """One timepoint of the patient: its series and objects, verification, review counts, and (the base class)
    what is stated of RECIST 1.1 there."""

    index: int
    label: str  # "Baseline", "FU1", ...
    series_uid: str
    study_uid: str | None
    study_date: str | None  # DICOM DA (YYYYMMDD)
    study_time: str | None
    slice_thickness_mm: float | None = None
    job_id: int | None = None
    seg_uids: list[str] = field(default_factory=list)  # DICOM-SEG objects of this timepoint (ours or a reader's)
    sr_uids: list[str] = field(default_factory=list)  # SR objects (our reports, a reader's measurements)
    other_uids: list[str] = field(default_factory=list)  # other annotation objects (GSPS, RTSTRUCT)
    object_kinds: dict[str, str] = field(default_factory=dict)  # SOP UID → "SEG", "SR lines", ... (object_kinds)
    verification_id: int | None = None  # a person verified this timepoint (correction or as is)
    verification_method: str | None = None
    verified_by: str | None = None
    verified_at: str | None = None  # ISO 8601
    lesions_observed: int = 0  # lesions with an observation at this timepoint
    lesions_need_review: int = 0  # of those, flagged for review (pipeline.science.confidence)
    lesions_assessed: int = 0  # of those, with a confidence computed (0: say nothing about review)

    @property
    def review_text(self) -> str:
        """E.g. "2 of 5 lesions need review" (what the dashboard and job summary say)."""
        return review_text(self.lesions_need_review, self.lesions_observed)

    @property
    def date_iso(self) -> str | None:
        d = self.study_date
        return f"{d[0:4]}-{d[4:6]}-{d[6:8]}" if d and len(d) == 8 and d.isdigit() else d


@dataclass
class Cell:
    """One lesion at one timepoint (one LesionObservation)."""

    observation_id: int
    status: LesionStatus
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
    propagated_from_sop_uid: str | None = None  # the SEG/SR (a person's) it was propagated or adopted from
    verification_id: int | None = None  # adopted from a reader's correction (None: a machine result)
    verified_by: str | None = None
    confidence: float | None = None  # pipeline.science.confidence, in [0, 1]; None for an annotation
    review: bool = False  # flagged for review
    review_reasons: list[str] = field(default_factory=list)
    object_kind: str | None = None  # what seg_sop_instance_uid is: "SEG", "SR lines", ... (None: not on file)
    prompt_kind: str | None = None  # what propagated_from_sop_uid is (the prompt source, named as it is)
    measurement: LesionMeasurement | None = field(default=None, repr=False)  # not exported (to_dict)
    changes: LesionChanges | None = field(default=None, repr=False)

    @property
    def volume_ml(self) -> float | None:
        return None if self.volume_mm3 is None else self.volume_mm3 / 1000.0

    @property
    def has_thumbnail(self) -> bool:
        """A thumbnail exists only for a segment of a SEG we hold (or the "vanished" card): an annotation drawn as
        SR lines, points or a GSPS has no mask to show, and is not shown as an unreadable SEG."""
        return self.status == LesionStatus.VANISHED or (
            self.seg_sop_instance_uid is not None and has_mask(self.object_kind)
        )


@dataclass
class LesionRow:
    lesion_id: int
    tracking_id: str
    tracking_uid: str
    anatomic_site: str | None
    origin: str
    role: str  # a recist.RecistRole: target, non-target, new, retired (deleted by a reader) or "" (not assessed)
    cells: list[Cell | None]  # aligned with PatientTimeline.timepoints
    retired_at_series_uid: str | None = None  # a reader deleted the lesion in a correction of this series
    retired_by: str | None = None

    @property
    def origin_label(self) -> str:
        """Where the lesion was first marked, named as a reader names it ("" when not known)."""
        return ORIGIN_LABELS.get(self.origin, "")


#: Lesion.origin (db.models.LesionOrigin) → what the dashboard says
ORIGIN_LABELS = {
    "seg": "marked in a SEG",
    "sr": "marked in an SR",
    "gsps": "marked in a GSPS",
    "rtstruct": "marked in an RTSTRUCT",
    "prompt": "marked as points",
    "new": "new lesion",
    "added": "added by a reader",
}


@dataclass
class PatientTimeline:
    patient_pk: int
    timepoints: list[TimepointInfo]
    lesions: list[LesionRow]
    best_overall_response: str | None = None
    recist_error: str | None = None
    candidates: list[CandidateView] = field(default_factory=list)  # of each timepoint's latest new-lesion search
    assessment: recist.RecistAssessment | None = field(default=None, repr=False)  # not exported (to_dict)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("assessment", None)
        d["candidates"] = [
            {
                **c.model_dump(),
                "state": c.state.value,
                "decided_at": c.decided_at.isoformat() if c.decided_at else None,
            }
            for c in self.candidates
        ]
        for tp, tpd in zip(self.timepoints, d["timepoints"], strict=True):
            tpd["date_iso"] = tp.date_iso
        for row in d["lesions"]:
            for cell in row["cells"]:
                if cell is not None:
                    cell.pop("measurement", None)
                    cell.pop("changes", None)
        return d

    def index_of(self, series_uid: str) -> int:
        for tp in self.timepoints:
            if tp.series_uid == series_uid:
                return tp.index
        raise KeyError(f"series {series_uid} is not a timepoint of patient {self.patient_pk}")

    def measurements_at(self, index: int) -> dict[str, LesionMeasurement]:
        """Tracking UID → measurement of every lesion observed at timepoint ``index``."""
        out: dict[str, LesionMeasurement] = {}
        for row in self.lesions:
            cell = row.cells[index]
            if cell is not None and cell.measurement is not None:
                out[row.tracking_uid] = cell.measurement
        return out

    def changes_at(self, index: int) -> dict[str, LesionChanges | None]:
        return {row.tracking_uid: c.changes for row in self.lesions if (c := row.cells[index]) is not None}


@dataclass
class PendingTimepoint:
    """Measurements of a job in progress that are not in the database yet (the measure step runs before the write).

    ``replace``: the pending values win over stored observations of the series (the follow-up being analysed);
    otherwise they only fill lesions the database has no observation of on that series (the prior)."""

    series_uid: str
    study_uid: str | None
    study_date: str | None
    study_time: str | None
    slice_thickness_mm: float | None
    measurements: Sequence[LesionMeasurement]
    replace: bool = True
    search: recist.NewLesionSearch | None = None  # this job's new-lesion search (None: keep what is stored)
    reviews: Mapping[str, ReviewFlag] = field(default_factory=dict)  # Tracking UID → confidence / review flag


@dataclass(frozen=True)
class ReviewFlag:
    """A result's confidence and review flag as the history carries it (from :mod:`pipeline.science.confidence`)."""

    confidence: float | None
    review: bool
    reasons: tuple[str, ...] = ()


def _pct(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or ref == 0:
        return None
    return 100.0 * (value - ref) / ref


def build_timeline(
    session: Session,
    patient_pk: int,
    rules: recist.RecistRules | None = None,
    *,
    pending: Sequence[PendingTimepoint] = (),
    until_series_uid: str | None = None,
) -> PatientTimeline:
    """The lesion × timepoint history of one patient (raises KeyError if the patient does not exist).

    ``pending`` adds measurements not stored yet (see :class:`PendingTimepoint`); ``until_series_uid`` cuts the
    history after that timepoint (a follow-up is assessed against what came before it, not after)."""
    if session.get(Patient, patient_pk) is None:
        raise KeyError(f"no patient with id {patient_pk}")
    lesions = list(session.scalars(select(Lesion).where(Lesion.patient_pk == patient_pk).order_by(Lesion.id)))
    latest = _latest_observations(session, lesions)
    cells: dict[tuple[str, str], Cell] = {key: _cell_of(o) for key, o in latest.items()}
    _attach_verifiers(session, cells.values())
    for p in pending:
        for m in p.measurements:
            key = (m.tracking_uid, p.series_uid)
            if p.replace or key not in cells:
                cells[key] = _pending_cell(m, p.reviews.get(m.tracking_uid))
    timepoints = _timepoints(session, cells, pending, until_series_uid)
    ordered = [tp.series_uid for tp in timepoints]
    _attach_result_objects(session, timepoints, latest)
    _attach_verifications(session, timepoints)
    kinds = object_kinds(
        session, [u for c in cells.values() for u in (c.seg_sop_instance_uid, c.propagated_from_sop_uid)]
    )
    for cell in cells.values():
        cell.object_kind = kinds.get(cell.seg_sop_instance_uid or "")
        cell.prompt_kind = kinds.get(cell.propagated_from_sop_uid or "")
    rows = _lesion_rows(lesions, pending, cells, timepoints)
    for tp in timepoints:
        observed = [c for row in rows if (c := row.cells[tp.index]) is not None]
        tp.lesions_observed = len(observed)
        tp.lesions_need_review = sum(c.review for c in observed)
        tp.lesions_assessed = sum(c.confidence is not None for c in observed)
    searches = search_states(session, ordered)
    for p in pending:
        if p.search is not None:
            searches[p.series_uid] = p.search
    timeline = PatientTimeline(patient_pk, timepoints, rows, candidates=latest_candidates(session, ordered))
    _apply_recist(timeline, rules, [searches.get(tp.series_uid) for tp in timepoints])
    return timeline


def _latest_observations(session: Session, lesions: Sequence[Lesion]) -> dict[tuple[str, str], LesionObservation]:
    """The latest observation per (lesion Tracking UID, series): a re-analysis adds newer rows; the newest wins."""
    lesion_ids = [les.id for les in lesions]
    if not lesion_ids:
        return {}
    observations = session.scalars(
        select(LesionObservation)
        .where(LesionObservation.lesion_pk.in_(lesion_ids), LesionObservation.superseded_by_job.is_(None))
        .order_by(LesionObservation.id)
    )
    uid_of = {les.id: les.tracking_uid for les in lesions}
    latest: dict[tuple[str, str], LesionObservation] = {}
    for o in observations:
        latest[(uid_of[o.lesion_pk], o.series_instance_uid)] = o
    return latest


def _timepoints(
    session: Session,
    cells: dict[tuple[str, str], Cell],
    pending: Sequence[PendingTimepoint],
    until_series_uid: str | None,
) -> list[TimepointInfo]:
    """The patient's timepoints in time order (cut after ``until_series_uid``)."""
    info = _series_info(session, {series for _uid, series in cells})
    for p in pending:
        info[p.series_uid] = _SeriesInfo(p.study_uid, p.study_date, p.study_time, p.slice_thickness_mm)
    ordered = sorted(info, key=lambda u: (info[u].study_date or "99999999", info[u].study_time or "", u))
    if until_series_uid is not None and until_series_uid in ordered:
        ordered = ordered[: ordered.index(until_series_uid) + 1]
    return [
        TimepointInfo(
            i,
            "Baseline" if i == 0 else f"FU{i}",
            uid,
            info[uid].study_uid,
            info[uid].study_date,
            info[uid].study_time,
            slice_thickness_mm=info[uid].slice_thickness_mm,
        )
        for i, uid in enumerate(ordered)
    ]


def _lesion_rows(
    lesions: Sequence[Lesion],
    pending: Sequence[PendingTimepoint],
    cells: dict[tuple[str, str], Cell],
    timepoints: Sequence[TimepointInfo],
) -> list[LesionRow]:
    """One row per lesion seen at any of the timepoints (a retired lesion up to where a reader deleted it)."""
    rows: list[LesionRow] = []
    known = {les.tracking_uid for les in lesions}
    pending_only = {
        m.tracking_uid: m for p in pending for m in p.measurements if m.tracking_uid not in known
    }  # lesions the running job creates
    identities = [
        (les.id, les.tracking_id, les.tracking_uid, les.anatomic_site, les.origin.value, les.is_target)
        for les in lesions
    ] + [(0, m.tracking_id, m.tracking_uid, m.anatomic_site, "", None) for m in pending_only.values()]
    retired = {
        les.tracking_uid: (les.retired_at_series_uid, les.retired_by) for les in lesions if les.retired_at_series_uid
    }
    for lesion_id, tracking_id, tracking_uid, site, origin, is_target in identities:
        row_cells: list[Cell | None] = [cells.get((tracking_uid, tp.series_uid)) for tp in timepoints]
        retired_at, retired_by = retired.get(tracking_uid, (None, None))
        if retired_at is not None:  # a reader deleted it there: not reported from that timepoint on
            cut = next((tp.index for tp in timepoints if tp.series_uid == retired_at), None)
            if cut is not None:
                row_cells = [c if i < cut else None for i, c in enumerate(row_cells)]
        if not any(row_cells):
            continue
        _fill_changes(row_cells)
        role = (
            recist.RecistRole.NOT_ASSESSED
            if is_target is None
            else (recist.RecistRole.TARGET if is_target else recist.RecistRole.NON_TARGET)
        )
        if retired_at is not None:
            role = recist.RecistRole.RETIRED
        rows.append(
            LesionRow(lesion_id, tracking_id, tracking_uid, site, origin, role, row_cells, retired_at, retired_by)
        )
    return rows


def _attach_verifications(session: Session, timepoints: Sequence[TimepointInfo]) -> None:
    """Each timepoint's newest applied verification (who verified it, when, how)."""
    uids = [tp.series_uid for tp in timepoints]
    rows = session.scalars(
        select(TimepointVerification)
        .where(
            TimepointVerification.series_instance_uid.in_(uids),
            TimepointVerification.state == VerificationState.APPLIED,
        )
        .order_by(TimepointVerification.id)
    )
    newest = {v.series_instance_uid: v for v in rows}
    for tp in timepoints:
        v = newest.get(tp.series_uid)
        if v is not None:
            tp.verification_id, tp.verification_method = v.id, str(v.method)
            tp.verified_by, tp.verified_at = v.verified_by, v.verified_at.isoformat()


def _attach_verifiers(session: Session, cells: Iterable[Cell]) -> None:
    wanted = [c for c in cells if c.verification_id is not None]
    if not wanted:
        return
    ids = sorted({c.verification_id for c in wanted if c.verification_id is not None})
    rows = session.execute(
        select(TimepointVerification.id, TimepointVerification.verified_by).where(TimepointVerification.id.in_(ids))
    )
    who = {int(vid): str(name) for vid, name in rows}
    for c in wanted:
        c.verified_by = who.get(c.verification_id) if c.verification_id is not None else None


@dataclass(frozen=True)
class _SeriesInfo:
    study_uid: str | None
    study_date: str | None
    study_time: str | None
    slice_thickness_mm: float | None


def _series_info(session: Session, series_uids: set[str]) -> dict[str, _SeriesInfo]:
    if not series_uids:
        return {}
    rows = session.execute(
        select(
            Series.series_instance_uid,
            Study.study_instance_uid,
            Study.study_date,
            Study.study_time,
            Series.slice_thickness_mm,
        )
        .join(Study, Series.study_pk == Study.id)
        .where(Series.series_instance_uid.in_(sorted(series_uids)))
    )
    found = {r[0]: _SeriesInfo(r[1], r[2], r[3], r[4]) for r in rows}
    return {u: found.get(u, _SeriesInfo(None, None, None, None)) for u in series_uids}


def _cell_of(o: LesionObservation) -> Cell:
    stored = o.measurements or {}
    # the JSON column holds LesionMeasurement.to_dict() (with changes, RECIST role and confidence beside it)
    measurement = LesionMeasurement.from_dict(cast(MeasurementDict, stored)) if "tracking_uid" in stored else None
    return Cell(
        o.id,
        LesionStatus(o.status),
        o.volume_mm3,
        o.long_axis_mm,
        o.short_axis_mm,
        seg_sop_instance_uid=o.seg_sop_instance_uid,
        segment_number=o.segment_number,
        engine=o.engine,
        job_id=o.job_pk,
        is_node=bool(stored.get("is_node", False)),
        measurement=measurement,
        propagated_from_series_uid=o.propagated_from_series_uid,
        propagated_from_sop_uid=o.propagated_from_sop_uid,
        verification_id=o.verification_pk,
        confidence=o.confidence,
        review=bool(o.review),
        review_reasons=[str(r) for r in (o.review_reasons or [])],
    )


def _pending_cell(m: LesionMeasurement, flag: ReviewFlag | None = None) -> Cell:
    return Cell(
        0,
        m.status,
        m.volume_mm3,
        m.long_axis_mm,
        m.short_axis_mm,
        is_node=m.is_node,
        measurement=m,
        confidence=None if flag is None else flag.confidence,
        review=False if flag is None else flag.review,
        review_reasons=[] if flag is None else list(flag.reasons),
    )


def _fill_changes(cells: list[Cell | None]) -> None:
    """Change of every observed cell against the earlier ones: percentages for the table (from the stored sizes,
    a vanished lesion counting 0) and, where the full measurement is known, the per-metric changes the SR reports
    (previous / baseline / nadir, :func:`pipeline.science.measurements.lesion_changes`: the same references)."""
    seq: list[LesionMeasurement | None] = []
    first: Cell | None = None
    prev: Cell | None = None
    for c in cells:
        seq.append(None if c is None else c.measurement)
        if c is None:
            continue
        if first is None:
            first = c
        else:
            c.volume_change_baseline_pct = _pct(_vol(c), _vol(first))
            c.long_axis_change_baseline_pct = _pct(_la(c), _la(first))
        if prev is not None:
            c.volume_change_prev_pct = _pct(_vol(c), _vol(prev))
        prev = c
        if c.measurement is not None:
            c.changes = lesion_changes(seq)


def _vol(c: Cell) -> float | None:
    return 0.0 if c.status == LesionStatus.VANISHED else c.volume_mm3


def _la(c: Cell) -> float | None:
    return 0.0 if c.status == LesionStatus.VANISHED else c.long_axis_mm


def _attach_result_objects(
    session: Session, timepoints: list[TimepointInfo], latest: dict[tuple[str, str], LesionObservation]
) -> None:
    """Result objects per timepoint: observations' SEG UIDs, the job's recorded SEG/SR, our SEG/SR series."""
    series_uids = [tp.series_uid for tp in timepoints]
    jobs = {
        j.followup_series_uid: j
        for j in session.scalars(
            select(AnalysisJob).where(AnalysisJob.followup_series_uid.in_(series_uids)).order_by(AnalysisJob.id)
        )
    }
    for tp in timepoints:
        seg: list[str] = []
        sr: list[str] = []
        job = jobs.get(tp.series_uid)
        if job is not None:
            tp.job_id = job.id
            results = job_results(job.step_outputs)
            seg.extend(results.seg_uids)
            sr.extend(results.sr_uids)
        seg.extend(
            o.seg_sop_instance_uid
            for (_uid, series), o in latest.items()
            if series == tp.series_uid and o.seg_sop_instance_uid
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
                (seg if modality == "SEG" else sr).append(sop)
        # named by what they are, not by the column they came from: a baseline annotated with RECIST lines has an
        # SR in its observations' seg_sop_instance_uid, and it is listed as that SR, never as a "SEG"
        found = list(dict.fromkeys([*seg, *sr]))
        kinds = object_kinds(session, found)
        tp.object_kinds = {u: kinds[u] for u in found if u in kinds}
        tp.seg_uids = [u for u in found if kinds.get(u, "SEG" if u in seg else "SR") == "SEG"]
        tp.sr_uids = [u for u in found if kinds.get(u, "SEG" if u in seg else "SR").startswith("SR")]
        tp.other_uids = [u for u in found if u not in tp.seg_uids and u not in tp.sr_uids]


_OBSERVED = (LesionStatus.PRESENT, LesionStatus.VANISHED, LesionStatus.NEW)


def _recist_lesion(row: LesionRow, c: Cell) -> recist.RecistLesion:
    if c.measurement is not None:
        return recist.RecistLesion.from_measurement(c.measurement, organ=row.anatomic_site)
    status = c.status if c.status in _OBSERVED else LesionStatus.PRESENT
    return recist.RecistLesion(
        row.tracking_uid,
        row.tracking_id,
        row.anatomic_site,
        c.is_node,
        status,
        c.long_axis_mm or 0.0,
        c.short_axis_mm or 0.0,
        c.volume_mm3 or 0.0,
    )


def _apply_recist(
    tl: PatientTimeline,
    rules: recist.RecistRules | None = None,
    searches: Sequence[recist.NewLesionSearch | None] = (),
) -> None:
    """RECIST 1.1 per timepoint; targets from ``Lesion.is_target`` where stored, else chosen at baseline with the
    baseline's slice thickness (the job that measures the baseline stores that choice)."""
    if not tl.timepoints or not tl.lesions:
        return
    per_tp: list[list[recist.RecistLesion]] = []
    counted = [row for row in tl.lesions if row.role != recist.RecistRole.RETIRED]  # a reader said it is no lesion
    for tp in tl.timepoints:
        items = []
        for row in counted:
            c = row.cells[tp.index]
            if c is None:
                if tp.index > 0 and row.cells[0] is not None:
                    items.append(
                        recist.RecistLesion(
                            row.tracking_uid, row.tracking_id, row.anatomic_site, status=LesionStatus.NOT_EVALUATED
                        )
                    )
                continue
            items.append(_recist_lesion(row, c))
        per_tp.append(items)
    baseline_uids = {r.tracking_uid for r in per_tp[0]}
    override = None
    forced_t = [
        r.tracking_uid for r in tl.lesions if r.role == recist.RecistRole.TARGET and r.tracking_uid in baseline_uids
    ]
    forced_n = [
        r.tracking_uid for r in tl.lesions if r.role == recist.RecistRole.NON_TARGET and r.tracking_uid in baseline_uids
    ]
    if forced_t or forced_n:
        override = recist.TargetOverride(
            force_target=forced_t, force_non_target=forced_n, by="database", reason="is_target recorded for the lesion"
        )
    try:
        assessment = recist.assess(
            per_tp,
            rules,
            slice_thickness_mm=tl.timepoints[0].slice_thickness_mm,
            override=override,
            new_lesion_search=searches,
        )
    except (ValueError, KeyError) as exc:
        tl.recist_error = str(exc)
        return
    tl.assessment = assessment
    for tp, resp in zip(tl.timepoints, assessment.timepoints, strict=True):
        tp.state(resp.statement())
    tl.best_overall_response = assessment.best_overall_response.value
    for row in tl.lesions:
        if not row.role:
            role = assessment.selection.role_of(row.tracking_uid)
            row.role = role or (recist.RecistRole.NEW if row.cells[0] is None else recist.RecistRole.NOT_ASSESSED)
