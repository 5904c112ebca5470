"""Hand-worked multi-timepoint RECIST 1.1 cases (sums computed by hand in the comments)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from lesiontrack.pipeline.science.recist import (
    NewLesionSearch,
    NewLesionState,
    RecistAssessment,
    RecistLesion,
    RecistRules,
    Response,
    TargetOverride,
    diameter_of,
    select_targets,
)
from lesiontrack.pipeline.science.recist import assess as assess_with


def assess(timepoints: Sequence[Sequence[RecistLesion]], **kw: Any) -> RecistAssessment:
    """The hand-worked cases below are of timepoints searched for new lesions with none found."""
    kw.setdefault("new_lesion_search", [NewLesionSearch(True)] * len(timepoints))
    return assess_with(timepoints, **kw)


def L(
    uid: str,
    ld: float = 0.0,
    sa: float = 0.0,
    *,
    organ: str = "liver",
    node: bool = False,
    status: str = "present",
    vol: float = 0.0,
) -> RecistLesion:
    return RecistLesion(uid, f"{uid} {organ}", organ, node, status, ld, sa, vol)


def test_selection_max_five_two_per_organ_and_measurability() -> None:
    base = [
        L("L1", 50),
        L("L2", 40),
        L("L3", 30),  # 3 liver: only 2 targets
        L("L4", 25, organ="lung"),
        L("L5", 22, organ="lung"),
        L("L6", 21, organ="adrenal"),
        L("L7", 20, organ="kidney"),  # 6th measurable: over the limit
        L("L8", 8, organ="lung"),  # < 10 mm: non-measurable
        L("N1", 20, 16, organ="node", node=True),  # SA 16 >= 15: measurable node
        L("N2", 18, 12, organ="node", node=True),  # SA 12: pathological non-target
        L("N3", 9, 6, organ="node", node=True),
    ]  # SA 6: normal node
    sel = select_targets(base)
    assert sel.targets == ["L1", "L2", "L4", "L5", "L6"]
    assert set(sel.non_targets) == {"L3", "L7", "L8", "N1", "N2"}
    assert sel.role_of("N3") == "normal node"
    assert "2 targets already in liver" in next(d.reason for d in sel.decisions if d.tracking_uid == "L3")
    # N1 (SA 16) is smaller than L6 (21) and L7 (20): ranked by diameter, it misses the 5 slots
    assert "5 targets already chosen" in next(d.reason for d in sel.decisions if d.tracking_uid == "N1")


def test_selection_thick_slices_and_configurable_rules() -> None:
    base = [L("L1", 12), L("L2", 30, organ="lung")]
    assert select_targets(base, slice_thickness_mm=8).targets == ["L2"]  # needs 2 x 8 = 16 mm
    assert select_targets(base).targets == ["L1", "L2"]  # baseline order
    assert select_targets(base, RecistRules(max_targets=1)).targets == ["L2"]


def test_rules_come_from_the_recist_settings_section(tmp_path) -> None:
    """The rules are the [recist] settings section; the defaults agree; a protocol change takes effect."""
    from lesiontrack.config.settings import RecistSettings, load_settings

    assert RecistRules.from_settings(RecistSettings()) == RecistRules()
    cfg = tmp_path / "lt.toml"
    cfg.write_text("[recist]\nmax_targets = 1\npd_threshold_pct = 25.0\n")
    rules = RecistRules.from_settings(load_settings(cfg).recist)
    assert (rules.max_targets, rules.pd_threshold_pct) == (1, 25.0)
    assert select_targets([L("L1", 12), L("L2", 30, organ="lung")], rules).targets == ["L2"]
    cfg.write_text("[recist]\nmax_targets = 0\n")
    with pytest.raises(ValueError, match="max_targets"):
        load_settings(cfg)


def test_override_is_recorded_and_used() -> None:
    base = [L("L1", 50), L("L2", 40), L("L3", 30)]
    sel = select_targets(
        base,
        override=TargetOverride(force_target=["L3"], force_non_target=["L2"], by="dr x", reason="L2 not reproducible"),
    )
    assert sel.targets == ["L1", "L3"]
    d = {x.tracking_uid: x for x in sel.decisions}
    assert d["L3"].overridden
    assert d["L2"].overridden
    assert not d["L1"].overridden
    assert sel.overridden_by == "dr x"
    assert "L2 not reproducible" in d["L2"].reason
    with pytest.raises(ValueError, match="unknown lesion"):
        select_targets(base, override=TargetOverride(force_target=["nope"]))


def test_nadir_after_baseline_pd_vs_nadir_not_baseline() -> None:
    # targets L1, L2 (liver) and L3 (lung). Baseline sum 30+20+10 = 60.
    # t1: 20+10+10 = 40 → -33 % vs baseline → PR.  t2: 18+8+4(→5 too small) = 31 → -48 % → PR, nadir 40 before.
    # t3: 22+10+6 = 38: vs nadir 31 = +22.6 % and +7 mm → PD, although still -37 % vs baseline.
    tps = [
        [L("L1", 30), L("L2", 20), L("L3", 10, organ="lung")],
        [L("L1", 20), L("L2", 10), L("L3", 10, organ="lung")],
        [L("L1", 18), L("L2", 8), L("L3", 4, organ="lung")],
        [L("L1", 22), L("L2", 10), L("L3", 6, organ="lung")],
    ]
    a = assess(tps)
    r = a.timepoints
    assert [t.sum_of_diameters_mm for t in r] == [60, 40, 31, 38]
    assert [t.target_response for t in r[1:]] == [Response.PR, Response.PR, Response.PD]
    assert r[3].nadir_sum_mm == 31
    assert r[3].change_from_nadir_mm == pytest.approx(7)
    assert r[3].change_from_nadir_pct == pytest.approx(100 * 7 / 31)
    assert r[3].change_from_baseline_pct == pytest.approx(100 * (38 - 60) / 60)
    assert [t.overall_response for t in r[1:]] == [Response.PR, Response.PR, Response.PD]
    assert a.best_overall_response is Response.PR
    json.dumps(a.to_dict())


def test_pd_needs_5mm_absolute() -> None:
    # baseline 20 → 12 (PR, -40 %) → 15: +25 % vs nadir 12 but only +3 mm → not PD; -25 % vs baseline → SD
    r = assess([[L("L1", 20)], [L("L1", 12)], [L("L1", 15)]]).timepoints
    assert [t.target_response for t in r[1:]] == [Response.PR, Response.SD]


def test_node_shrinking_below_10mm_gives_cr_with_nonzero_sum() -> None:
    # targets: liver L1 LD 30, node N1 SA 20 → sum 50. Follow-up: L1 vanished (0), N1 SA 8 → sum 8, CR.
    base = [L("L1", 30), L("N1", 25, 20, organ="node", node=True)]
    fu = [L("L1", status="vanished"), L("N1", 11, 8, organ="node", node=True)]
    r = assess([base, fu]).timepoints[1]
    assert r.sum_of_diameters_mm == 8
    assert r.target_response is Response.CR
    assert r.overall_response is Response.CR
    # node at 10 mm is not CR: sum 10 = -80 % → PR
    fu2 = [L("L1", status="vanished"), L("N1", 12, 10, organ="node", node=True)]
    assert assess([base, fu2]).timepoints[1].target_response is Response.PR


def test_new_lesion_only_gives_pd() -> None:
    # target sizes unchanged (SD), but a new lesion appears → overall PD
    base = [L("L1", 30), L("L2", 12, organ="lung")]
    fu = [L("L1", 30), L("L2", 12, organ="lung"), L("L9", 7, organ="bone", status="new")]
    r = assess([base, fu]).timepoints[1]
    assert r.target_response is Response.SD
    assert r.new_lesions
    assert r.overall_response is Response.PD
    # a lesion never seen at baseline counts as new even if not flagged
    fu2 = [L("L1", 30), L("L2", 12, organ="lung"), L("L9", 7, organ="bone")]
    assert assess([base, fu2]).timepoints[1].overall_response is Response.PD


def test_non_target_handling_and_table1() -> None:
    # L1 target; L2 (8 mm) non-measurable → non-target.
    base = [L("L1", 30), L("L2", 8)]
    # target CR + non-target still present → overall PR (table 1 row 2)
    r = assess([base, [L("L1", status="vanished"), L("L2", 6)]]).timepoints[1]
    assert (r.target_response, r.non_target_response, r.overall_response) == (
        Response.CR,
        Response.NON_CR_NON_PD,
        Response.PR,
    )
    # all gone → CR
    r = assess([base, [L("L1", status="vanished"), L("L2", status="vanished")]]).timepoints[1]
    assert r.overall_response is Response.CR
    assert r.non_target_response is Response.CR
    # reader flags unequivocal non-target progression → PD regardless of target response
    r = assess([base, [L("L1", 15), L("L2", 8)]], non_target_progression=[False, True]).timepoints[1]
    assert r.target_response is Response.PR
    assert r.overall_response is Response.PD
    # non-target not evaluated + target SD → SD (table 1 row 5)
    r = assess([base, [L("L1", 28), L("L2", status="not_evaluated")]]).timepoints[1]
    assert r.non_target_response is Response.NE
    assert r.overall_response is Response.SD


def test_not_all_targets_evaluated_gives_ne() -> None:
    base = [L("L1", 30), L("L2", 20, organ="lung")]
    r = assess([base, [L("L1", 30)]]).timepoints[1]  # L2 missing at follow-up
    assert r.target_response is Response.NE
    assert r.overall_response is Response.NE
    assert r.sum_of_diameters_mm is None


def test_non_target_only_disease_table2() -> None:
    base = [L("L1", 8), L("N2", 15, 12, organ="node", node=True)]  # nothing measurable
    tps = [
        base,
        [L("L1", 8), L("N2", 15, 12, organ="node", node=True)],
        [L("L1", status="vanished"), L("N2", 10, 9, organ="node", node=True)],
    ]
    r = assess(tps).timepoints
    assert r[1].target_response is Response.ND
    assert r[1].overall_response is Response.NON_CR_NON_PD
    assert r[2].overall_response is Response.CR


def test_volumetric_secondary_readout() -> None:
    # target volumes 10000 → 3000 (-70 % → PR) → 6000 (+100 % vs nadir 3000 → PD)
    tps = [[L("L1", 30, vol=10000)], [L("L1", 20, vol=3000)], [L("L1", 22, vol=6000)]]
    r = assess(tps).timepoints
    assert r[1].volumetric_response is Response.PR
    assert r[1].volume_change_from_baseline_pct == pytest.approx(-70)
    assert r[2].volumetric_response is Response.PD
    assert r[2].volume_change_from_nadir_pct == pytest.approx(100)
    assert r[2].target_response is Response.SD  # diameters: 22 vs nadir 20 = +10 %


def test_too_small_and_vanished_values() -> None:
    rules = RecistRules()
    assert diameter_of(L("a", 3), rules) == 5.0
    assert diameter_of(L("a", 3, status="vanished"), rules) == 0.0
    assert diameter_of(L("n", 6, 4, node=True), rules) == 4.0  # nodes keep their real short axis


def test_new_lesions_are_stated_only_as_far_as_they_were_looked_for() -> None:
    base = [L("L1", 30)]
    fu = [L("L1", 15)]  # -50 %: PR by the targets
    not_searched = assess_with([base, fu]).timepoints[1]
    assert not_searched.new_lesion_state is NewLesionState.NOT_ASSESSED
    assert not_searched.new_lesions_text == "not assessed"
    assert not_searched.target_response is Response.PR
    assert not_searched.overall_response is Response.NE, "no PR without a search for new lesions"
    none = assess_with([base, fu], new_lesion_search=[None, NewLesionSearch(True)]).timepoints[1]
    assert none.new_lesion_state is NewLesionState.NONE_FOUND
    assert none.overall_response is Response.PR
    assert none.new_lesions_text == "no candidates found"
    equivocal = assess_with([base, fu], new_lesion_search=[None, NewLesionSearch(True, 2)]).timepoints[1]
    assert equivocal.new_lesion_state is NewLesionState.CANDIDATES
    assert equivocal.new_lesion_candidates == 2
    assert equivocal.overall_response is Response.PR, "an equivocal new lesion alone is not PD"
    assert equivocal.new_lesions_text == "2 unconfirmed candidates"
    assert any("equivocal" in n for n in equivocal.notes)
    confirmed = assess_with([base, [*fu, L("N1", 8)]], new_lesion_search=[None, NewLesionSearch(True)]).timepoints[1]
    assert confirmed.new_lesion_state is NewLesionState.CONFIRMED
    assert confirmed.new_lesions
    assert confirmed.overall_response is Response.PD
    assert confirmed.new_lesions_text == "yes (confirmed)"


def test_progression_by_targets_stands_without_a_new_lesion_search() -> None:
    r = assess_with([[L("L1", 20)], [L("L1", 30)]]).timepoints[1]
    assert r.new_lesion_state is NewLesionState.NOT_ASSESSED
    assert r.overall_response is Response.PD
