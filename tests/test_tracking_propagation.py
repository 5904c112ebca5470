"""Issue 14: every follow-up is propagated from the person's annotation (never from a chain of our results).

Source selection in the tracking loop (registrations are source → follow-up, the prompt is the warped annotation,
the reference is the annotated CT) and in the pure selection used by the service; a lesion that vanishes and
reappears; growth ×3 and shrinkage ×0.3 without a leak that grows; provenance recorded on every result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.base import SegReference
from lesiontrack.models.segmentation.prompts import Prompt
from lesiontrack.pipeline.science.lesions import LesionStatus
from lesiontrack.pipeline.science.prompt_selection import (
    AnnotationCandidate,
    AnnotationOrigin,
    MarkedLesions,
    NoPersonAnnotation,
    choose_lesion_sources,
    choose_prompt_source,
    nearest_source_index,
)
from lesiontrack.pipeline.science.tracking import (
    Confirmed,
    NoRegistrationEngine,
    RegistrationCache,
    TrackingOptions,
    track_lesions,
    tracking_summary,
)
from tests.support.phantom import LESIONS, dice, mask_prompts, phantom_volumes, series


class _SpyRegistration:
    """Identity registration that records every (moving, fixed) pair it is asked for."""

    name, version = "spy", "1"

    def __init__(self) -> None:
        self.pairs: list[tuple[int, int]] = []
        self.inner = NoRegistrationEngine()

    def register(self, baseline: Volume, followup: Volume) -> Any:
        self.pairs.append((id(baseline), id(followup)))
        return self.inner.register(baseline, followup)


class _SpyEngine:
    """Adaptive engine that records which CT each call's reference (the prompt's source) came from."""

    name, version = "spy-adaptive", "1"

    def __init__(self) -> None:
        self.inner = build_segmentation("adaptive")
        self.references: list[int | None] = []

    def segment(self, image: Volume, prompt: Prompt, reference: SegReference | None = None) -> Volume:
        self.references.append(None if reference is None else id(reference.image))
        return self.inner.segment(image, prompt, reference)


def _radii(*factors_per_tp: tuple[float, ...]) -> list[list[float]]:
    base = [les.radius_mm for les in LESIONS]
    return [[r * f for r, f in zip(base, fs, strict=True)] for fs in factors_per_tp]


def test_every_followup_is_registered_to_and_prompted_from_the_annotated_timepoint() -> None:
    shifts = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1))
    phantom = series(seed=3, shifts_mm=shifts, radii_per_tp=_radii(*[(1, 1, 1, 1, 1, 1)] * 4))
    tps = phantom_volumes(phantom)
    reg, eng = _SpyRegistration(), _SpyEngine()
    track_lesions(tps, mask_prompts(phantom[0]), source_index=0, registration=reg, segmentation=eng)
    base = id(tps[0].ct)
    assert reg.pairs == [(base, id(tps[t].ct)) for t in (1, 2, 3)], "each follow-up registered directly, once"
    assert eng.references, "every prompt's reference is the annotated CT"
    assert set(eng.references) == {base}, "every prompt's reference is the annotated CT"
    for t in (1, 2, 3):
        for les in tps[t].lesions:
            assert les.propagated_from is not None
            assert les.propagated_from.by_person
            assert les.propagated_from.series_uid == tps[0].series_uid
            assert les.propagated_from.timepoint_index == 0
    # the former loop, for contrast: a chain of adjacent pairs, prompted with our previous result
    tps2 = phantom_volumes(phantom)
    reg2, eng2 = _SpyRegistration(), _SpyEngine()
    track_lesions(
        tps2,
        mask_prompts(phantom[0]),
        source_index=0,
        registration=reg2,
        segmentation=eng2,
        options=TrackingOptions(propagation="chain"),
    )
    assert reg2.pairs == [(id(tps2[t - 1].ct), id(tps2[t].ct)) for t in (1, 2, 3)]
    assert not tps2[3].lesions[0].propagated_from.by_person


def test_backwards_and_confirmed_timepoints_use_the_nearest_annotation() -> None:
    phantom = series(seed=4, shifts_mm=((0, 0, 0),) * 5, radii_per_tp=_radii(*[(1, 1, 1, 1, 1, 1)] * 5))
    tps = phantom_volumes(phantom)
    reg = _SpyRegistration()
    # annotated at T1 (the "baseline" given last in time order) and confirmed at T4
    track_lesions(
        tps,
        mask_prompts(phantom[1]),
        source_index=1,
        registration=reg,
        segmentation=build_segmentation("adaptive"),
        confirmed=Confirmed({4: mask_prompts(phantom[4])}),
    )
    ids = [id(tp.ct) for tp in tps]
    assert sorted(reg.pairs) == sorted([(ids[1], ids[2]), (ids[4], ids[3]), (ids[1], ids[0])])
    assert {les.propagated_from.timepoint_index for les in tps[3].lesions} == {4}
    assert {les.propagated_from.timepoint_index for les in tps[0].lesions} == {1}
    assert nearest_source_index(2, [1, 4]) == 1
    assert nearest_source_index(3, [1, 4]) == 4


def test_a_correction_at_a_follow_up_is_the_source_of_every_later_follow_up() -> None:
    # issue 16: a radiologist corrects follow-up 1; follow-ups 2 and 3 are propagated from that correction
    radii = _radii((1,) * 6, (1.2,) * 6, (1.3,) * 6, (1.4,) * 6)
    phantom = series(seed=8, shifts_mm=((0, 0, 0),) * 4, radii_per_tp=radii)
    tps = phantom_volumes(phantom)
    reg, eng = _SpyRegistration(), _SpyEngine()
    correction = mask_prompts(phantom[1])
    track_lesions(
        tps,
        mask_prompts(phantom[0]),
        source_index=0,
        registration=reg,
        segmentation=eng,
        confirmed=Confirmed({1: correction}),
    )
    ids = [id(tp.ct) for tp in tps]
    assert reg.pairs == [(ids[1], ids[2]), (ids[1], ids[3])], "registered from the correction, not T0"
    assert eng.references, "the corrected CT is every prompt's reference"
    assert set(eng.references) == {ids[1]}, "the corrected CT is every prompt's reference"
    by_label = {p.identity.label: p for p in correction}
    for les in tps[1].lesions:  # the correction is adopted as drawn
        assert np.array_equal(les.mask.array > 0, by_label[les.identity.label].mask.array > 0)
    for t in (2, 3):
        for les in tps[t].lesions:
            assert les.propagated_from is not None
            assert les.propagated_from.by_person
            assert les.propagated_from.timepoint_index == 1
            assert les.propagated_from.series_uid == tps[1].series_uid
            assert dice(les.mask.array, phantom[t].labels.array == les.identity.label) > 0.7


def test_registration_cache_registers_each_pair_of_series_once() -> None:
    phantom = series(seed=5, shifts_mm=((0, 0, 0), (1, 0, 0)), radii_per_tp=_radii((1,) * 6, (1,) * 6))
    spy = _SpyRegistration()
    cache = RegistrationCache(spy)
    for _ in range(2):  # two passes over the same series (e.g. a re-run)
        track_lesions(
            phantom_volumes(phantom),
            mask_prompts(phantom[0]),
            source_index=0,
            registration=cache,
            segmentation=build_segmentation("warped-prompt"),
        )
    assert len(spy.pairs) == 1
    assert len(cache.pairs) == 1


def test_a_lesion_that_vanishes_and_reappears_is_found_again() -> None:
    # lesion 1 (lung nodule) present, present, gone, back; the others stable
    radii = _radii((1,) * 6, (1,) * 6, (0, 1, 1, 1, 1, 1), (1.1, 1, 1, 1, 1, 1))
    phantom = series(seed=6, shifts_mm=((0, 0, 0), (1, -1, 0), (-1, 1, 1), (2, 0, -1)), radii_per_tp=radii)
    tps = phantom_volumes(phantom)
    track_lesions(
        tps,
        mask_prompts(phantom[0]),
        source_index=0,
        registration=_OracleShift(phantom, ((0, 0, 0), (1, -1, 0), (-1, 1, 1), (2, 0, -1))),
        segmentation=build_segmentation("adaptive"),
    )
    status = [next(les for les in tp.lesions if les.identity.label == 1).status for tp in tps]
    assert status == [LesionStatus.PRESENT, LesionStatus.PRESENT, LesionStatus.VANISHED, LesionStatus.PRESENT]
    back = next(les for les in tps[3].lesions if les.identity.label == 1)
    assert dice(back.mask.array, phantom[3].labels.array == 1) >= 0.8
    assert any("reappeared" in n for n in back.notes)
    # back after a complete response (progression under RECIST 1.1): a claim a reader confirms
    assert back.meta.get("review") is True
    assert any("reported vanished at the neighbouring" in (s.reason or "") for s in back.meta["confidence"].signals)
    gone = next(les for les in tps[2].lesions if les.identity.label == 1)
    assert gone.meta.get("review") is True  # present at the neighbouring timepoint: flagged for a reader


class _OracleShift:
    """The phantom's exact rigid shifts as a registration (isolates the loop and the engine from registration)."""

    name, version = "oracle-shift", "1"

    def __init__(self, phantom: Any, shifts: tuple[tuple[float, float, float], ...]) -> None:
        self.by_id = {id(tp.ct): np.array(s, float) for tp, s in zip(phantom, shifts, strict=True)}

    def register(self, baseline: Volume, followup: Volume) -> Any:
        from lesiontrack.pipeline.science.tracking import IdentityRegistration

        d = self.by_id[id(followup)] - self.by_id[id(baseline)]  # follow-up point + d = baseline point
        reg = IdentityRegistration(baseline, followup)

        def warp_labels(labels: Volume) -> Volume:
            moved = Volume(labels.array, labels.origin - d, labels.spacing, labels.direction)
            return moved.resample_to(followup, label=True)

        reg.warp_labels = warp_labels  # type: ignore[method-assign,assignment]  # test double for one method
        return reg


@pytest.mark.parametrize("propagation", ["annotation"])
def test_growth_x3_and_shrinkage_x0_3_followed_without_a_growing_leak(propagation: str) -> None:
    g3, s3 = 3 ** (1 / 3), 0.3 ** (1 / 3)
    # lung nodule grows to x3 volume, low-contrast liver lesion shrinks to x0.3, the wall nodule (same density as
    # the chest wall it touches) grows to x3, liver pair stable
    steps = [0.0, 1 / 3, 2 / 3, 1.0]
    radii = _radii(*[(g3**s, s3**s, 1, 1, g3**s, 1) for s in steps])
    shifts = ((0, 0, 0), (1, -1, 0), (-1, 1, 1), (2, 0, -1))
    phantom = series(seed=7, shifts_mm=shifts, radii_per_tp=radii)
    tps = phantom_volumes(phantom)
    track_lesions(
        tps,
        mask_prompts(phantom[0]),
        source_index=0,
        registration=_OracleShift(phantom, shifts),
        segmentation=build_segmentation("adaptive"),
        options=TrackingOptions(propagation=propagation),
    )
    vox = float(np.prod(tps[0].ct.spacing))
    errors: dict[int, list[float]] = {}
    for t in (1, 2, 3):
        for les in tps[t].lesions:
            n = les.identity.label
            if n == 6:
                continue
            truth = phantom[t].labels.array == n
            pred = les.mask.array > 0
            assert les.status is LesionStatus.PRESENT, (t, n)
            err = (pred.sum() - truth.sum()) * vox / (truth.sum() * vox)
            errors.setdefault(n, []).append(float(err))
            assert abs(err) <= 0.25, f"L{n} at T{t}: volume error {err:+.0%}"
            assert dice(pred, truth) >= 0.75, f"L{n} at T{t}: Dice {dice(pred, truth):.2f}"
    for n, errs in errors.items():  # a leak would grow from one follow-up to the next
        assert errs[-1] <= max(errs[0], 0.0) + 0.15, f"L{n}: volume error grows {errs}"


def test_provenance_is_in_tracking_json() -> None:
    phantom = series(seed=8, shifts_mm=((0, 0, 0), (1, 0, 0)), radii_per_tp=_radii((1,) * 6, (1,) * 6))
    tps = phantom_volumes(phantom)
    track_lesions(
        tps,
        mask_prompts(phantom[0]),
        source_index=0,
        registration=NoRegistrationEngine(),
        segmentation=build_segmentation("adaptive"),
    )
    summary = tracking_summary(tps)
    for les in summary["lesions"]:
        base, fu = les["timepoints"]
        assert base["propagated_from"] is None  # the annotation itself
        assert fu["propagated_from"]["series_uid"] == tps[0].series_uid
        assert fu["propagated_from"]["by_person"]
        assert fu["propagated_from"]["annotation"] == "test"


# -- pure source selection (the service's match_priors uses it) ----------------------------------------------
def _cand(uid: str, when: str, origin: AnnotationOrigin, modality: str = "SEG", **kw: Any) -> AnnotationCandidate:
    return AnnotationCandidate(uid, modality, f"ct.{when}", when, origin, **kw)


def test_selection_picks_the_persons_annotation_over_our_newer_results() -> None:
    cands = [
        _cand("baseline-seg", "20240101000000", AnnotationOrigin.PERSON),
        _cand("our-fu1-seg", "20240301000000", AnnotationOrigin.OURS),
        _cand("our-fu2-seg", "20240501000000", AnnotationOrigin.OURS),
    ]
    choice = choose_prompt_source(cands, "20240701000000")
    assert choice is not None
    assert choice.chosen.sop_instance_uid == "baseline-seg"
    assert {c.sop_instance_uid for c in choice.skipped} == {"our-fu1-seg", "our-fu2-seg"}
    # a result of ours that a person confirmed counts as theirs, and it is nearer
    cands.append(_cand("verified-fu2", "20240501000000", AnnotationOrigin.OURS, confirmed=True))
    assert choose_prompt_source(cands, "20240701000000").chosen.sop_instance_uid == "verified-fu2"
    # SEG over SR at one timepoint; nothing later than the follow-up is used
    two = [
        _cand("sr", "20240101000000", AnnotationOrigin.PERSON, "SR"),
        _cand("seg", "20240101000000", AnnotationOrigin.PERSON),
        _cand("later", "20250101000000", AnnotationOrigin.PERSON),
    ]
    assert choose_prompt_source(two, "20240601000000").chosen.sop_instance_uid == "seg"


def test_selection_refuses_to_propagate_from_our_results_alone() -> None:
    with pytest.raises(NoPersonAnnotation):
        choose_prompt_source([_cand("ours", "20240101000000", AnnotationOrigin.OURS)], "20240601000000")
    assert choose_prompt_source([], "20240601000000") is None


def test_our_seg_is_told_apart_from_a_persons_seg(tmp_path: Path) -> None:
    """Manufacturer LesionTrack + SEMIAUTOMATIC = ours; a MANUAL SEG (drawn by a person) is the person's."""
    from lesiontrack.pipeline.dicom.seg.writer import save_new, write_seg
    from lesiontrack.pipeline.science.prompt_selection import is_our_object
    from tests.support.segsr import make_series

    tp = make_series(tmp_path, n_timepoints=1)[0]
    ours = save_new(write_seg(tp.datasets, tp.lesions).dataset, tmp_path / "ours")
    person = save_new(write_seg(tp.datasets, tp.lesions, algorithm_type="MANUAL").dataset, tmp_path / "person")
    other = save_new(write_seg(tp.datasets, tp.lesions, manufacturer="Workstation X").dataset, tmp_path / "other")
    assert is_our_object(ours)
    assert not is_our_object(person)
    assert not is_our_object(other)


def test_each_lesion_is_prompted_from_its_own_nearest_persons_annotation() -> None:
    """Issue 31 C (LinGuinE, per lesion): the baseline SEG marks L1-L3, a follow-up's GSPS arrow marks L2 only, our
    own result on that follow-up marks all three. For the next follow-up L2 is prompted from the arrow, L1 and L3
    from the baseline SEG — not "not assessed" — and our result prompts nothing; a lesion only ours marks is unmarked.
    """
    person = AnnotationOrigin.PERSON
    base = MarkedLesions(_cand("seg", "20240101000000", person), frozenset({"L1", "L2", "L3"}))
    arrow = MarkedLesions(_cand("gsps", "20240301000000", person, modality="PR"), frozenset({"L2"}))
    ours = MarkedLesions(_cand("ours", "20240301000000", AnnotationOrigin.OURS), frozenset({"L1", "L2", "L3", "L4"}))
    later = MarkedLesions(_cand("after", "20240901000000", person), frozenset({"L1"}))  # after the follow-up: not used
    chosen = choose_lesion_sources([base, arrow, ours, later], "20240601000000")
    assert {uid: a.sop_instance_uid for uid, a in chosen.by_lesion.items()} == {"L1": "seg", "L2": "gsps", "L3": "seg"}
    assert chosen.unmarked == ("L4",)
    assert chosen.timepoints() == {"ct.20240301000000": ["L2"], "ct.20240101000000": ["L1", "L3"]}
    # at one timepoint a SEG beats a presentation state (the whole-timepoint rule, per lesion)
    both = MarkedLesions(_cand("seg-fu", "20240301000000", person), frozenset({"L2"}))
    assert choose_lesion_sources([base, arrow, both], "20240601000000").by_lesion["L2"].sop_instance_uid == "seg-fu"
