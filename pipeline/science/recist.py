"""RECIST 1.1 engine: target selection at baseline, sum of diameters, target / non-target / overall response per
timepoint (Eisenhauer et al. 2009, tables 1 and 2), best overall response, and a volumetric secondary readout.

Inputs are :class:`RecistLesion` records per lesion per timepoint (usually built from
:class:`pipeline.science.measurements.LesionMeasurement` with :meth:`RecistLesion.from_measurement`). Thresholds are in
:class:`RecistRules` (configurable). Target selection can be overridden; each decision (automatic or override) is
recorded with its reason in :class:`TargetSelection`. Every output is a JSON-serialisable dataclass.

New lesions are reported only as far as they were looked for (:class:`NewLesionSearch` per timepoint): "not
assessed" when no search ran — then no CR/PR/SD is declared (overall NE unless targets or non-targets already give
PD); "no candidates found"; "N unconfirmed candidates" — equivocal, followed, not PD by themselves (RECIST 1.1
section 4.3.2: PD is declared once a new lesion is confirmed); "yes (confirmed)" — PD.

Conventions: a lesion *present* but measuring below ``too_small_below_mm`` counts as ``too_small_default_mm`` (5 mm,
RECIST "too small to measure"); a *vanished* lesion counts 0 mm; lymph nodes always contribute their short axis
(even below 10 mm). Non-target PD is a qualitative reader call ("unequivocal progression") and is therefore an input
(``non_target_progression``), never inferred from sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum

from lesiontrack.config.settings import RecistSettings
from lesiontrack.db.status import LesionStatus
from lesiontrack.pipeline.science.measurements import LesionMeasurement


class Response(StrEnum):
    CR = "CR"
    PR = "PR"
    SD = "SD"
    PD = "PD"
    NE = "NE"  # not evaluable / not all evaluated
    NON_CR_NON_PD = "Non-CR/Non-PD"
    ND = "ND"  # no disease of this kind (no targets / no non-targets)


class RecistRules(RecistSettings):
    """RECIST 1.1 thresholds (defaults from the paper; fields, bounds and descriptions are those of the
    ``[recist]`` settings section); change them per trial protocol."""

    @classmethod
    def from_settings(cls, cfg: RecistSettings) -> RecistRules:
        """The rules of the ``[recist]`` configuration section."""
        return cls(**cfg.model_dump())

    def min_long_axis_for(self, slice_thickness_mm: float | None) -> float:
        if slice_thickness_mm is not None and slice_thickness_mm > self.max_slice_thickness_mm:
            return max(self.min_long_axis_mm, self.min_long_axis_slice_factor * slice_thickness_mm)
        return self.min_long_axis_mm


class RecistRole(StrEnum):
    """A lesion's RECIST 1.1 role: chosen at baseline (target, non-target, normal node); a patient's timeline adds
    new (not there at baseline), retired (deleted by a reader) and not assessed ("")."""

    TARGET = "target"
    NON_TARGET = "non-target"
    NORMAL_NODE = "normal node"
    NEW = "new"
    RETIRED = "retired"
    NOT_ASSESSED = ""


class NewLesionState(StrEnum):
    """What a report may say about new lesions at one timepoint."""

    NOT_ASSESSED = "not assessed"
    NONE_FOUND = "no candidates found"
    CANDIDATES = "unconfirmed candidates"
    CONFIRMED = "yes (confirmed)"


@dataclass(frozen=True)
class NewLesionSearch:
    """Whether the new-lesion search ran on a timepoint and how many of its candidates await a decision."""

    ran: bool
    unconfirmed: int = 0

    @classmethod
    def not_run(cls) -> NewLesionSearch:
        return cls(False)


@dataclass
class RecistLesion:
    """What RECIST needs of one lesion at one timepoint."""

    tracking_uid: str
    tracking_id: str = ""
    organ: str | None = None
    is_node: bool = False
    status: LesionStatus = LesionStatus.PRESENT
    long_axis_mm: float = 0.0
    short_axis_mm: float = 0.0
    volume_mm3: float = 0.0

    def __post_init__(self) -> None:
        self.status = LesionStatus(self.status)  # also accepts the stored string value

    @property
    def evaluated(self) -> bool:
        return self.status != LesionStatus.NOT_EVALUATED

    @property
    def vanished(self) -> bool:
        return self.status == LesionStatus.VANISHED

    @classmethod
    def from_measurement(cls, m: LesionMeasurement, organ: str | None = None) -> RecistLesion:
        status = m.status if m.present or m.status is LesionStatus.NOT_EVALUATED else LesionStatus.VANISHED
        return cls(
            m.tracking_uid,
            m.tracking_id,
            organ or m.anatomic_site,
            m.is_node,
            status,
            m.long_axis_mm,
            m.short_axis_mm,
            m.volume_mm3,
        )


@dataclass
class SelectionDecision:
    tracking_uid: str
    tracking_id: str
    role: RecistRole  # target, non-target or normal node
    reason: str
    overridden: bool = False


@dataclass
class TargetSelection:
    """Baseline classification of every lesion, with reasons; overrides are recorded as such."""

    decisions: list[SelectionDecision] = field(default_factory=list)
    overridden_by: str | None = None

    @property
    def targets(self) -> list[str]:
        return [d.tracking_uid for d in self.decisions if d.role is RecistRole.TARGET]

    @property
    def non_targets(self) -> list[str]:
        return [d.tracking_uid for d in self.decisions if d.role is RecistRole.NON_TARGET]

    def role_of(self, uid: str) -> RecistRole | None:
        return next((d.role for d in self.decisions if d.tracking_uid == uid), None)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class TargetOverride:
    """A reader's change to the automatic selection (recorded in the selection with ``overridden=True``)."""

    force_target: Sequence[str] = ()
    force_non_target: Sequence[str] = ()
    by: str = "reader"
    reason: str = "reader override"


def diameter_of(lesion: RecistLesion, rules: RecistRules) -> float:
    """A lesion's contribution to the sum of diameters (nodes: short axis; vanished: 0; too small: 5 mm)."""
    if lesion.vanished:
        return 0.0
    d = lesion.short_axis_mm if lesion.is_node else lesion.long_axis_mm
    if not lesion.is_node and d < rules.too_small_below_mm:
        return rules.too_small_default_mm
    return float(d)


def select_targets(
    baseline: Iterable[RecistLesion],
    rules: RecistRules | None = None,
    *,
    slice_thickness_mm: float | None = None,
    override: TargetOverride | None = None,
) -> TargetSelection:
    """Choose up to ``max_targets`` (≤ ``max_targets_per_organ`` each) of the largest measurable lesions."""
    rules = rules or RecistRules()
    lesions = [b for b in baseline if not b.vanished]
    min_ld = rules.min_long_axis_for(slice_thickness_mm)
    measurable: list[RecistLesion] = []
    decisions: dict[str, SelectionDecision] = {}
    for les in lesions:
        if les.is_node:
            if les.short_axis_mm >= rules.min_node_short_axis_mm:
                measurable.append(les)
            elif les.short_axis_mm >= rules.pathological_node_short_axis_mm:
                decisions[les.tracking_uid] = SelectionDecision(
                    les.tracking_uid,
                    les.tracking_id,
                    RecistRole.NON_TARGET,
                    f"pathological node, short axis {les.short_axis_mm:.1f} mm < {rules.min_node_short_axis_mm:g} mm",
                )
            else:
                decisions[les.tracking_uid] = SelectionDecision(
                    les.tracking_uid,
                    les.tracking_id,
                    RecistRole.NORMAL_NODE,
                    f"node short axis {les.short_axis_mm:.1f} mm < {rules.pathological_node_short_axis_mm:g} mm",
                )
        elif les.long_axis_mm >= min_ld:
            measurable.append(les)
        else:
            decisions[les.tracking_uid] = SelectionDecision(
                les.tracking_uid,
                les.tracking_id,
                RecistRole.NON_TARGET,
                f"non-measurable, long axis {les.long_axis_mm:.1f} mm < {min_ld:g} mm",
            )
    measurable.sort(key=lambda x: diameter_of(x, rules), reverse=True)
    per_organ: dict[str, int] = {}
    n_targets = 0
    for les in measurable:
        organ = (les.organ or "unknown").lower()
        size = f"{'short' if les.is_node else 'long'} axis {diameter_of(les, rules):.1f} mm"
        if n_targets >= rules.max_targets:
            role, reason = RecistRole.NON_TARGET, f"measurable ({size}) but {rules.max_targets} targets already chosen"
        elif per_organ.get(organ, 0) >= rules.max_targets_per_organ:
            role, reason = (
                RecistRole.NON_TARGET,
                (f"measurable ({size}) but {rules.max_targets_per_organ} targets already in {organ}"),
            )
        else:
            role, reason = RecistRole.TARGET, f"measurable ({size}), among the largest"
            per_organ[organ] = per_organ.get(organ, 0) + 1
            n_targets += 1
        decisions[les.tracking_uid] = SelectionDecision(les.tracking_uid, les.tracking_id, role, reason)
    selection = TargetSelection([decisions[x.tracking_uid] for x in lesions])
    if override is not None:
        _apply_override(selection, override, rules)
    return selection


def _apply_override(selection: TargetSelection, override: TargetOverride, rules: RecistRules) -> None:
    """A reader's forced target / non-target roles (each decision says what it was before)."""
    known = {d.tracking_uid: d for d in selection.decisions}
    for uid in list(override.force_target) + list(override.force_non_target):
        if uid not in known:
            raise ValueError(f"target override names unknown lesion {uid}")
    for uid, role in [(u, RecistRole.TARGET) for u in override.force_target] + [
        (u, RecistRole.NON_TARGET) for u in override.force_non_target
    ]:
        d = known[uid]
        if d.role != role:
            d.role, d.reason, d.overridden = role, f"{override.reason} (was: {d.reason})", True
    selection.overridden_by = override.by
    if len(selection.targets) > rules.max_targets:
        raise ValueError(f"override selects {len(selection.targets)} targets, more than {rules.max_targets}")


@dataclass(kw_only=True)
class RecistStatement:
    """What is stated of RECIST 1.1 at one timepoint — by the SR, the dashboard, the API and the exports alike (None:
    not assessed; the new-lesion statement is None at baseline). The patient history's timepoints carry these
    fields (``pipeline.views.history.TimepointInfo`` derives from this class) and the measure step records them
    (``pipeline.jobs.contract.RecistRecord``); both take them from :meth:`TimepointResponse.statement`."""

    sum_of_diameters_mm: float | None = None
    change_from_baseline_pct: float | None = None
    change_from_nadir_pct: float | None = None
    target_response: Response | None = None
    non_target_response: Response | None = None
    new_lesions: bool | None = None  # a confirmed new lesion
    new_lesion_state: NewLesionState | None = None
    new_lesions_text: str | None = None  # what the report says, e.g. "2 unconfirmed candidates"
    overall_response: Response | None = None
    volumetric_response: Response | None = None

    def state(self, statement: RecistStatement) -> None:
        """Take every field of ``statement`` (a subclass keeps its own fields)."""
        for f in fields(RecistStatement):
            setattr(self, f.name, getattr(statement, f.name))


@dataclass
class TimepointResponse:
    """RECIST 1.1 assessment of one timepoint (index 0 = baseline)."""

    index: int
    sum_of_diameters_mm: float | None
    baseline_sum_mm: float
    nadir_sum_mm: float | None  # smallest sum before this timepoint (None at baseline)
    change_from_baseline_pct: float | None
    change_from_nadir_pct: float | None
    change_from_nadir_mm: float | None
    target_response: Response
    non_target_response: Response
    new_lesions: bool  # a confirmed new lesion (tracked, not seen at baseline)
    overall_response: Response
    sum_of_volumes_mm3: float | None = None
    volume_change_from_baseline_pct: float | None = None
    volume_change_from_nadir_pct: float | None = None
    volumetric_response: Response | None = None
    notes: list[str] = field(default_factory=list)
    new_lesion_state: NewLesionState = NewLesionState.NOT_ASSESSED
    new_lesion_candidates: int = 0  # unconfirmed candidates at this timepoint

    @property
    def new_lesions_text(self) -> str:
        """The report's new-lesion statement: only what was assessed."""
        if self.index == 0:
            return "baseline"
        if self.new_lesion_state is NewLesionState.CANDIDATES:
            n = self.new_lesion_candidates
            return f"{n} unconfirmed candidate{'s' if n != 1 else ''}"
        return self.new_lesion_state.value

    def statement(self) -> RecistStatement:
        """What the report states of this timepoint."""
        follow_up = self.index > 0
        return RecistStatement(
            sum_of_diameters_mm=self.sum_of_diameters_mm,
            change_from_baseline_pct=self.change_from_baseline_pct,
            change_from_nadir_pct=self.change_from_nadir_pct,
            target_response=self.target_response,
            non_target_response=self.non_target_response,
            new_lesions=self.new_lesions,
            new_lesion_state=self.new_lesion_state if follow_up else None,
            new_lesions_text=self.new_lesions_text if follow_up else None,
            overall_response=self.overall_response,
            volumetric_response=self.volumetric_response,
        )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, StrEnum):
                d[k] = v.value
        d["new_lesions_text"] = self.new_lesions_text
        return d


@dataclass
class RecistAssessment:
    selection: TargetSelection
    timepoints: list[TimepointResponse]
    best_overall_response: Response

    def to_dict(self) -> dict[str, object]:
        return {
            "selection": self.selection.to_dict(),
            "timepoints": [t.to_dict() for t in self.timepoints],
            "best_overall_response": self.best_overall_response.value,
        }


def _pct(value: float, ref: float) -> float | None:
    return None if ref == 0 else 100.0 * (value - ref) / ref


def assess(
    timepoints: Sequence[Sequence[RecistLesion]],
    rules: RecistRules | None = None,
    *,
    selection: TargetSelection | None = None,
    slice_thickness_mm: float | None = None,
    override: TargetOverride | None = None,
    non_target_progression: Sequence[bool] | None = None,
    new_lesion_search: Sequence[NewLesionSearch | None] | None = None,
) -> RecistAssessment:
    """Assess a series of timepoints (oldest first; the first is the baseline).

    Lesions at a follow-up whose Tracking UID was not seen at baseline (or whose status is "new") are confirmed new
    lesions. ``non_target_progression[i]`` is the reader's "unequivocal non-target progression" flag for timepoint
    ``i``; ``new_lesion_search[i]`` says whether new lesions were looked for there (missing → not assessed).
    """
    rules = rules or RecistRules()
    if not timepoints:
        raise ValueError("RECIST assessment needs at least the baseline timepoint")
    baseline = list(timepoints[0])
    if selection is None:
        selection = select_targets(baseline, rules, slice_thickness_mm=slice_thickness_mm, override=override)
    course = _Course(selection.targets, selection.non_targets, {b.tracking_uid for b in baseline}, rules)
    flags = list(non_target_progression or [])
    searches = list(new_lesion_search or [])
    results = [
        _assess_timepoint(
            course,
            idx,
            tp,
            searches[idx] if idx < len(searches) else None,
            non_target_progression=idx < len(flags) and flags[idx],
        )
        for idx, tp in enumerate(timepoints)
    ]
    return RecistAssessment(selection, results, best_overall_response(results))


@dataclass
class _Course:
    """What the assessment of each timepoint needs: the selection, the rules and the sums of the ones before it."""

    targets: list[str]
    non_targets: list[str]
    baseline_uids: set[str]
    rules: RecistRules
    sums: list[float | None] = field(default_factory=list)  # sum of target diameters per timepoint so far
    vols: list[float | None] = field(default_factory=list)  # sum of target volumes per timepoint so far


def _nadir(values: list[float | None]) -> float | None:
    """The smallest known value before the last one."""
    earlier = [v for v in values[:-1] if v is not None]
    return min(earlier) if earlier else None


def _assess_timepoint(
    course: _Course,
    idx: int,
    tp: Sequence[RecistLesion],
    search: NewLesionSearch | None,
    *,
    non_target_progression: bool,
) -> TimepointResponse:
    rules = course.rules
    by_uid = {les.tracking_uid: les for les in tp}
    notes: list[str] = []
    tgt = [by_uid.get(u) for u in course.targets]
    evaluable = bool(course.targets) and all(t is not None and t.evaluated for t in tgt)
    total = sum(diameter_of(t, rules) for t in tgt if t is not None) if evaluable else None
    vol_total = sum(t.volume_mm3 for t in tgt if t is not None and not t.vanished) if evaluable else None
    course.sums.append(total)
    course.vols.append(vol_total)
    base_sum = course.sums[0] if course.sums[0] is not None else 0.0
    nadir, nadir_v = _nadir(course.sums), _nadir(course.vols)
    v_base = course.vols[0]
    new = _new_lesions(course, idx, tp, notes)
    target_resp = _target_response(course, idx, tgt, total, nadir, notes)
    nt_resp = _non_target_response(course, idx, by_uid, non_target_progression=non_target_progression)
    new_state = _new_lesion_state(idx, new, search, notes)
    return TimepointResponse(
        index=idx,
        sum_of_diameters_mm=total,
        baseline_sum_mm=base_sum,
        nadir_sum_mm=nadir,
        change_from_baseline_pct=None if total is None or idx == 0 else _pct(total, base_sum),
        change_from_nadir_pct=None if total is None or nadir is None else _pct(total, nadir),
        change_from_nadir_mm=None if total is None or nadir is None else total - nadir,
        target_response=target_resp,
        non_target_response=nt_resp,
        new_lesions=new,
        overall_response=Response.NE if idx == 0 else _overall(target_resp, nt_resp, new_state),
        sum_of_volumes_mm3=vol_total,
        volume_change_from_baseline_pct=None
        if vol_total is None or idx == 0 or not v_base
        else _pct(vol_total, v_base),
        volume_change_from_nadir_pct=None if vol_total is None or nadir_v is None else _pct(vol_total, nadir_v),
        volumetric_response=_volumetric_response(rules, idx, vol_total, v_base, nadir_v),
        new_lesion_state=new_state if idx > 0 else NewLesionState.NOT_ASSESSED,
        new_lesion_candidates=(search.unconfirmed if search and search.ran else 0) if idx > 0 else 0,
        notes=notes,
    )


def _new_lesions(course: _Course, idx: int, tp: Sequence[RecistLesion], notes: list[str]) -> bool:
    """Confirmed new lesions at a follow-up: status "new", or a Tracking UID not seen at baseline (noted)."""
    uids = course.baseline_uids
    new = idx > 0 and any(
        les.status == LesionStatus.NEW or (les.tracking_uid not in uids and not les.vanished) for les in tp
    )
    if new:
        notes.append(
            "new lesion(s): "
            + ", ".join(
                les.tracking_id or les.tracking_uid
                for les in tp
                if les.status == LesionStatus.NEW or les.tracking_uid not in uids
            )
        )
    return new


def _target_response(
    course: _Course,
    idx: int,
    tgt: list[RecistLesion | None],
    total: float | None,
    nadir: float | None,
    notes: list[str],
) -> Response:
    rules = course.rules
    if not course.targets:
        return Response.ND
    if total is None:
        notes.append("not all target lesions evaluated")
        return Response.NE
    if idx == 0:
        return Response.NE
    if nadir is None:  # no earlier timepoint had an evaluable sum: nothing to compare against
        notes.append("no earlier evaluable target sum")
        return Response.NE
    base_sum = course.sums[0] if course.sums[0] is not None else 0.0
    nodes_ok = all(
        t.vanished or not t.is_node or t.short_axis_mm < rules.node_cr_short_axis_mm for t in tgt if t is not None
    )
    others_gone = all(t.vanished for t in tgt if t is not None and not t.is_node)
    if (
        _pct(total, nadir) is not None
        and (total - nadir) >= rules.pd_min_absolute_mm
        and 100.0 * (total - nadir) / nadir >= rules.pd_threshold_pct
    ) or (nadir == 0 and total - nadir >= rules.pd_min_absolute_mm):
        return Response.PD
    if others_gone and nodes_ok:
        return Response.CR
    if base_sum > 0 and 100.0 * (total - base_sum) / base_sum <= rules.pr_threshold_pct:
        return Response.PR
    return Response.SD


def _non_target_response(
    course: _Course, idx: int, by_uid: dict[str, RecistLesion], *, non_target_progression: bool
) -> Response:
    nts = [by_uid.get(u) for u in course.non_targets]
    if not course.non_targets:
        return Response.ND
    if idx == 0:
        return Response.NE
    if non_target_progression:
        return Response.PD
    if any(n is None or not n.evaluated for n in nts):
        return Response.NE
    cr = course.rules.node_cr_short_axis_mm
    if all(n is not None and (n.vanished or (n.is_node and n.short_axis_mm < cr)) for n in nts):
        return Response.CR
    return Response.NON_CR_NON_PD


def _new_lesion_state(idx: int, new: bool, search: NewLesionSearch | None, notes: list[str]) -> NewLesionState:
    if new:
        state = NewLesionState.CONFIRMED
    elif search is None or not search.ran:
        state = NewLesionState.NOT_ASSESSED
    elif search.unconfirmed:
        state = NewLesionState.CANDIDATES
    else:
        state = NewLesionState.NONE_FOUND
    if idx > 0 and state is NewLesionState.NOT_ASSESSED:
        notes.append("new lesions not assessed: no CR/PR/SD can be declared")
    if idx > 0 and state is NewLesionState.CANDIDATES:
        notes.append(
            f"{search.unconfirmed if search else 0} equivocal new-lesion candidate(s): follow up; "
            "PD only once confirmed"
        )
    return state


def _volumetric_response(
    rules: RecistRules, idx: int, vol_total: float | None, v_base: float | None, nadir_v: float | None
) -> Response | None:
    """The volumetric secondary readout (sum of target volumes)."""
    if idx == 0 or vol_total is None or not v_base:
        return None
    if nadir_v is not None and nadir_v > 0 and 100.0 * (vol_total - nadir_v) / nadir_v >= rules.volume_pd_threshold_pct:
        return Response.PD
    if vol_total == 0:
        return Response.CR
    if 100.0 * (vol_total - v_base) / v_base <= rules.volume_pr_threshold_pct:
        return Response.PR
    return Response.SD


def _overall(target: Response, non_target: Response, new: NewLesionState) -> Response:
    """RECIST 1.1 table 1 (targets present) and table 2 (non-target disease only); every CR/PR/SD/Non-CR/Non-PD row
    of those tables needs "new lesions: no", so without a search for them only PD or NE can be stated."""
    if new is NewLesionState.CONFIRMED or target is Response.PD or non_target is Response.PD:
        return Response.PD
    if new is NewLesionState.NOT_ASSESSED:
        return Response.NE
    if target is Response.ND:  # table 2
        if non_target is Response.ND:
            return Response.ND
        return {Response.CR: Response.CR, Response.NON_CR_NON_PD: Response.NON_CR_NON_PD}.get(non_target, Response.NE)
    if target is Response.NE:
        return Response.NE
    if target is Response.CR:
        return Response.CR if non_target in (Response.CR, Response.ND) else Response.PR
    if target is Response.PR:
        return Response.PR
    return Response.SD


_RANK = {
    Response.CR: 0,
    Response.PR: 1,
    Response.NON_CR_NON_PD: 2,
    Response.SD: 2,
    Response.PD: 3,
    Response.NE: 4,
    Response.ND: 5,
}


def best_overall_response(timepoints: Sequence[TimepointResponse]) -> Response:
    """Best response recorded from the first follow-up until progression (no confirmation requirement applied)."""
    best = Response.NE
    for tp in timepoints[1:]:
        r = tp.overall_response
        if _RANK[r] < _RANK[best]:
            best = r
        if r is Response.PD:
            break
    return best
