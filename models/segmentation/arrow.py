"""An arrow read as the diameter the image shows at its tip, and the choice between that reading and the lesion grown
from the tip, by the image's own evidence.

An arrow (or a probe) says where a lesion is, not how large: its tip lies on the lesion — inside it near its edge, on
its edge, or just short of it — and its tail lies outside, pointing at it; the arrow's shaft lies on the lesion's
background. On the drawn slice (smoothed image, physical units), :func:`read_arrow`:

1. the background level: the most frequent tissue along the shaft;
2. the lesion level: the median just beyond the tip; when that is still background (a tip short of the lesion), the
   first stretch beyond the tip that departs from the background by several noise SDs;
3. the lesion's cross-section: the lesion-side pixels (of the half-way level) connected to where the lesion begins,
   every lobe of them, with thin strands (vessels, spicules, a run-on along a wall) cut by an opening scaled to the
   body the tip lies in, inside the smallest of growing discs that holds it whole, and compact; widened to a
   fainter rim of one tissue of its own (a part-solid nodule's ground glass) — tissue beyond half-way from that rim
   to the denser part's level, outside the denser part (a vessel touching the ground glass), is not the rim and does
   not carry it away;
4. its longest diameter, as a line :class:`Drawing` from which :mod:`models.segmentation.from_drawing` grows the
   lesion through the slices.

:func:`arrow_lesion` keeps that line's lesion instead of the one grown from the tip only where the image clearly
supports its outline better: a clearly larger share of the band just outside its cross-section lies at the
background level the shaft gives (a lesion cut short — a part-solid nodule's solid core alone, a lobe of a lobulated
tumour — is surrounded by more lesion; one that ran on into a neighbour is surrounded by other tissue), or where the
lesion grown from the tip lies on the drawn slice only while the reading's, at least 1.5 slice spacings long,
reaches the next slice and is not clearly worse supported (a small lesion on thick slices is not flattened to one
slice; a part-solid nodule's solid core often is). Where the image gives no reading or no clear evidence, the
lesion grown from the tip is kept, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.components import connected_to, dilate_mm
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.from_drawing import confined_to_drawn_slice, lesion_from_drawing
from lesiontrack.models.segmentation.levels import dominant_level, robust_sd
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind


@dataclass(frozen=True)
class ArrowConfig:
    smoothing_mm: float = 1.0
    step_mm: float = 0.5
    reach_mm: float = 60.0  # a lesion's far edge lies within this distance beyond the tip
    scales_mm: tuple[float, ...] = (6.0, 9.0, 13.5, 20.0, 30.0, 45.0, 60.0)  # the discs a lesion is sought in
    min_shaft_mm: float = 4.0  # a shorter shaft gives no background
    tip_window_mm: float = 3.0  # the lesion level: the median over this stretch
    min_cnr: float = 2.0  # lesion vs background, in noise SDs
    tip_short_mm: float = 5.0  # a tip short of its lesion lies at most this far from it
    min_sd_hu: float = 6.0
    rim_mm: tuple[float, float] = (1.5, 4.0)  # the band outside the lesion looked at for a fainter part
    min_fill: float = 0.4  # a cross-section fills at least this much of the disc its long diameter spans
    rim_apart: float = 0.2  # a fainter part lies this fraction of the contrast away from both levels
    rim_spread: float = 0.12  # ... and its values spread by at most this fraction of the contrast (robust SD)
    open_fraction: float = 0.4  # strands are cut by an opening of this x the radius of the body the tip is in
    support_band_mm: tuple[float, float] = (1.0, 3.0)  # the band outside a cross-section its support is read in
    support_tolerance: float = 0.25  # background-like: within this fraction of the contrast of the background
    grow_from: tuple[str, ...] = ("line", "outline")  # what of the reading lesions are grown from
    min_support_gain: float = 0.15  # a lesion grown from the reading is kept only when its outline's support exceeds
    min_support_share: float = 0.5  # the tip's by this much and by this share of what the tip's lacks


@dataclass(frozen=True)
class ArrowReading:
    """What the image shows at an arrow: the lesion's longest diameter on the drawn slice (a line drawing), the
    levels it was read with, and the drawn slice (its index and the slice smoothed as read, reused to judge
    outlines by :func:`outline_support`)."""

    line: Drawing
    lesion_level: float
    background_level: float
    k0: int
    plane: np.ndarray = field(repr=False, compare=False)
    outline: Drawing | None = None  # the cross-section's outline on the drawn slice (a contour drawing)


def arrow_as_line(image: Volume, drawing: Drawing, cfg: ArrowConfig | None = None) -> Drawing | None:
    """The longest diameter of the lesion ``drawing`` (an arrow, tip first, tail second) points at, as a line
    :class:`Drawing` on the drawn slice; None when the image shows no lesion there (see the module's steps)."""
    reading = read_arrow(image, drawing, cfg)
    return None if reading is None else reading.line


def read_arrow(image: Volume, drawing: Drawing, cfg: ArrowConfig | None = None) -> ArrowReading | None:
    """:func:`arrow_as_line` with the lesion and background levels it was read with."""
    cfg = cfg or ArrowConfig()
    if drawing.kind is not DrawingKind.ARROW or len(drawing.parts[0]) < 2:
        return None
    sp = image.spacing[::-1].astype(float)
    kji = image.patient_to_index(drawing.parts[0][:2])[:, ::-1]
    k0 = int(np.rint(kji[0, 0]))
    if not 0 <= k0 < image.shape[0]:
        return None
    tip, tail = kji[0, 1:] * sp[1:], kji[1, 1:] * sp[1:]  # in-plane mm (j, i)
    shaft = float(np.linalg.norm(tip - tail))
    if shaft < cfg.min_shaft_mm:
        return None
    u = (tip - tail) / shaft
    plane = ndi.gaussian_filter(image.array[k0].astype(np.float32), sigma=cfg.smoothing_mm / sp[1:])
    found = _levels_along(_Profile(plane, sp[1:], cfg.step_mm), tip, u, shaft, cfg)
    if found is None:
        return None
    levels, start = found
    region = _region(plane, levels, start, sp[1:], cfg)
    if region is None:
        return None
    fainter = _fainter_rim(plane, region, levels, sp[1:], cfg)
    if fainter is not None:  # a part-solid lesion: its fainter rim (ground glass) around the denser part
        # the fainter tissue around the denser part: tissue beyond it (a vessel running on from the rim) is not it
        ceiling = fainter.lesion + 0.5 * (levels.lesion - fainter.lesion)
        beyond = (plane > ceiling) if levels.lesion > levels.background else (plane < ceiling)
        wider = _region(np.where(beyond & ~region, levels.background, plane), fainter, start, sp[1:], cfg)
        region = wider if wider is not None else region
    a, b = _feret_ends(region, sp[1:])
    pts = np.array([[k0, *(a / sp[1:])], [k0, *(b / sp[1:])]])
    line = image.index_to_patient(pts[:, ::-1])
    what = f"{drawing.what or 'arrow'}: the diameter of the lesion at its tip"
    outline = _outline(image, region, k0, f"{drawing.what or 'arrow'}: the lesion's outline at its tip")
    return ArrowReading(Drawing(DrawingKind.LINE, [line], what), levels.lesion, levels.background, k0, plane, outline)


def _outline(image: Volume, region: np.ndarray, k0: int, what: str) -> Drawing | None:
    """The outline of ``region`` (slice ``k0``) as a contour drawing, along its pixels' edges."""
    from skimage import measure  # ~1 s to load: only for an arrow the image gives a cross-section for

    found = measure.find_contours(np.pad(region.astype(float), 1), 0.5)
    if not found:
        return None
    c = max(found, key=len)[:-1] - 1.0
    if len(c) < 3:
        return None
    ijk = np.stack([c[:, 1], c[:, 0], np.full(len(c), float(k0))], -1)
    return Drawing(DrawingKind.CONTOUR, [np.asarray(image.index_to_patient(ijk))], what)


def outline_support(mask: Volume, image: Volume, reading: ArrowReading, cfg: ArrowConfig | None = None) -> float:
    """The share of the band just outside ``mask``'s cross-section on the drawn slice (``cfg.support_band_mm``)
    that lies at the background level the arrow's shaft gives (within ``cfg.support_tolerance`` of the contrast):
    1 for a lesion outlined against its background all round, 0 for one surrounded by more lesion or other tissue."""
    cfg = cfg or ArrowConfig()
    sp = image.spacing[::-1].astype(float)
    k0, plane = reading.k0, reading.plane
    cross = mask.array[k0] > 0 if 0 <= k0 < mask.shape[0] else np.zeros(mask.shape[1:], bool)
    if not cross.any():
        return 0.0
    out = ndi.distance_transform_edt(~cross, sampling=sp[1:])
    band = plane[(out > cfg.support_band_mm[0]) & (out <= cfg.support_band_mm[1])]
    gap = abs(reading.lesion_level - reading.background_level)
    return float(np.mean(np.abs(band - reading.background_level) <= cfg.support_tolerance * gap)) if band.size else 0.0


def arrow_lesion(
    image: Volume, drawing: Drawing, tip_grown: Volume | None, engine: object | None, cfg: ArrowConfig | None = None
) -> tuple[Volume | None, list[str]]:
    """The lesion an arrow marks: ``tip_grown`` (grown from its tip), or a lesion grown from what the image shows at
    the tip (:func:`read_arrow`: its diameter as a line, its outline as a contour, ``cfg.grow_from``; of these the
    best supported) where that lesion's outline is clearly better supported (:func:`outline_support` higher by
    ``cfg.min_support_gain`` and by ``cfg.min_support_share`` of what the tip's lesion lacks), or where the tip's lies
    on the drawn slice only and it does not, its support at most ``cfg.min_support_gain`` lower (:func:`_flattened`);
    notes say which and why, after the notes the kept reading's lesion was grown with (its ``refined by`` note among
    them)."""
    cfg = cfg or ArrowConfig()
    reading = read_arrow(image, drawing, cfg)
    if reading is None:
        return tip_grown, ["no diameter read at the arrow's tip: grown from the tip"]
    long_mm = reading.line.diameters_mm()[0]
    sources = {"line": (f"the {long_mm:.0f} mm diameter", reading.line), "outline": ("the outline", reading.outline)}
    grown: list[tuple[float, str, Volume, list[str]]] = []  # support, what, the lesion, the notes it was grown with
    for what, d in (sources[k] for k in cfg.grow_from):
        mask, how = (None, []) if d is None else lesion_from_drawing(image, d, engine)
        if mask is not None and mask.array.any():
            grown.append((outline_support(mask, image, reading, cfg), what, mask, how))
    segment = getattr(engine, "segment", None)
    if not grown and segment is not None:  # no seed from the reading: the engine on the diameter's box
        ident = LesionIdentity("2.25.0", "arrow", 1)
        boxed = segment(image, Prompt(ident, PromptKind.BOX, box_mm=reading.line.box_mm(), source="arrow"), None)
        if boxed.array.any():
            box_what = f"the {long_mm:.0f} mm diameter's box"
            grown.append((outline_support(boxed, image, reading, cfg), box_what, boxed, []))
    if not grown:
        return tip_grown, [f"no lesion grown from the {long_mm:.0f} mm diameter read at the arrow: grown from the tip"]
    support, what, mask, how = max(grown, key=lambda g: g[0])  # of equals, the first
    if tip_grown is None or not tip_grown.array.any():
        return mask, [*how, f"grown from {what} the image shows at the arrow's tip"]
    s_tip = outline_support(tip_grown, image, reading, cfg)
    why = f"background around its outline {100 * support:.0f} % vs {100 * s_tip:.0f} % grown from the tip"
    if support - s_tip >= max(cfg.min_support_gain, cfg.min_support_share * (1.0 - s_tip)):
        return mask, [*how, f"grown from {what} the image shows at the arrow's tip ({why})"]
    if _flattened(tip_grown, mask, reading) and support >= s_tip - cfg.min_support_gain:
        flat = (
            f"the lesion grown from the tip lies on the drawn slice only, though {what} read there reaches the next "
            f"slice ({float(image.spacing[2]):.1f} mm apart); {why}"
        )
        return mask, [*how, f"grown from {what} the image shows at the arrow's tip ({flat})"]
    return tip_grown, [f"grown from the tip, not from {what} read there ({why})"]


def _flattened(tip_grown: Volume, read: Volume, reading: ArrowReading) -> bool:
    """Whether the lesion grown from the tip lies on the drawn slice only while the one grown from the reading, on the
    drawn slice too, reaches the next (:func:`~models.segmentation.from_drawing.confined_to_drawn_slice`)."""
    on_slice = 0 <= reading.k0 < read.shape[0] and bool((read.array[reading.k0] > 0).any())
    line = reading.line
    return on_slice and confined_to_drawn_slice(tip_grown, line) and not confined_to_drawn_slice(read, line)


def _region(
    plane: np.ndarray, levels: _Levels, start: np.ndarray, sp2: np.ndarray, cfg: ArrowConfig
) -> np.ndarray | None:
    """The lesion's cross-section: the body (:func:`_body`) of the lesion-side pixels connected to ``start`` (mm),
    within the smallest of growing discs around ``start`` that holds it whole (a vessel or wall running on from the
    lesion leaves every disc; the lesion does not); None when none does or it is not compact."""
    jj, ii = np.meshgrid(np.arange(plane.shape[0]) * sp2[0], np.arange(plane.shape[1]) * sp2[1], indexing="ij")
    dist = np.hypot(jj - start[0], ii - start[1])
    seed = np.zeros(plane.shape, bool)
    px = np.clip(np.rint(start / sp2).astype(int), 0, np.asarray(plane.shape) - 1)
    seed[tuple(px)] = True
    side = levels.lesion_side(plane)
    if not side[tuple(px)]:
        return None
    for r in cfg.scales_mm:
        disc = dist <= r
        body = _body(connected_to(side & disc, seed), seed, sp2, cfg)
        if body.any() and not (body & ~ndi.binary_erosion(disc, border_value=1)).any():  # the image edge is no run-on
            body = np.asarray(ndi.binary_fill_holes(body))
            return body if _compact(body, sp2, cfg.min_fill) else None
    return None


def _body(region: np.ndarray, seed: np.ndarray, sp2: np.ndarray, cfg: ArrowConfig) -> np.ndarray:
    """The lesion's body in ``region`` without its thin strands: ``region`` opened by a disc scaled to the lesion
    (``cfg.open_fraction`` of the radius of the largest disc inside ``region`` that covers ``seed`` — the body the
    tip lies in), keeping the opened part at ``seed`` and every other thick part within a neck's length of it (the
    lobes of a lobulated lesion stay whole; a strand, a vessel or a spicule thinner than the opening goes)."""
    if not region.any():
        return region
    depth = ndi.distance_transform_edt(region, sampling=sp2)
    s = np.argwhere(seed)[0]
    pts = np.argwhere(region)
    covering = np.linalg.norm((pts - s) * sp2, axis=1) <= depth[region]
    radius = float(depth[region][covering].max()) if covering.any() else float(depth[tuple(s)])
    r_open = max(cfg.open_fraction * radius, float(max(sp2)))
    core = depth > r_open
    if not core.any():
        return region
    opened = np.asarray(ndi.distance_transform_edt(~core, sampling=sp2) <= r_open) & region
    lab, n = ndi.label(opened)
    if n == 0:
        return region
    to_seed = ndi.distance_transform_edt(~seed, sampling=sp2)
    main = lab == int(lab.flat[np.argmin(np.where(lab > 0, to_seed, np.inf))])
    near = ndi.distance_transform_edt(~main, sampling=sp2) <= 2.0 * r_open + float(max(sp2))
    keep = np.unique(lab[near & (lab > 0)])
    return np.isin(lab, keep[keep > 0])


def _compact(region: np.ndarray, sp2: np.ndarray, min_fill: float) -> bool:
    """Whether ``region`` fills at least ``min_fill`` of the disc its longest diameter spans (a lesion's
    cross-section is compact; one that ran on into a vessel, a wall or a neighbour is not)."""
    a, b = _feret_ends(region, sp2)
    feret = float(np.linalg.norm(b - a))
    return float(region.sum()) * float(np.prod(sp2)) >= min_fill * np.pi / 4 * feret**2


def _fainter_rim(
    plane: np.ndarray, region: np.ndarray, levels: _Levels, sp2: np.ndarray, cfg: ArrowConfig
) -> _Levels | None:
    """Levels for a lesion of two tissues: when most of a band just outside ``region`` (1.5–4 mm) lies between the
    background and the lesion level, well apart from both, that band is the lesion's fainter part (a part-solid
    nodule's ground glass around its solid core), and the lesion is what differs from the background by half as
    much; None otherwise (a band of background, or of partial volume only)."""
    band = dilate_mm(region, cfg.rim_mm[1], sp2) & ~dilate_mm(region, cfg.rim_mm[0], sp2)
    vals = plane[band]
    if vals.size < 8:
        return None
    lo, hi = sorted((levels.background, levels.lesion))
    gap = cfg.rim_apart * (hi - lo)
    between = (vals > lo + gap) & (vals < hi - gap)
    if between.mean() < 0.5:
        return None
    # one tissue of its own (its values gathered at one level), not a soft edge's ramp from one level to the other
    rim = vals[between]
    level = float(np.median(rim))
    if robust_sd(rim) > cfg.rim_spread * (hi - lo):
        return None
    return _Levels(level, levels.background)


def _feret_ends(mask: np.ndarray, sp2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two boundary points of ``mask`` farthest apart, in mm, out to the pixels' edges."""
    pts = np.argwhere(mask & ~ndi.binary_erosion(mask)).astype(float) * sp2
    if len(pts) < 2:
        c = np.argwhere(mask).mean(0) * sp2
        return c - sp2 / 2, c + sp2 / 2
    if len(pts) > 600:
        pts = pts[:: len(pts) // 600 + 1]
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    a, b = pts[i], pts[j]
    u = (b - a) / max(float(np.linalg.norm(b - a)), 1e-6)
    half = 0.5 * float(np.min(sp2))
    return a - half * u, b + half * u


class _Profile:
    """Samples of a smoothed plane along in-plane rays (bilinear; mm coordinates (j, i))."""

    def __init__(self, plane: np.ndarray, sp2: np.ndarray, step_mm: float) -> None:
        self.plane, self.sp2, self.step = plane, sp2, step_mm

    def along(self, start: np.ndarray, u: np.ndarray, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(t0, t1 + 1e-9, self.step)
        pts = (start[None] + t[:, None] * u[None]) / self.sp2
        inside = np.all((pts >= 0) & (pts <= np.asarray(self.plane.shape) - 1), axis=1)
        t, pts = t[inside], pts[inside]
        vals = ndi.map_coordinates(self.plane, pts.T, order=1, mode="nearest")
        return t, np.asarray(vals, float)


@dataclass(frozen=True)
class _Levels:
    lesion: float
    background: float

    @property
    def threshold(self) -> float:
        return 0.5 * (self.lesion + self.background)

    def lesion_side(self, v: np.ndarray) -> np.ndarray:
        bright = self.lesion > self.background
        return np.asarray(v >= self.threshold) if bright else np.asarray(v <= self.threshold)


def _levels_along(
    profile: _Profile, tip: np.ndarray, u: np.ndarray, shaft: float, cfg: ArrowConfig
) -> tuple[_Levels, np.ndarray] | None:
    """The lesion's and the background's levels along the arrow and where (in-plane mm) the lesion begins."""
    t, v = profile.along(tip, u, -shaft, cfg.reach_mm)
    w = max(round(cfg.tip_window_mm / profile.step), 1)
    ahead = t >= 0
    back = v[t <= -cfg.tip_window_mm / 2]
    if back.size < w or ahead.sum() < w:
        return None
    tt, vv = t[ahead], v[ahead]
    tip_level = float(np.median(vv[:w]))
    tip_sd = max(robust_sd(vv[:w]), cfg.min_sd_hu)
    # the background: the most frequent tissue along the shaft, of what is not like the tip's
    unlike = back[np.abs(back - tip_level) > 3.0 * tip_sd]
    bg = dominant_level(unlike if unlike.size >= w else back)
    near_bg = back[np.abs(back - bg) <= 100.0]
    noise = max(1.4826 * float(np.median(np.abs(near_bg - bg))) if near_bg.size else 0.0, cfg.min_sd_hu)
    # the lesion begins at the tip, or at the first stretch just beyond it that departs from the background
    off = np.abs(vv - bg) > cfg.min_cnr * noise
    run = np.convolve(off.astype(int), np.ones(w, int), mode="valid") == w
    run &= tt[: run.size] <= cfg.tip_short_mm
    if abs(tip_level - bg) >= cfg.min_cnr * noise:
        first = 0
    elif run.any():
        first = int(np.argmax(run))
    else:
        return None
    levels = _Levels(float(np.median(vv[first : first + w])), bg)
    if abs(levels.lesion - bg) < cfg.min_cnr * noise:
        return None
    return levels, tip + u * float(tt[first] + cfg.tip_window_mm / 2)
