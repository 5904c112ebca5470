"""Per-lesion confidence of a tracked result and its review flag (issue 15, item 3).

From what the tracking loop already holds — the annotated CT and mask the lesion was propagated from, the
registration to the follow-up, the warped prompt, the result on the follow-up and our result at the neighbouring
timepoint — :func:`measure_lesion` gathers the evidence about one propagated result and :func:`combine` scores it:
each signal gets a score in [0, 1] (1 = nothing to worry about), and the confidence is the lowest score, lowered
further by the second lowest (``lowest x (1 - second_weight x (1 - second lowest))``): one concern keeps its own
value, two concerns compound, and the ROC gets a real curve instead of a few saturated points. The signals:

* ``registration_ncc`` — local registration quality: normalised cross-correlation of the annotated CT pulled
  through the registration against the follow-up, in a shell around the lesion (the lesion itself is left out: its
  real change is not a registration error);
* ``jacobian`` — the range of the Jacobian determinant of the follow-up → annotation mapping in the same shell
  (finite differences of ``map_points_to_baseline``, so it works for every engine; folding or a strong local
  compression/expansion of the surroundings means the registration is unreliable there);
* ``prompt_agreement`` — agreement between the propagated (radiologist-sourced) prompt and the result: the smaller
  of the two covered by the larger (growth and shrinkage keep it high, a leak or a jump does not), the shift of the
  result's centre in lesion radii and the share of the result beyond what growth explains;
* ``presence_margin`` — how clearly the image supports the call (:func:`margin`): for a present lesion, does the
  result stand out from its surroundings; for a lesion reported vanished, the *lack* of such a region at the
  propagated site;
* ``annotation_margin`` — the same measure of the annotation on its own CT (a rough prompt that took in background
  scores low). It is judged *relative to the lesion's own contrast*, so an exact annotation of a low-contrast liver
  lesion is not taken for a rough one, and it is overruled when the result on the follow-up stands out clearly
  (``clear_good``): the engine then found the lesion despite the rough prompt;
* ``consistency`` — agreement with our result at the neighbouring timepoint: a volume change beyond
  ``max_volume_factor`` per ``factor_weeks`` *of the interval between the two* (the same allowance as
  ``volume_change``; a fixed ratio took real fast change for a disagreement), charged to this result only when it
  departs further from the annotation's volume than the neighbour does (otherwise the neighbour is the odd one
  out); a disappearance after a present result, or a reappearance after a vanished one (progression under RECIST
  1.1), scores ``vanished_score``;
* ``prompt_origin`` — the prior lesion was derived from a line, arrow, ellipse or single-slice contour, not drawn in
  3-D (:mod:`pipeline.science.drawn_priors`, added with :func:`with_signal`): lower until a person confirms it;
* ``volume_change`` — implausible change against the annotation: beyond ``max_volume_factor`` (×3) per
  ``factor_weeks`` (8 weeks; the allowance compounds over longer intervals, shorter ones get the full ×3);
* ``change_coherence`` — the volume and the RECIST diameter (long axis; short axis for a node) changed against the
  annotation in opposite directions, so the report would state a growth and a shrinkage of one lesion: scored by
  the smaller of the two changes in volume terms (``min(|ln V1/V0|, 3 |ln D1/D0|)``), noise below ×1.15;
* ``registration_change`` — a volume change outside what the registration's Jacobian explains: the registration
  deforms the lesion's region (the warped prompt) by 1 / mean Jacobian determinant; a reported change that falls
  short of that in its direction, or goes the other way (a lesion the registration stretched by +30 % reported
  −12 %), is doubtful. A registration implying less than ×1.20 is not judged (a rigid or affine one says nothing
  about the lesion, and registration error deforms a region by 10–20 %), and a change beyond it in the same
  direction is expected (regularisation follows growth only in part).

A lesion whose confidence is below :attr:`ConfidenceRules.review_threshold` (setting ``tracking.review_threshold``)
is flagged for review, and **a reason of doubt is recorded exactly when it flags the lesion**: a flagged result's
reasons name every signal that scored below 1; a result that is not flagged records no reason (its lesser signals
keep their values and scores in ``signals``), so no reader sees a reason next to "Not flagged for review". The
result (:class:`LesionConfidence`)
is stored on the lesion observation (confidence, review, reasons) and read from there by the SR, the dashboard,
the API, the exports, the job summary and ``/metrics``. Calibration and the ROC: ``bench/confidence.py``,
docs/benchmarks.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from typing import Required, TypedDict, Unpack

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi

from lesiontrack.config.settings import TrackingSettings
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.base import Registration
from lesiontrack.pipeline.science.lesions import TrackedLesion
from lesiontrack.pipeline.science.measurements import measure_lesion as measure

__all__ = [
    "ConfidenceRules",
    "Evidence",
    "LesionConfidence",
    "Neighbour",
    "Signal",
    "assess_lesion",
    "combine",
    "days_between",
    "lesion_confidence",
    "margin",
    "measure_lesion",
    "review_text",
    "with_signal",
]


@dataclass(frozen=True)
class ConfidenceRules:
    """Thresholds of the confidence score (``tracking.*`` settings) and the anchors of each signal's score."""

    review_threshold: float = 0.5
    max_volume_factor: float = 3.0  # implausible change: beyond ×3 (or ÷3) ...
    factor_weeks: float = 8.0  # ... in 8 weeks
    shell_mm: float = 12.0  # width of the shell around the lesion where the registration is judged
    # score anchors: value at or beyond ``good`` → 1, at or beyond ``bad`` → 0, linear in between
    ncc_good: float = 0.80
    ncc_bad: float = 0.35
    jacobian_good: float = 1.6  # max(J, 1/J) of the surroundings
    jacobian_bad: float = 3.0
    containment_good: float = 0.75
    containment_bad: float = 0.30
    shift_good: float = 0.35  # centre shift / lesion radius
    shift_bad: float = 1.0
    beyond_good: float = 0.10  # fraction of the result farther than 0.6 radii + 2 mm from the prompt (a leak)
    beyond_bad: float = 0.35
    separation_good: float = 0.70  # presence margin of the result on the follow-up (:func:`margin`)
    separation_bad: float = 0.30
    annotation_good: float = 0.80  # the same measure of the annotation on its own CT
    annotation_bad: float = 0.55
    clear_good: float = 0.90  # a result standing out this clearly overrules a poor annotation margin ...
    clear_bad: float = 0.80  # ... not at all at or below this
    vanished_score: float = 0.3  # reported vanished while our neighbouring result was present
    # volume and RECIST diameter changed in opposite directions: the smaller of the two in volume terms
    # (min(|ln volume ratio|, 3 |ln diameter ratio|)) as a factor; within ``coherence_good`` it is measurement noise
    coherence_good: float = 1.15
    coherence_bad: float = 1.50
    # the volume change falls short of (or opposes) the change the registration's own Jacobian implies for the
    # lesion's region, by this factor; a registration implying less than ``registration_change_min`` is not judged
    # (anchors set on held-out set D of bench/confidence.py, where x1.10 / 1.20 / 1.50 flagged 5 more good results
    # deformed 10-18 % by an injected registration error; docs/benchmarks.md)
    registration_change_min: float = 1.20
    registration_change_good: float = 1.25
    registration_change_bad: float = 1.60
    second_weight: float = 0.5  # how much the second-lowest score lowers the lowest

    @classmethod
    def from_settings(cls, settings: TrackingSettings) -> ConfidenceRules:
        """From the ``[tracking]`` settings."""
        return cls(
            review_threshold=float(settings.review_threshold),
            max_volume_factor=float(settings.max_volume_factor),
            factor_weeks=float(settings.factor_weeks),
        )


class Signal(BaseModel):
    """One piece of evidence: its raw value, its score in [0, 1] and, when it scored below 1, why."""

    model_config = ConfigDict(extra="forbid")

    name: str
    value: float | None
    score: float
    reason: str | None = None


class LesionConfidence(BaseModel):
    """A lesion result's confidence in [0, 1], whether it needs review and why (stored on the observation)."""

    model_config = ConfigDict(extra="forbid")

    confidence: float = Field(ge=0.0, le=1.0)
    review: bool
    reasons: list[str] = Field(default_factory=list)
    signals: list[Signal] = Field(default_factory=list)
    threshold: float = 0.5

    def signal(self, name: str) -> Signal | None:
        return next((s for s in self.signals if s.name == name), None)


def review_text(flagged: int, total: int) -> str:
    """ "2 of 5 lesions need review" (dashboard, job summary); "none of 5 lesions needs review"."""
    noun = "lesion" if total == 1 else "lesions"
    if flagged == 0:
        return f"none of {total} {noun} needs review"
    return f"{flagged} of {total} {noun} {'needs' if total == 1 else 'need'} review"


def lesion_confidence(lesion: TrackedLesion) -> LesionConfidence | None:
    """The confidence the tracking loop stored on a :class:`pipeline.science.lesions.TrackedLesion` (None if none)."""
    conf = lesion.meta.get("confidence")
    return conf if isinstance(conf, LesionConfidence) else None


def _score(value: float, good: float, bad: float) -> float:
    """1 at ``good`` (or beyond, away from ``bad``), 0 at ``bad`` (or beyond), linear in between."""
    if good == bad:
        return 1.0 if value == good else 0.0
    return float(np.clip((value - bad) / (good - bad), 0.0, 1.0))


def days_between(a: str | None, b: str | None) -> int | None:
    """Days between two DICOM dates (YYYYMMDD); None when either is missing or malformed."""

    def parse(d: str | None) -> date | None:
        if not d or len(d) < 8 or not d[:8].isdigit():
            return None
        try:
            return date(int(d[0:4]), int(d[4:6]), int(d[6:8]))
        except ValueError:
            return None

    da, db = parse(a), parse(b)
    return None if da is None or db is None else abs((db - da).days)


# -- geometry helpers -----------------------------------------------------------------------------------------
def _box(mask: np.ndarray, pad_vox: np.ndarray) -> tuple[slice, slice, slice] | None:
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    lo = np.maximum(idx.min(0) - pad_vox, 0)
    hi = np.minimum(idx.max(0) + pad_vox + 1, mask.shape)
    return (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2])))


def _shell_points(
    region: np.ndarray, grid: Volume, inner_mm: float, width_mm: float, max_points: int = 20000
) -> np.ndarray:
    """LPS points (N, 3) of the follow-up voxels ``inner_mm``…``inner_mm + width_mm`` outside ``region``."""
    sp = grid.spacing[::-1]
    pad = np.ceil((inner_mm + width_mm + 1.0) / sp).astype(int)
    sl = _box(region, pad)
    if sl is None:
        return np.zeros((0, 3))
    sub = region[sl]
    d = ndi.distance_transform_edt(~sub, sampling=sp)
    shell = (d > inner_mm) & (d <= inner_mm + width_mm)
    idx = np.argwhere(shell)
    if len(idx) > max_points:
        idx = idx[np.linspace(0, len(idx) - 1, max_points).astype(int)]
    lo = np.array([s.start for s in sl])
    return grid.index_to_patient((idx + lo)[:, ::-1].astype(float))


def _sample(image: Volume, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear samples of ``image`` at LPS ``points`` and whether each point lies inside the grid."""
    ijk = image.patient_to_index(points)
    size = np.array(image.size_ijk) - 1
    inside = np.all((ijk >= 0) & (ijk <= size), axis=1)
    coords = np.stack([ijk[:, 2], ijk[:, 1], ijk[:, 0]])
    vals = ndi.map_coordinates(image.array.astype(np.float32), coords, order=1, mode="nearest", prefilter=False)
    return vals, inside


def local_ncc(
    source_ct: Volume, followup_ct: Volume, reg: Registration, points: np.ndarray
) -> tuple[float | None, float]:
    """NCC of the source CT pulled through ``reg`` against the follow-up at ``points`` (follow-up LPS), and the
    fraction of points that map inside the source CT. HU are clipped to [-1000, 1000]."""
    if len(points) < 50:
        return None, 0.0
    fu, _ = _sample(followup_ct, points)
    mapped = np.asarray(reg.map_points_to_baseline(points), float)
    src, inside = _sample(source_ct, mapped)
    frac = float(inside.mean())
    if inside.sum() < 50:
        return None, frac
    a = np.clip(fu[inside], -1000, 1000).astype(np.float64)
    b = np.clip(src[inside], -1000, 1000).astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    if den < 1e-6:
        return None, frac
    return float((a * b).sum() / den), frac


def jacobian_dets(reg: Registration, points: np.ndarray, n: int = 48, h_mm: float = 2.0) -> np.ndarray:
    """Jacobian determinants of the follow-up → source mapping at up to ``n`` of ``points`` (central differences of
    ``map_points_to_baseline`` with step ``h_mm``)."""
    if len(points) == 0:
        return np.zeros(0)
    pts = points[np.linspace(0, len(points) - 1, min(n, len(points))).astype(int)]
    offsets = np.concatenate([np.eye(3), -np.eye(3)]) * h_mm
    probe = (pts[:, None, :] + offsets[None]).reshape(-1, 3)
    mapped = np.asarray(reg.map_points_to_baseline(probe), float).reshape(len(pts), 6, 3)
    jac = (mapped[:, :3, :] - mapped[:, 3:, :]) / (2 * h_mm)  # (N, d/dx_i, component)
    return np.asarray(np.linalg.det(jac), float)


def jacobian_range(reg: Registration, points: np.ndarray, n: int = 48, h_mm: float = 2.0) -> tuple[float, float] | None:
    """(min, max) Jacobian determinant of the follow-up → source mapping at up to ``n`` of ``points``."""
    det = jacobian_dets(reg, points, n, h_mm)
    return None if det.size == 0 else (float(det.min()), float(det.max()))


def registration_volume_ratio(reg: Registration, region: np.ndarray, grid: Volume, n: int = 64) -> float | None:
    """The volume change the registration itself implies for ``region`` (a mask on the follow-up ``grid``, the warped
    prompt): follow-up volume / source volume = 1 / mean Jacobian determinant of the follow-up → source mapping over
    the region (None when it is empty or the mapping folds there)."""
    idx = np.argwhere(region)
    if len(idx) == 0:
        return None
    det = jacobian_dets(reg, grid.index_to_patient(idx[:, ::-1].astype(float)), n=n)
    mean = float(det.mean()) if det.size else 0.0
    return None if mean <= 0 else 1.0 / mean


def separation(
    image: Volume, region: np.ndarray, inner_mm: float = 1.0, width_mm: float = 3.0, smooth_mm: float = 0.0
) -> float | None:
    """How clearly ``region`` stands out on ``image``: the fraction of the voxels in a shell ``inner_mm`` …
    ``inner_mm + width_mm`` around it that differ from the region's median by more than ``q``, where ``q`` is the
    region's own 75th-percentile deviation plus a noise allowance of 10 HU *capped at half the contrast* between
    the region's and the shell's medians (never below the 75th percentile itself): a shell voxel that is closer to
    the surroundings than to the lesion counts, however small the contrast is in HU. 1 for a homogeneous lesion in
    contrasting surroundings, about 0.5 for one abutting tissue of its own density, low for a region that took in its
    surroundings (or a site where nothing stands out). ``smooth_mm``: Gaussian smoothing first (noise down)."""
    if not region.any():
        return None
    sp = image.spacing[::-1]
    pad = np.ceil((inner_mm + width_mm + 1.0) / sp).astype(int)
    sl = _box(region, pad)
    if sl is None:
        return None
    sub = region[sl]
    img = image.array[sl].astype(np.float32)
    if smooth_mm > 0:
        img = ndi.gaussian_filter(img, sigma=np.maximum(smooth_mm / sp, 0.5))
    d = ndi.distance_transform_edt(~sub, sampling=sp)
    shell = (d > inner_mm) & (d <= inner_mm + width_mm)
    if shell.sum() < 10 or sub.sum() < 3:
        return None
    vi, vo = img[sub], img[shell]
    mi = float(np.median(vi))
    p75 = float(np.percentile(np.abs(vi - mi), 75))
    q = max(p75, min(p75 + 10.0, 0.5 * abs(mi - float(np.median(vo)))))
    return float((np.abs(vo - mi) > q).mean())


def margin(image: Volume, region: np.ndarray) -> float | None:
    """:func:`separation` at full resolution (1–4 mm shell) and after 1.5 mm Gaussian smoothing (1.5–5 mm shell),
    the better of the two: smoothing lets a low-contrast lesion stand out of the noise, full resolution keeps a
    small high-contrast one from being blurred into its surroundings."""
    views = [separation(image, region), separation(image, region, inner_mm=1.5, width_mm=3.5, smooth_mm=1.5)]
    vals = [v for v in views if v is not None]
    return max(vals) if vals else None


def _beyond_fraction(prompt: np.ndarray, result: np.ndarray, grid: Volume) -> float:
    """Fraction of ``result`` farther from ``prompt`` than 0.6 prompt radii + 2 mm: more than growth explains."""
    sp = grid.spacing[::-1]
    limit = 0.6 * _equivalent_radius_mm(float(prompt.sum()), grid) + 2.0
    sl = _box(prompt | result, np.ceil((limit + 2.0) / sp).astype(int))
    if sl is None or not result.any():
        return 0.0
    d = ndi.distance_transform_edt(~prompt[sl], sampling=sp)
    return float((d[result[sl]] > limit).mean())


def _diameter_ratio(
    source_mask: Volume, source_ct: Volume, result: Volume, followup_ct: Volume, is_node: bool
) -> float | None:
    """RECIST diameter of the result / that of the annotation (long axis; short axis for a lymph node), each measured
    on its own CT as the report measures it (:func:`pipeline.science.measurements.measure_lesion`)."""

    def diameter(mask: Volume, ct: Volume) -> float:
        try:
            return measure(mask, ct, tracking_uid="", tracking_id="", is_node=is_node).recist_diameter_mm
        except ValueError:
            return 0.0

    d0, d1 = diameter(source_mask, source_ct), diameter(result, followup_ct)
    return d1 / d0 if d0 > 0 and d1 > 0 else None


def _equivalent_radius_mm(n_voxels: float, grid: Volume) -> float:
    return float((3.0 * n_voxels * grid.voxel_volume_mm3() / (4.0 * math.pi)) ** (1.0 / 3.0))


# -- the assessment -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Neighbour:
    """Our result at the neighbouring timepoint, as the consistency check sees it (:mod:`pipeline.science.tracking`)."""

    ratio: float | None = None  # volume now / volume then (both present)
    days: int | None = None  # between the two timepoints
    vanished: bool = False  # present then, reported vanished now
    reappeared: bool = False  # vanished then, reported present now


class LesionEvidence(TypedDict, total=False):
    """What :func:`measure_lesion` looks at for one propagated result (keyword arguments)."""

    source_ct: Required[Volume]
    source_mask: Required[Volume]  # 0/1 on source_ct: the annotation
    followup_ct: Required[Volume]
    prompt: Required[Volume]  # 0/1 on the follow-up grid: the propagated annotation
    result: Required[Volume]  # 0/1 on the follow-up grid: the segmentation
    present: Required[bool]
    reg: Required[Registration | None]
    rules: ConfidenceRules | None
    neighbour: Neighbour | None  # what the tracking loop's consistency check saw
    days: int | None  # the interval between the annotation and the follow-up
    is_node: bool  # the RECIST diameter is the short axis


class Evidence(TypedDict, total=False):
    """The raw evidence :func:`measure_lesion` gathers about one propagated result and :func:`combine` scores (a key
    is absent where it could not be measured, e.g. no registration, or the result vanished)."""

    present: Required[bool]  # reported present at the follow-up
    days: int | None  # between the annotation and the follow-up
    ncc: float | None  # local registration similarity around the lesion
    ncc_inside: float  # fraction of the sampled surroundings inside the annotated CT
    jac_lo: float  # range of the registration's Jacobian determinant near the lesion
    jac_hi: float
    annotation_margin: float | None  # how clearly the annotation stands out on its CT
    prompt_present: bool  # the propagated prompt landed inside the follow-up
    containment: float  # overlap of result and prompt (re-segmented, present)
    shift: float  # centroid shift, in equivalent radii
    beyond: float  # fraction of the result beyond the prompt
    result_margin: float | None  # how clearly the result stands out on the follow-up
    volume_ratio: float | None  # result volume / annotated volume
    diameter_ratio: float | None  # RECIST diameter now / then
    registration_ratio: float | None  # the registration's own volume change there
    site_margin: float | None  # reported vanished: how much the site still stands out
    neighbour_ratio: float | None  # what the tracking loop's consistency check saw (Neighbour)
    neighbour_days: int | None
    neighbour_vanished: bool
    neighbour_reappeared: bool


def measure_lesion(**inputs: Unpack[LesionEvidence]) -> Evidence:
    """The raw evidence about one propagated result (numbers; :func:`combine` scores them). Every mask is a 0/1
    volume, ``prompt`` and ``result`` on the follow-up grid, ``source_mask`` on ``source_ct``; ``days`` is the
    interval between the annotation and the follow-up; ``is_node``: the RECIST diameter is the short axis."""
    source_ct, source_mask, followup_ct = inputs["source_ct"], inputs["source_mask"], inputs["followup_ct"]
    prompt, result, present, reg = inputs["prompt"], inputs["result"], inputs["present"], inputs["reg"]
    neighbour, days, is_node = inputs.get("neighbour"), inputs.get("days"), inputs.get("is_node", False)
    r = inputs.get("rules") or ConfidenceRules()
    f: Evidence = {"present": present, "days": days}
    p = prompt.array > 0
    res = result.array > 0
    src = source_mask.array > 0
    region = p | res
    if reg is not None and region.any():
        pts = _shell_points(region, followup_ct, 2.0, r.shell_mm)
        f["ncc"], f["ncc_inside"] = local_ncc(source_ct, followup_ct, reg, pts)
        jr = jacobian_range(reg, pts)
        if jr is not None:
            f["jac_lo"], f["jac_hi"] = jr
    f["annotation_margin"] = margin(source_ct, src)
    f["prompt_present"] = bool(p.any())
    if present and res.any() and p.any():
        f["containment"] = float((p & res).sum()) / float(min(p.sum(), res.sum()))
        sp_mm = result.spacing[::-1]
        cp = np.argwhere(p).mean(0) * sp_mm
        cr = np.argwhere(res).mean(0) * sp_mm
        radius = _equivalent_radius_mm(float(max(p.sum(), res.sum())), result)
        f["shift"] = float(np.linalg.norm(cp - cr)) / max(radius, 1.0)
        f["beyond"] = _beyond_fraction(p, res, result)
        f["result_margin"] = margin(followup_ct, res)
        v0 = float(src.sum()) * source_ct.voxel_volume_mm3()
        v1 = float(res.sum()) * result.voxel_volume_mm3()
        f["volume_ratio"] = v1 / v0 if v0 > 0 and v1 > 0 else None
        f["diameter_ratio"] = _diameter_ratio(source_mask, source_ct, result, followup_ct, is_node)
        if reg is not None:
            f["registration_ratio"] = registration_volume_ratio(reg, p, followup_ct)
    elif not present and p.any():
        f["site_margin"] = margin(followup_ct, p)
    if neighbour is not None:
        f["neighbour_ratio"] = neighbour.ratio
        f["neighbour_days"] = neighbour.days
        f["neighbour_vanished"] = neighbour.vanished
        f["neighbour_reappeared"] = neighbour.reappeared
    return f


def _allowed_factor(days: int | None, r: ConfidenceRules) -> float:
    """The volume factor allowed over ``days``: ``max_volume_factor`` per ``factor_weeks``, compounding over longer
    intervals (shorter ones, or an unknown one, get the full factor)."""
    return r.max_volume_factor ** max(1.0, (days or 0) / (7.0 * r.factor_weeks))


def _excess_score(ratio: float, allowed: float) -> float:
    """1 within ``allowed`` (either way), falling to 0 at twice (half) the allowance."""
    excess = abs(math.log(ratio)) - math.log(allowed)
    return float(np.clip(1.0 - excess / math.log(2.0), 0.0, 1.0)) if excess > 0 else 1.0


def _signal(name: str, value: float | None, score: float, reason: str) -> Signal:
    return Signal(
        name=name, value=None if value is None else round(value, 4), score=score, reason=None if score >= 1 else reason
    )


def combine(f: Evidence, rules: ConfidenceRules | None = None) -> LesionConfidence:
    """Score the evidence of :func:`measure_lesion` (see the module docstring)."""
    r = rules or ConfidenceRules()
    signals = _registration_signals(f, r)
    clear = None
    if f.get("containment") is not None:
        more, clear = _result_signals(f, r)
        signals += more
        signals += _volume_signals(f, r)
    elif not f["present"] and f.get("prompt_present"):
        sep = f.get("site_margin")
        if sep is not None:
            s = 1.0 - _score(sep, r.separation_good, r.separation_bad)
            signals.append(
                _signal("presence_margin", sep, s, f"reported vanished, but its site still stands out ({sep:.2f})")
            )
    elif not f["present"]:
        signals.append(
            Signal(name="presence_margin", value=None, score=0.5, reason="propagated prompt fell outside this CT")
        )
    # present on one side of the neighbouring timepoint and vanished on the other, either way round: a lesion back
    # after a complete response is progression under RECIST 1.1, as strong a claim as a disappearance, and as
    # often a remnant or a neighbouring structure taken for it
    flip = None
    if not f["present"] and f.get("neighbour_vanished"):
        flip = "vanished although present at the neighbouring timepoint"
    elif f["present"] and f.get("neighbour_reappeared"):
        flip = "present although reported vanished at the neighbouring timepoint"
    if flip is not None:
        signals.append(Signal(name="consistency", value=None, score=r.vanished_score, reason=flip))
    ann = f.get("annotation_margin")
    if ann is not None:
        s = _score(ann, r.annotation_good, r.annotation_bad)
        reason = f"the annotation barely stands out on its CT (margin {ann:.2f})"
        if clear is not None and clear > s:
            reason += f"; the result stands out {'clearly' if clear >= 1 else 'fairly'} on the follow-up"
            s = clear
        signals.append(_signal("annotation_margin", ann, s, reason))

    return _scored(signals, r)


def _registration_signals(f: Evidence, r: ConfidenceRules) -> list[Signal]:
    """How well the registration went near the lesion (local NCC, Jacobian)."""
    signals: list[Signal] = []
    ncc = f.get("ncc")
    if ncc is not None:
        s = _score(ncc, r.ncc_good, r.ncc_bad)
        signals.append(
            _signal("registration_ncc", ncc, s, f"local registration similarity NCC {ncc:.2f} (good >= {r.ncc_good})")
        )
    elif "ncc_inside" in f and f["ncc_inside"] < 0.5:
        signals.append(
            Signal(
                name="registration_ncc",
                value=None,
                score=0.5,
                reason=f"surroundings mostly outside the annotated CT ({100 * f['ncc_inside']:.0f} % inside)",
            )
        )
    if f.get("jac_lo") is not None:
        lo, hi = f["jac_lo"], f["jac_hi"]
        worst = math.inf if lo <= 0 else max(hi, 1.0 / lo)
        s = 0.0 if lo <= 0 else _score(math.log(worst), math.log(r.jacobian_good), math.log(r.jacobian_bad))
        signals.append(
            _signal(
                "jacobian",
                lo if lo <= 0 or 1.0 / lo > hi else hi,
                s,
                "registration folds near the lesion" if lo <= 0 else f"local Jacobian {lo:.2f}..{hi:.2f}",
            )
        )
    return signals


def _result_signals(f: Evidence, r: ConfidenceRules) -> tuple[list[Signal], float | None]:
    """A re-segmented result against its propagated prompt and its surroundings; with how clearly it stands out."""
    signals: list[Signal] = []
    clear = None
    containment, shift, beyond = f["containment"], f["shift"], f["beyond"]
    s = min(
        _score(containment, r.containment_good, r.containment_bad),
        _score(shift, r.shift_good, r.shift_bad),
        _score(beyond, r.beyond_good, r.beyond_bad),
    )
    signals.append(
        _signal(
            "prompt_agreement",
            min(containment, 1.0 - min(shift, 1.0), 1.0 - beyond),
            s,
            f"result departs from the propagated prompt (overlap {containment:.2f}, shift {shift:.2f} radii, "
            f"{100 * beyond:.0f} % beyond it)",
        )
    )
    sep = f.get("result_margin")
    if sep is not None:
        s = _score(sep, r.separation_good, r.separation_bad)
        signals.append(
            _signal("presence_margin", sep, s, f"the result barely stands out from its surroundings ({sep:.2f})")
        )
        clear = _score(sep, r.clear_good, r.clear_bad)
    return signals, clear


def _volume_signals(f: Evidence, r: ConfidenceRules) -> list[Signal]:
    """The volume change against the annotation, its coherence with the diameters and the registration, and
    against our result at the neighbouring timepoint."""
    signals: list[Signal] = []
    ratio = f.get("volume_ratio")
    if ratio is not None:
        days = f.get("days")
        allowed = _allowed_factor(days, r)
        signals.append(
            _signal(
                "volume_change",
                ratio,
                _excess_score(ratio, allowed),
                f"implausible volume change x{ratio:.2f} against the annotation "
                f"(allowed x{allowed:.1f}{f' in {days} days' if days is not None else ''})",
            )
        )
    dr = f.get("diameter_ratio")
    if ratio is not None and dr is not None:
        signals.append(_coherence(ratio, dr, r))
    jr = f.get("registration_ratio")
    if ratio is not None and jr is not None and abs(math.log(jr)) > math.log(r.registration_change_min):
        signals.append(_registration_change(ratio, jr, r))
    nb = f.get("neighbour_ratio")
    if nb is not None and ratio is not None:
        nb_days = f.get("neighbour_days")
        allowed = _allowed_factor(nb_days, r)
        s = _excess_score(nb, allowed)
        if abs(math.log(ratio / nb)) > abs(math.log(ratio)):
            s = 1.0  # the neighbour departs further from the annotation than this result: its jump, not ours
        signals.append(
            _signal(
                "consistency",
                nb,
                s,
                f"volume x{nb:.2f} against our result at the neighbouring timepoint (allowed x{allowed:.1f}"
                f"{f' in {nb_days} days' if nb_days is not None else ''})",
            )
        )
    return signals


def _scored(signals: list[Signal], r: ConfidenceRules) -> LesionConfidence:
    scores = sorted(s.score for s in signals)
    conf = 1.0 if not scores else scores[0] * (1.0 - r.second_weight * (1.0 - (scores[1] if len(scores) > 1 else 1.0)))
    review = conf < r.review_threshold
    # a reason of doubt is recorded exactly when it flags the lesion: a flagged result names every signal that
    # lowered it; below-perfect signals of a result that is not flagged stay in ``signals`` (value and score) only
    reasons = [s.reason for s in sorted(signals, key=lambda s: s.score) if s.reason] if review else []
    return LesionConfidence(
        confidence=round(float(conf), 4),
        review=review,
        reasons=reasons,
        signals=signals,
        threshold=r.review_threshold,
    )


def _pct_text(ratio: float) -> str:
    return f"{100.0 * (ratio - 1.0):+.0f} %"


def _coherence(volume_ratio: float, diameter_ratio: float, r: ConfidenceRules) -> Signal:
    """Volume and RECIST diameter against the annotation changed in opposite directions (the report would state a
    growth and a shrinkage of the same lesion): scored by the smaller of the two changes in volume terms."""
    lv, ld = math.log(volume_ratio), math.log(diameter_ratio)
    contradiction = min(abs(lv), 3.0 * abs(ld)) if lv * ld < 0 else 0.0
    s = _score(contradiction, math.log(r.coherence_good), math.log(r.coherence_bad))
    return _signal(
        "change_coherence",
        contradiction,
        s,
        f"volume {_pct_text(volume_ratio)} but RECIST diameter {_pct_text(diameter_ratio)} against the annotation "
        "(signs disagree)",
    )


def _registration_change(volume_ratio: float, registration_ratio: float, r: ConfidenceRules) -> Signal:
    """The registration itself deforms the lesion's region by ``registration_ratio`` (1 / mean Jacobian); a reported
    change that falls short of it in its direction, or goes the other way, is more than the registration explains.
    A change beyond it in the same direction is expected (a regularised registration follows growth only in part)."""
    direction = 1.0 if registration_ratio > 1 else -1.0
    shortfall = direction * (math.log(registration_ratio) - math.log(volume_ratio))
    s = _score(shortfall, math.log(r.registration_change_good), math.log(r.registration_change_bad))
    return _signal(
        "registration_change",
        shortfall,
        s,
        f"volume {_pct_text(volume_ratio)} against the annotation, while the registration's Jacobian deforms the "
        f"lesion's region by {_pct_text(registration_ratio)}",
    )


def with_signal(conf: LesionConfidence, signal: Signal, rules: ConfidenceRules | None = None) -> LesionConfidence:
    """``conf`` re-scored with one more signal (e.g. ``prompt_origin``: the prior lesion came from a line)."""
    return _scored([*(s for s in conf.signals if s.name != signal.name), signal], rules or ConfidenceRules())


def assess_lesion(**inputs: Unpack[LesionEvidence]) -> LesionConfidence:
    """Score one propagated lesion result: :func:`combine` of :func:`measure_lesion` (see the module docstring).
    ``neighbour`` is what the tracking loop's consistency check saw; ``days`` the interval between the annotation
    and the follow-up."""
    evidence = measure_lesion(**inputs)
    return combine(evidence, inputs.get("rules"))
