"""Gone or too small to measure: a lesion that shrank to a few voxels on 5 mm slices is not reported vanished.

A lung nodule on a 2 × 2 × 5 mm grid shrinks to a focus of a few voxels (below what the engine segments), or is gone,
or is gone with a vessel running through its site (lung vessels are as bright as a nodule), or is gone beside a thick
vessel that its (drawn, leaky) prior took in. The tracking loop keeps the focus as a present lesion, flagged for
review with the reason (which gives its measured long axis); a gone lesion, vessel or not, stays vanished. RECIST
decides it is too small to measure and counts it at its default 5 mm, not 0.
"""

from __future__ import annotations

import numpy as np

from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.base import SegReference
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.models.segmentation.residual import residual_focus, surroundings
from lesiontrack.pipeline.science.lesions import LesionStatus, Timepoint, TrackedLesion
from lesiontrack.pipeline.science.measurements import measure_lesion
from lesiontrack.pipeline.science.recist import RecistLesion, RecistRules, diameter_of
from lesiontrack.pipeline.science.tracking import NoRegistrationEngine, TrackingOptions, track_lesions

SPACING = (2.0, 2.0, 5.0)  # x, y, z mm: 5 mm slices
SHAPE = (16, 48, 48)  # k, j, i
CENTRE = np.array([1.0, 1.0, 1.0])  # mm, between voxel centres as a real nodule would be


def _ct(nodule_radius_mm: float, vessel: bool, seed: int) -> tuple[Volume, Volume]:
    """Lung (-850 HU) with a solid nodule (30 HU) of ``nodule_radius_mm`` at CENTRE, partial volume on its edge, an
    optional vessel (40 HU, 2.5 mm radius) through CENTRE along x, chest wall beyond x > 40 mm; noise 10 HU."""
    origin = -np.array(SPACING) * (np.array(SHAPE[::-1]) // 2)
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    x, y, z = (origin[d] + (i, j, k)[d] * SPACING[d] for d in range(3))
    hu = np.full(SHAPE, -850.0)
    hu[x > 40.0] = 40.0
    if vessel:
        hu = np.maximum(hu, np.where(np.hypot(y - CENTRE[1], z - CENTRE[2]) <= 2.5, 40.0, -850.0))
    labels = np.zeros(SHAPE, np.uint8)
    if nodule_radius_mm > 0:
        d = np.sqrt((x - CENTRE[0]) ** 2 + (y - CENTRE[1]) ** 2 + (z - CENTRE[2]) ** 2)
        # the voxel's lesion fraction along the slice axis (5 mm slices average the nodule over their thickness)
        w = np.clip((nodule_radius_mm + 1.0 - d) / 2.0, 0.0, 1.0)
        hu = np.maximum(hu, hu * (1 - w) + 30.0 * w)
        labels[w >= 0.5] = 1
    hu += np.random.default_rng(seed).normal(0.0, 10.0, SHAPE)
    grid = Volume(np.rint(hu).astype(np.int16), origin, np.array(SPACING))
    return grid, grid.with_array(labels)


def _track(followup_radius_mm: float, vessel: bool = False, propagation: str = "annotation") -> TrackedLesion:
    ct0, lab0 = _ct(7.0, vessel, seed=1)
    ct1, _ = _ct(followup_radius_mm, vessel, seed=2)
    tps = [Timepoint("base", ct0), Timepoint("fu", ct1)]
    prompt = Prompt(LesionIdentity("2.25.1", "L1", 1), PromptKind.MASK, mask=lab0, source="test SEG")
    track_lesions(
        tps,
        [prompt],
        source_index=0,
        registration=NoRegistrationEngine(),
        segmentation=build_segmentation("adaptive"),
        options=TrackingOptions(propagation=propagation),
    )
    return tps[1].lesions[0]


def test_the_engine_alone_finds_nothing_in_a_focus_of_a_few_voxels() -> None:
    """The case the residual test exists for: the engine's own presence test drops the shrunken nodule."""
    ct0, lab0 = _ct(7.0, False, seed=1)
    ct1, lab1 = _ct(3.0, False, seed=2)
    assert 1 <= int(lab1.array.sum()) <= 12  # a few 2 × 2 × 5 mm voxels
    prompt = Prompt(LesionIdentity("2.25.1", "L1", 1), PromptKind.MASK, mask=lab0)
    got = build_segmentation("adaptive").segment(ct1, prompt, SegReference(ct0, lab0))
    assert not got.array.any()


def test_a_nodule_shrunk_to_a_few_voxels_is_present_too_small_and_flagged() -> None:
    les = _track(3.0)
    _, truth = _ct(3.0, False, seed=2)
    assert les.status is LesionStatus.PRESENT, les.notes
    assert les.meta.get("review") is True
    # the note gives the focus's measured long axis; whether it is "too small to measure" is RECIST's call (below)
    assert any("long axis" in n and "residual focus" in n for n in les.notes)
    conf = les.meta["confidence"]  # the reason reaches the SR's and the dashboard's "reason for review"
    assert conf.review
    assert any("long axis" in r and "residual focus" in r for r in conf.reasons)
    got = les.mask.array > 0
    assert 1 <= int(got.sum()) <= 20
    assert (got & (truth.array > 0)).any()


def test_the_chain_propagation_keeps_the_focus_too() -> None:
    les = _track(3.0, propagation="chain")
    assert les.status is LesionStatus.PRESENT
    assert "residual_focus" in les.meta


def test_a_gone_nodule_is_vanished() -> None:
    les = _track(0.0)
    assert les.status is LesionStatus.VANISHED
    assert not les.mask.array.any()
    assert "residual_focus" not in les.meta
    assert any("no residual lesion-like focus" in n for n in les.notes)


def test_a_vessel_through_the_site_of_a_gone_nodule_is_not_a_residual() -> None:
    """The vessel ran through the prior nodule and is there again once the nodule is gone: bright tissue inside the
    propagated outline that bridges the vessel's two ends around the prior lesion, not a residual focus."""
    ct0, lab0 = _ct(7.0, True, seed=1)
    ct1, _ = _ct(0.0, True, seed=2)
    ref = SegReference(ct0, lab0)
    around = surroundings(ref)
    assert around is not None
    assert around.array.any()  # the vessel's ends beyond the prior nodule were lesion-like
    assert residual_focus(ct1, lab0, ref, around) is None
    # the control: the same call without the vessel, on a focus of a few voxels, finds it
    tiny, _ = _ct(3.0, False, seed=2)
    focus = residual_focus(tiny, lab0, SegReference(*_ct(7.0, False, seed=1)), None)
    assert focus is not None
    assert focus.voxels >= 2


def _beside_vessel(nodule_radius_mm: float, seed: int) -> tuple[Volume, Volume, Volume]:
    """:func:`_ct` with a thick vessel (30 HU, 4 mm radius) along x beside the nodule (12 mm from its centre), and a
    leaky prior mask as a drawing gives: the nodule plus the stretch of vessel beside it (16 mm of it)."""
    ct, lab = _ct(nodule_radius_mm, False, seed)
    origin = -np.array(SPACING) * (np.array(SHAPE[::-1]) // 2)
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    x, y, z = (origin[d] + (i, j, k)[d] * SPACING[d] for d in range(3))
    vessel = np.hypot(y - CENTRE[1] - 12.0, z - CENTRE[2]) <= 4.0
    blood = 30.0 + np.random.default_rng(seed + 10).normal(0.0, 10.0, SHAPE)
    hu = np.where(vessel, np.maximum(ct.array, blood), ct.array)
    leaky = (lab.array > 0) | (vessel & (np.abs(x - CENTRE[0]) <= 8.0))
    return ct.with_array(np.rint(hu).astype(np.int16)), lab.with_array(leaky.astype(np.uint8)), lab


def test_a_gone_nodule_whose_prior_took_in_a_vessel_beside_it_is_vanished() -> None:
    """A prior derived from a drawing took in the stretch of a thick vessel beside the nodule: that stretch is inside
    the propagated outline and is there again once the nodule is gone — unchanged while the lesion regressed, so a
    structure the prior took in, not a residual focus. A nodule shrunk to a few voxels there is still found, as itself
    (not the vessel's stretch)."""
    ct0, leaky, _ = _beside_vessel(7.0, seed=1)
    ref = SegReference(ct0, leaky)
    around = surroundings(ref)
    assert around is not None
    gone, _, _ = _beside_vessel(0.0, seed=2)
    assert residual_focus(gone, leaky, ref, around) is None
    shrunk, _, truth = _beside_vessel(3.0, seed=2)
    focus = residual_focus(shrunk, leaky, ref, around)
    assert focus is not None
    got = focus.mask.array > 0
    assert (got & (truth.array > 0)).sum() >= 0.5 * got.sum()  # the nodule's remains, not the vessel


def test_no_judgement_without_contrast() -> None:
    """A lesion that hardly differs from its surroundings on the prior gives no levels: no residual is claimed."""
    ct0, lab0 = _ct(7.0, False, seed=1)
    flat = ct0.with_array(np.where(lab0.array > 0, -830, ct0.array).astype(np.int16))
    ref = SegReference(flat, lab0)
    assert surroundings(ref) is None
    assert residual_focus(flat, lab0, ref, None) is None


def test_recist_counts_a_too_small_lesion_at_least_5_mm_and_a_vanished_one_at_0() -> None:
    les = _track(3.0)
    ct1, _ = _ct(3.0, False, seed=2)
    rules = RecistRules()
    m = measure_lesion(les.mask, ct1, tracking_uid="2.25.1", tracking_id="L1", status=les.status)
    assert m.present
    assert diameter_of(RecistLesion.from_measurement(m), rules) >= rules.too_small_default_mm  # not a CR
    gone = measure_lesion(les.mask.with_array(np.zeros(SHAPE, np.uint8)), ct1, tracking_uid="2.25.1", tracking_id="L1")
    assert diameter_of(RecistLesion.from_measurement(gone), rules) == 0.0
