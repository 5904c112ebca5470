"""A 3-D lesion from a 2-D drawing: the through-slice extent comes from the image (issue 31, item 2)."""

from __future__ import annotations

import numpy as np
import pytest

from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.from_drawing import lesion_from_drawing, seed_from_drawing

SLICE_MM = 5.0


def _nodule(radius: float = 6.5, hu: float = 30.0, slice_mm: float = SLICE_MM) -> tuple[Volume, np.ndarray, np.ndarray]:
    """Lung (-850 HU) with a spherical nodule on thick slices; the truth is the voxels whose centre is inside."""
    rng = np.random.default_rng(3)
    nk, nj, ni = int(80 / slice_mm), 64, 64
    sp = np.array([0.8, 0.8, slice_mm])  # (i, j, k)
    centre = np.array([25.3, 26.1, 40.0])  # mm, off the voxel grid
    k, j, i = np.meshgrid(*(np.arange(n) for n in (nk, nj, ni)), indexing="ij")
    pts = np.stack([i * sp[0], j * sp[1], k * sp[2]], -1)
    # partial volume: supersample each voxel 3x3x3
    frac = np.zeros((nk, nj, ni), np.float32)
    offs = [(a, b, c) for a in (-1 / 3, 0, 1 / 3) for b in (-1 / 3, 0, 1 / 3) for c in (-1 / 3, 0, 1 / 3)]
    for a, b, c in offs:
        q = pts + np.array([a, b, c]) * sp
        frac += (np.linalg.norm(q - centre, axis=-1) <= radius) / len(offs)
    img = -850.0 + frac * (hu + 850.0) + rng.normal(0, 15.0, frac.shape)
    vol = Volume(np.rint(img).astype(np.int16), np.zeros(3), sp)
    truth = np.linalg.norm(pts - centre, axis=-1) <= radius
    return vol, truth, centre


def _o(x: float, y: float) -> np.ndarray:
    return np.array([x, y, 0.0])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _line(vol: Volume, centre: np.ndarray, radius: float) -> Drawing:
    k = round(centre[2] / vol.spacing[2])
    z = k * vol.spacing[2]
    a, b = centre + np.array([-radius, 0.3, 0.0]), centre + np.array([radius, 0.3, 0.0])
    a[2] = b[2] = z
    return Drawing(DrawingKind.LINE, [np.array([a, b])], "test line")


def test_a_single_line_on_thick_slices_gives_a_lesion_through_several_slices() -> None:
    vol, truth, centre = _nodule()
    seed = seed_from_drawing(vol, _line(vol, centre, 6.3))
    assert seed is not None
    got = seed.mask.array > 0
    assert seed.slices >= 3  # a 13 mm nodule on 5 mm slices is not flattened to the drawn slice
    assert np.count_nonzero(got.any(axis=(1, 2))) >= 3
    assert _dice(got, truth) >= 0.85


@pytest.mark.parametrize("kind", ["bidirectional", "ellipse", "arrow", "point", "contour"])
def test_every_drawing_kind_becomes_a_3d_lesion(kind: str) -> None:
    vol, truth, centre = _nodule(radius=7.0)
    k = round(centre[2] / vol.spacing[2])
    z = k * vol.spacing[2]
    c = np.array([centre[0], centre[1], z])
    r = 6.8
    if kind == "bidirectional":
        parts = [np.array([c - _o(r, 0), c + _o(r, 0)]), np.array([c - _o(0, r), c + _o(0, r)])]
        d = Drawing(DrawingKind.BIDIRECTIONAL, parts)
    elif kind == "ellipse":
        d = Drawing(DrawingKind.ELLIPSE, [np.array([c - _o(8, 0), c + _o(8, 0), c - _o(0, 7.5), c + _o(0, 7.5)])])
    elif kind == "arrow":  # tip inside the lesion near its edge, tail outside
        d = Drawing(DrawingKind.ARROW, [np.array([c + _o(3.5, 0), c + _o(25, 0)])])
    elif kind == "point":
        d = Drawing(DrawingKind.POINT, [c[None]])
    else:
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        d = Drawing(DrawingKind.CONTOUR, [c + np.stack([r * np.cos(t), r * np.sin(t), 0 * t], -1)])
    mask, notes = lesion_from_drawing(vol, d, build_segmentation("adaptive"))
    assert mask is not None, notes
    got = mask.array > 0
    assert np.count_nonzero(got.any(axis=(1, 2))) >= 3
    assert _dice(got, truth) >= 0.8
    assert any(kind in n for n in notes)


def test_a_drawing_on_tissue_like_its_surroundings_gives_no_lesion() -> None:
    vol = Volume(np.full((10, 40, 40), 40, np.int16), np.zeros(3), np.array([1.0, 1.0, 5.0]))
    d = Drawing(DrawingKind.LINE, [np.array([[10.0, 20.0, 25.0], [25.0, 20.0, 25.0]])])
    mask, notes = lesion_from_drawing(vol, d, None)
    assert mask is None
    assert "no lesion-like region" in notes[0]


def test_a_drawing_outside_the_ct_gives_no_lesion() -> None:
    vol, _, _ = _nodule()
    d = Drawing(DrawingKind.LINE, [np.array([[10.0, 20.0, 500.0], [25.0, 20.0, 500.0]])])
    assert seed_from_drawing(vol, d) is None


def test_drawings_check_their_points() -> None:
    with pytest.raises(ValueError, match="needs 2 part"):
        Drawing(DrawingKind.BIDIRECTIONAL, [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="contour needs"):
        Drawing(DrawingKind.CONTOUR, [np.zeros((2, 3))])
    d = Drawing(DrawingKind.BIDIRECTIONAL, [np.array([[0, 0, 0], [20, 0, 0]]), np.array([[10, -4, 0], [10, 4, 0]])])
    assert d.diameters_mm() == (20.0, 8.0)


def test_a_lesion_from_a_line_or_arrow_carries_lower_confidence_until_confirmed() -> None:
    from dataclasses import dataclass, field
    from typing import Any

    from lesiontrack.models.segmentation.prompts import LesionIdentity
    from lesiontrack.pipeline.science.confidence import ConfidenceRules, combine
    from lesiontrack.pipeline.science.drawn_priors import weaken_for_origin

    @dataclass
    class Src:
        identity: LesionIdentity
        meta: dict[str, Any] = field(default_factory=dict)

    rules = ConfidenceRules()
    clean = combine({"present": True}, rules)
    assert clean.confidence == 1.0
    assert not clean.review
    line = [Src(LesionIdentity("1", "L1", 1), {"prompt_origin": "line", "weak_prior": True})]
    arrow = [Src(LesionIdentity("1", "L1", 1), {"prompt_origin": "arrow", "weak_prior": True})]
    seg = [Src(LesionIdentity("1", "L1", 1), {"prompt_origin": "seg", "weak_prior": False})]
    from_line = weaken_for_origin(clean, line, 1, rules)
    assert 0.5 <= from_line.confidence < 1.0
    assert not from_line.review
    # not flagged, so no reason is recorded (a reason exactly when it flags: issue 29); the signal says why it is lower
    assert not from_line.reasons
    assert any(s.name == "prompt_origin" and s.score < 1.0 for s in from_line.signals)
    from_arrow = weaken_for_origin(clean, arrow, 1, rules)
    assert from_arrow.review
    assert from_arrow.confidence < from_line.confidence
    assert any("not yet confirmed" in r for r in from_arrow.reasons)
    assert weaken_for_origin(clean, seg, 1, rules) == clean


def test_a_drawing_nothing_reproduces_keeps_the_box_instead_of_failing() -> None:
    """Neither the lesion grown from the drawing (none: no contrast) nor the box reproduces the drawn slice: the box's
    segmentation is kept, as before drawings were read, and the job goes on (the guide test's SR-lines patient)."""
    from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
    from lesiontrack.pipeline.science.drawn_priors import drawn_lesion

    vol = Volume(np.full((10, 40, 40), 40, np.int16), np.zeros(3), np.array([1.0, 1.0, 5.0]))
    line = np.array([[10.0, 20.0, 25.0], [25.0, 20.0, 25.0]])
    d = Drawing(DrawingKind.LINE, [line])
    prompt = Prompt(
        LesionIdentity("1", "L1", 1),
        PromptKind.BOX,
        box_mm=(line.min(axis=0) - np.array([0, 5, 5]), line.max(axis=0) + np.array([0, 5, 5])),
        meta={"drawing": d},
    )
    got = drawn_lesion(vol, prompt, build_segmentation("adaptive"))
    assert got is not None
    assert any("box kept" in n for n in got.notes), got.notes


def _demo_liver_lesion() -> tuple[Volume, np.ndarray]:
    """The demo patient's faint liver lesion (``make_phantom(seed=8)`` on the demo's 40 x 80 x 80 grid at 3 mm;
    docs/annotations.md, *Through the viewer*): 322 voxels, about 25 HU below its liver, at the liver's edge beside a
    rib, barely visible at W 400 / L 40."""
    from lesiontrack.synthetic.phantom import make_phantom

    ph = make_phantom(seed=8, shape=(40, 80, 80), spacing=(3.0, 3.0, 3.0), n_lesions=3)
    [liver] = [i.label for i in ph.lesion_info if i.organ == "liver"]
    return ph.ct, ph.lesions.array == liver


@pytest.mark.parametrize(("line", "min_dice"), [("ohif", 0.68), ("long axis", 0.74)])
def test_a_line_on_a_faint_liver_lesion_gives_its_3d_lesion(line: str, min_dice: float) -> None:
    """Measured 0.72 (OHIF's left-right line across the lesion's box, tests/test_ohif_drawn_prior.py) and 0.79 (the
    bench's radiologist's long axis); before the faint-lesion rule 0.51 and 0.47: the lesion was read as brighter
    than a background of fat, and everything in the bound — liver included — became lesion."""
    from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
    from lesiontrack.pipeline.science.drawn_priors import drawn_lesion

    ct, truth = _demo_liver_lesion()
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    pts = np.argwhere(truth[k])
    if line == "ohif":  # left to right across the lesion's bounding box, at its middle row
        (j0, i0), (j1, i1) = pts.min(0), pts.max(0)
        ends = [[i0 - 0.5, (j0 + j1) / 2, k], [i1 + 0.5, (j0 + j1) / 2, k]]
    else:  # the longest chord of the cross-section, out to the pixels' edges
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
        a, b = np.unravel_index(int(np.argmax(d)), d.shape)
        u = (pts[b] - pts[a]) / d[a, b]
        ends = [[*(pts[a] - 0.5 * u)[::-1], k], [*(pts[b] + 0.5 * u)[::-1], k]]
    drawing = Drawing(DrawingKind.LINE, [ct.index_to_patient(np.array(ends, float))])
    seed = seed_from_drawing(ct, drawing)
    assert seed is not None
    assert seed.lesion_level < seed.background_level  # darker than its liver, not brighter than the fat beyond it
    prompt = Prompt(LesionIdentity("1", "L2", 2), PromptKind.BOX, box_mm=(drawing.all_points.min(0),
                    drawing.all_points.max(0)), meta={"drawing": drawing})  # fmt: skip
    got = drawn_lesion(ct, prompt, build_segmentation("adaptive"))
    assert got is not None
    mask = got.mask.array > 0
    assert _dice(mask, truth) >= min_dice, (_dice(mask, truth), got.notes)
    # through the slices no more than a slice beyond the lesion at each end (before: two at each end, the ellipsoid's)
    assert np.count_nonzero(mask.any(axis=(1, 2))) <= np.count_nonzero(truth.any(axis=(1, 2))) + 2


class _FlatEngine:
    """An engine whose segmentation of a drawing's box is the lesion's cross-section on the drawn slice only: it
    reproduces the drawn long axis exactly, and is the lesion flattened to one slice."""

    name, version = "flat", "1"

    def __init__(self, truth: np.ndarray, k: int) -> None:
        self.flat = np.zeros(truth.shape, np.uint8)
        self.flat[k] = truth[k]

    def segment(self, image: Volume, prompt: object, reference: object = None) -> Volume:
        return image.with_array(self.flat.copy())


def test_a_candidate_flattened_onto_the_drawn_slice_loses_to_one_through_the_slices() -> None:
    """A 13 mm nodule on 5 mm slices: the box's segmentation on the drawn slice only reproduces the drawn line better
    than the lesion grown from it, but a lesion that long reaches the next slice — the grown one is kept (phantoms 21,
    32, 41: line prior Dice 0.38-0.65 -> 0.69-0.75, docs/benchmarks/annotations.md)."""
    from lesiontrack.models.segmentation.from_drawing import _feret_mm, confined_to_drawn_slice, measurement_error
    from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
    from lesiontrack.pipeline.science.drawn_priors import drawn_lesion

    vol, truth, centre = _nodule()
    k = round(centre[2] / vol.spacing[2])
    engine = _FlatEngine(truth, k)
    # drawn as long as the flat cross-section's longest diameter: the flat candidate reproduces it exactly
    line = _line(vol, centre, _feret_mm(truth[k], vol.spacing[1::-1]) / 2)
    flat = vol.with_array(engine.flat)
    assert confined_to_drawn_slice(flat, line)
    assert not confined_to_drawn_slice(vol.with_array(truth.astype(np.uint8)), line)
    a = line.parts[0][0]
    short = Drawing(DrawingKind.LINE, [np.array([a, a + np.array([6.0, 0.0, 0.0])])])
    assert not confined_to_drawn_slice(flat, short)  # 6 mm on 5 mm slices may lie on one slice
    prompt = Prompt(LesionIdentity("1", "L1", 1), PromptKind.BOX, box_mm=(line.all_points.min(0) - 1,
                    line.all_points.max(0) + 1), meta={"drawing": line})  # fmt: skip
    grown = lesion_from_drawing(vol, line)[0]
    assert grown is not None
    assert measurement_error(flat, line) < measurement_error(grown, line)  # the old rule kept the flat one
    got = drawn_lesion(vol, prompt, engine)  # a stand-in engine: the box's flat answer
    assert got is not None
    mask = got.mask.array > 0
    assert np.count_nonzero(mask.any(axis=(1, 2))) >= 3, got.notes
    assert _dice(mask, truth) >= 0.85
    assert any("drawn slice only" in n for n in got.notes), got.notes
