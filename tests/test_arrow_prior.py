"""An arrow on a prior: the diameter the image shows at its tip keeps every lobe of a lobulated lesion and is not
lengthened by a thin strand; the lesion grown from it replaces the one grown from the tip only where the image
supports its outline clearly better (issue 31)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.arrow import arrow_as_line, arrow_lesion
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.from_drawing import lesion_from_drawing
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.science.drawn_priors import drawn_lesion

SP = np.array([0.8, 0.8, 5.0])  # (i, j, k) mm: 5 mm slices
CENTRE = np.array([25.3, 26.1, 40.0])  # mm (x, y, z), off the voxel grid


def _ct(level_at: Callable[[np.ndarray], np.ndarray]) -> Volume:
    """Lung with what ``level_at`` (HU of points (..., 3) in mm) puts there, with partial volume (3x3x3 samples per
    voxel) and noise."""
    rng = np.random.default_rng(7)
    k, j, i = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing="ij")
    pts = np.stack([i * SP[0], j * SP[1], k * SP[2]], -1)
    offs = [np.array([a, b, c]) for a in (-1 / 3, 0, 1 / 3) for b in (-1 / 3, 0, 1 / 3) for c in (-1 / 3, 0, 1 / 3)]
    img = np.mean([level_at(pts + o * SP) for o in offs], axis=0)
    return Volume(np.rint(img + rng.normal(0, 15.0, img.shape)).astype(np.int16), np.zeros(3), SP)


def _lesion(inside: Callable[[np.ndarray], np.ndarray]) -> tuple[Volume, np.ndarray]:
    """A 30 HU lesion (``inside`` of points) in lung (-850 HU), and its truth (voxel centres inside)."""
    vol = _ct(lambda p: np.where(inside(p), 30.0, -850.0))
    k, j, i = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing="ij")
    return vol, inside(np.stack([i * SP[0], j * SP[1], k * SP[2]], -1))


def _ball(p: np.ndarray, centre: np.ndarray, r: float) -> np.ndarray:
    return np.asarray(np.linalg.norm(p - centre, axis=-1) <= r)


def _arrow(tip_xy: tuple[float, float], towards: tuple[float, float]) -> Drawing:
    """An arrow on the middle slice, its tip at ``CENTRE + tip_xy``, its 20 mm shaft pointing along ``towards``."""
    z = round(CENTRE[2] / SP[2]) * SP[2]
    tip = np.array([CENTRE[0] + tip_xy[0], CENTRE[1] + tip_xy[1], z])
    u = np.array([*towards, 0.0]) / np.linalg.norm(towards)
    return Drawing(DrawingKind.ARROW, [np.array([tip, tip - 20.0 * u])], "arrow")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_an_arrow_at_one_lobe_of_a_lobulated_lesion_reads_the_whole_lesion() -> None:
    """Three 12 mm lobes in a row, 9 mm apart (necks ~8 mm wide): the arrow points at the first from the side; the
    diameter read is the lesion's 30 mm, not the 12 mm of the lobe the tip is in."""
    lobes = [CENTRE + np.array([dx, 0.0, 0.0]) for dx in (-9.0, 0.0, 9.0)]
    vol, _ = _lesion(lambda p: np.any([_ball(p, c, 6.0) for c in lobes], axis=0))
    line = arrow_as_line(vol, _arrow((-9.0, 3.5), (0.0, -1.0)))
    assert line is not None
    assert 26.0 <= line.diameters_mm()[0] <= 33.0


def test_a_thin_strand_does_not_lengthen_the_diameter_read_at_an_arrow() -> None:
    """A 12 mm nodule with a 2 mm wide strand of its own density running 15 mm out of it through the slice (a
    vessel, a spicule, a run-on along a septum): the diameter read is the nodule's body, not nodule and strand
    (27 mm)."""

    def inside(p: np.ndarray) -> np.ndarray:
        d = p - CENTRE
        strand = (d[..., 0] >= 0) & (d[..., 0] <= 21.0) & (np.abs(d[..., 1]) <= 1.0) & (np.abs(d[..., 2]) <= 3.0)
        return _ball(p, CENTRE, 6.0) | strand

    vol, _ = _lesion(inside)
    line = arrow_as_line(vol, _arrow((0.0, -3.5), (0.0, 1.0)))
    assert line is not None
    assert 10.0 <= line.diameters_mm()[0] <= 14.5


def _part_solid() -> tuple[Volume, np.ndarray]:
    """A part-solid nodule: a solid core (r 3.5 mm, 20 HU) in ground glass (r 8 mm, -450 HU), in lung."""
    vol = _ct(lambda p: np.where(_ball(p, CENTRE, 3.5), 20.0, np.where(_ball(p, CENTRE, 8.0), -450.0, -850.0)))
    k, j, i = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing="ij")
    return vol, _ball(np.stack([i * SP[0], j * SP[1], k * SP[2]], -1), CENTRE, 8.0)


def test_an_arrow_in_a_part_solid_nodule_takes_the_whole_nodule_where_the_image_supports_it() -> None:
    """The tip on the solid core: grown from the tip, the lesion is the core alone (surrounded by ground glass); the
    diameter read at the tip spans the ground glass, and its lesion's outline lies on the lung all round: it is
    kept, and the notes say why."""
    vol, truth = _part_solid()
    d = _arrow((0.0, 3.0), (0.0, -1.0))
    line = arrow_as_line(vol, d)
    assert line is not None
    assert line.diameters_mm()[0] >= 13.0  # the 16 mm nodule, ground glass included
    prompt = Prompt(LesionIdentity("1", "L1", 1), PromptKind.POINTS, points_mm=d.anchor_mm()[None], meta={"drawing": d})
    got = drawn_lesion(vol, prompt, build_segmentation("adaptive"))
    assert got is not None
    assert _dice(got.mask.array > 0, truth) >= 0.7
    assert any("diameter the image shows at the arrow's tip" in n for n in got.notes), got.notes
    # the notes the kept reading's lesion was derived with come first, and the engine name follows them
    assert "derived from a line" in got.notes[0], got.notes
    assert got.engine_name == ("drawing+adaptive" if any("refined by" in n for n in got.notes) else "drawing")


def test_an_arrow_keeps_the_lesion_grown_from_its_tip_without_clear_evidence_against_it() -> None:
    """A solid nodule whose lesion grown from the tip is outlined against the lung all round: the lesions grown from
    the reading are no better supported, and the tip's is kept (today's behaviour is the fallback)."""
    vol, truth = _lesion(lambda p: _ball(p, CENTRE, 6.5))
    d = _arrow((3.0, 0.0), (-1.0, 0.0))
    tip_grown = vol.with_array(truth.astype(np.uint8))
    got, notes = arrow_lesion(vol, d, tip_grown, None)
    assert got is tip_grown
    assert any("grown from the tip, not from" in n for n in notes), notes
    grown, _ = lesion_from_drawing(vol, d, None)  # and today's growth from the tip, on its own, is close to it
    assert grown is not None
    kept, _ = arrow_lesion(vol, d, grown, None)
    assert kept is not None
    assert _dice(kept.array > 0, truth) >= 0.85


def test_a_lesion_grown_from_the_tip_flattened_onto_the_drawn_slice_gives_way_to_the_reading() -> None:
    """The 13 mm nodule of the test above, its lesion grown from the tip on the drawn slice only (as a part-solid
    nodule's solid core on 5 mm slices is): its outline there is as well supported as the reading's, but a lesion
    13 mm long reaches the next slice, so the lesion grown from the diameter read at the tip is kept."""
    vol, truth = _lesion(lambda p: _ball(p, CENTRE, 6.5))
    d = _arrow((3.0, 0.0), (-1.0, 0.0))
    k0 = round(CENTRE[2] / SP[2])
    flat = np.zeros_like(truth)
    flat[k0] = truth[k0]
    got, notes = arrow_lesion(vol, d, vol.with_array(flat.astype(np.uint8)), None)
    assert got is not None
    assert (got.array > 0).any(axis=(1, 2)).sum() >= 2, notes
    assert _dice(got.array > 0, truth) >= 0.85
    assert any("lies on the drawn slice only" in n for n in notes), notes


def test_an_arrow_on_tissue_like_its_shaft_reads_no_diameter_and_keeps_the_tip_growth() -> None:
    vol = Volume(np.full((10, 40, 40), 40, np.int16), np.zeros(3), np.array([1.0, 1.0, 5.0]))
    d = Drawing(DrawingKind.ARROW, [np.array([[20.0, 20.0, 25.0], [35.0, 20.0, 25.0]])])
    assert arrow_as_line(vol, d) is None
    got, notes = arrow_lesion(vol, d, None, None)
    assert got is None
    assert any("no diameter" in n for n in notes)


@pytest.mark.parametrize("dark", [False, True], ids=["in lung", "mirrored: darker than its background"])
def test_a_vessel_leaving_a_part_solid_nodules_ground_glass_does_not_take_the_reading_with_it(dark: bool) -> None:
    """A part-solid nodule (ground glass -550 HU) beside a vessel (8 mm thick, 30 HU) that touches its ground glass
    and runs 30 mm out through the lung: at the ground glass's level the vessel is lesion-side and, too thick to be
    cut as a strand, would carry the reading with it (a 34 mm diameter); tissue denser than the ground glass outside
    the solid core is not the ground glass, so the reading spans the nodule."""

    def level(p: np.ndarray) -> np.ndarray:
        d = p - CENTRE
        vessel = (d[..., 0] >= 7.0) & (d[..., 0] <= 37.0) & (np.hypot(d[..., 1], d[..., 2] / 2.0) <= 4.0)
        solid, glass = _ball(p, CENTRE, 3.5), _ball(p, CENTRE, 8.0)
        hu = np.where(solid, 20.0, np.where(vessel, 30.0, np.where(glass, -550.0, -850.0)))
        return np.asarray(-800.0 - hu if dark else hu)  # mirrored: the same contrasts, the lesion darker

    vol = _ct(level)
    k, j, i = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing="ij")
    truth = _ball(np.stack([i * SP[0], j * SP[1], k * SP[2]], -1), CENTRE, 8.0)
    d = _arrow((0.0, 3.0), (0.0, -1.0))
    line = arrow_as_line(vol, d)
    assert line is not None
    assert 13.0 <= line.diameters_mm()[0] <= 19.0  # the 16 mm nodule, not its core, not the vessel
    prompt = Prompt(LesionIdentity("1", "L1", 1), PromptKind.POINTS, points_mm=d.anchor_mm()[None], meta={"drawing": d})
    got = drawn_lesion(vol, prompt, build_segmentation("adaptive"))
    assert got is not None
    assert _dice(got.mask.array > 0, truth) >= 0.7
