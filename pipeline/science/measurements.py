"""Lesion measurements on a CT grid (volume, RECIST axes, 3-D diameter, centre, HU) and changes over time.

All geometry is in patient LPS millimetres (see :mod:`models.imaging.volume`). The "axial" diameters are measured in
the acquisition plane of the CT grid (the plane spanned by its i and j axes — axial for an axial CT):

* long axis = the longest in-plane diameter (maximum Feret diameter of the mask's pixel squares) over all slices;
* short axis = the longest chord perpendicular to that long axis, on the same slice (RECIST bidimensional pair);
* max 3-D diameter = maximum Feret diameter of the mask's voxel boxes.

Pixels/voxels are treated as squares/boxes, so a one-pixel lesion measures one pixel across, not zero.
Every result is a plain dataclass that round-trips through JSON (``to_dict``/``from_dict``): the database's
``LesionObservation.measurements`` column and the exports store exactly that dictionary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, NotRequired, SupportsFloat, TypedDict, cast

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from lesiontrack.db.status import LesionStatus
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.pipeline.science.mask_grid import mask_onto_grid

if TYPE_CHECKING:
    from lesiontrack.pipeline.science.lesions import TrackedLesion

Point = tuple[float, float, float]


# -- the stored (JSON) shapes: what ``to_dict`` writes and ``from_dict`` reads -----------------------------------------
class AxisDict(TypedDict):
    length_mm: float
    start_mm: list[float]
    end_mm: list[float]
    slice_index: int


class MeasurementDict(TypedDict):
    """:class:`LesionMeasurement` as stored; only the identity is required of older records."""

    tracking_uid: str
    tracking_id: str
    status: NotRequired[str]
    is_node: NotRequired[bool]
    volume_mm3: NotRequired[float]
    voxel_count: NotRequired[int]
    long_axis: NotRequired[AxisDict | None]
    short_axis: NotRequired[AxisDict | None]
    max_3d_diameter_mm: NotRequired[float]
    centre_mm: NotRequired[list[float] | None]
    hu_mean: NotRequired[float | None]
    hu_sd: NotRequired[float | None]
    series_uid: NotRequired[str | None]
    anatomic_site: NotRequired[str | None]
    volume_ml: NotRequired[float]  # derived, written for readers of the JSON
    recist_diameter_mm: NotRequired[float]  # derived, written for readers of the JSON


class ChangeDict(TypedDict):
    reference: str
    reference_value: float
    absolute: float
    percent: float | None


class MetricChangeDict(TypedDict):
    metric: str
    value: float
    previous: NotRequired[ChangeDict | None]
    baseline: NotRequired[ChangeDict | None]
    nadir: NotRequired[ChangeDict | None]


class ChangesDict(TypedDict):
    tracking_uid: str
    metrics: dict[str, MetricChangeDict]


@dataclass
class Axis:
    """A measured diameter with its end points (LPS mm) and the slice index ``k`` it lies on (-1 for 3-D)."""

    length_mm: float
    start_mm: Point
    end_mm: Point
    slice_index: int

    @classmethod
    def from_dict(cls, d: AxisDict) -> Axis:
        return cls(float(d["length_mm"]), _point(d["start_mm"]), _point(d["end_mm"]), int(d["slice_index"]))


@dataclass
class LesionMeasurement:
    """Measurements of one lesion at one timepoint. Vanished lesions have zero sizes and no axes."""

    tracking_uid: str
    tracking_id: str
    status: LesionStatus = LesionStatus.PRESENT
    is_node: bool = False
    volume_mm3: float = 0.0
    voxel_count: int = 0
    long_axis: Axis | None = None
    short_axis: Axis | None = None
    max_3d_diameter_mm: float = 0.0
    centre_mm: Point | None = None
    hu_mean: float | None = None
    hu_sd: float | None = None
    series_uid: str | None = None
    anatomic_site: str | None = None

    def __post_init__(self) -> None:
        self.status = LesionStatus(self.status)  # also accepts the stored string value

    @property
    def volume_ml(self) -> float:
        return self.volume_mm3 / 1000.0

    @property
    def long_axis_mm(self) -> float:
        return self.long_axis.length_mm if self.long_axis else 0.0

    @property
    def short_axis_mm(self) -> float:
        return self.short_axis.length_mm if self.short_axis else 0.0

    @property
    def recist_diameter_mm(self) -> float:
        """The RECIST 1.1 diameter: short axis for lymph nodes, long axis otherwise."""
        return self.short_axis_mm if self.is_node else self.long_axis_mm

    @property
    def present(self) -> bool:
        """Lesion seen at this timepoint (voxel count is not stored in SRs, so the volume counts as well)."""
        return self.status is not LesionStatus.VANISHED and (self.voxel_count > 0 or self.volume_mm3 > 0)

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def to_dict(self) -> MeasurementDict:
        d = asdict(self)
        d["volume_ml"] = self.volume_ml
        d["recist_diameter_mm"] = self.recist_diameter_mm
        return cast(MeasurementDict, _jsonable(d))

    @classmethod
    def from_dict(cls, d: MeasurementDict) -> LesionMeasurement:
        return cls(
            tracking_uid=str(d["tracking_uid"]),
            tracking_id=str(d["tracking_id"]),
            status=LesionStatus(d.get("status", LesionStatus.PRESENT)),
            is_node=bool(d.get("is_node", False)),
            volume_mm3=float(d.get("volume_mm3", 0.0)),
            voxel_count=int(d.get("voxel_count", 0)),
            long_axis=Axis.from_dict(la) if (la := d.get("long_axis")) else None,
            short_axis=Axis.from_dict(sa) if (sa := d.get("short_axis")) else None,
            max_3d_diameter_mm=float(d.get("max_3d_diameter_mm", 0.0)),
            centre_mm=_point(c) if (c := d.get("centre_mm")) is not None else None,
            hu_mean=_opt_float(d.get("hu_mean")),
            hu_sd=_opt_float(d.get("hu_sd")),
            series_uid=d.get("series_uid"),
            anatomic_site=d.get("anatomic_site"),
        )


@dataclass
class Change:
    """Change of a value against one reference timepoint."""

    reference: str  # "previous", "baseline" or "nadir"
    reference_value: float
    absolute: float
    percent: float | None  # None when the reference value is 0

    @classmethod
    def between(cls, reference: str, ref_value: float, value: float) -> Change:
        pct = None if ref_value == 0 else 100.0 * (value - ref_value) / ref_value
        return cls(reference, float(ref_value), float(value - ref_value), pct)


@dataclass
class MetricChange:
    """A metric's current value and its change vs the previous timepoint, the baseline and the nadir."""

    metric: str
    value: float
    previous: Change | None = None
    baseline: Change | None = None
    nadir: Change | None = None

    def to_dict(self) -> MetricChangeDict:
        return cast(MetricChangeDict, _jsonable(asdict(self)))

    @classmethod
    def from_dict(cls, d: MetricChangeDict) -> MetricChange:
        def ch(x: ChangeDict | None) -> Change | None:
            return (
                None
                if x is None
                else Change(x["reference"], float(x["reference_value"]), float(x["absolute"]), _opt_float(x["percent"]))
            )

        return cls(d["metric"], float(d["value"]), ch(d.get("previous")), ch(d.get("baseline")), ch(d.get("nadir")))


CHANGE_METRICS = ("volume_mm3", "long_axis_mm", "short_axis_mm", "recist_diameter_mm")


@dataclass
class LesionChanges:
    """Per-metric changes of one lesion at its latest timepoint."""

    tracking_uid: str
    metrics: dict[str, MetricChange] = field(default_factory=dict)

    def to_dict(self) -> ChangesDict:
        return {"tracking_uid": self.tracking_uid, "metrics": {k: v.to_dict() for k, v in self.metrics.items()}}

    @classmethod
    def from_dict(cls, d: ChangesDict) -> LesionChanges:
        return cls(d["tracking_uid"], {k: MetricChange.from_dict(v) for k, v in d["metrics"].items()})


# -- measuring ------------------------------------------------------------------------------------------------------


def measure_lesion(
    mask: Volume,
    ct: Volume,
    *,
    tracking_uid: str,
    tracking_id: str,
    is_node: bool = False,
    status: LesionStatus = LesionStatus.PRESENT,
    series_uid: str | None = None,
    anatomic_site: str | None = None,
) -> LesionMeasurement:
    """Measure one lesion mask (nonzero = lesion) on ``ct``'s grid; a mask on another grid is resampled onto it."""
    m = mask_onto_grid(mask, ct)
    result = LesionMeasurement(
        tracking_uid=tracking_uid,
        tracking_id=tracking_id,
        status=LesionStatus(status),
        is_node=is_node,
        series_uid=series_uid,
        anatomic_site=anatomic_site,
    )
    n = int(m.sum())
    if n == 0:
        if result.status is LesionStatus.PRESENT:
            result.status = LesionStatus.VANISHED
        return result
    result.voxel_count = n
    result.volume_mm3 = n * ct.voxel_volume_mm3()
    idx = np.argwhere(m)  # (n, 3) as (k, j, i)
    result.centre_mm = _point(ct.index_to_patient(idx[:, ::-1].mean(0)))
    hu = np.asarray(ct.array)[m].astype(np.float64)
    result.hu_mean = float(hu.mean())
    result.hu_sd = float(hu.std(ddof=1)) if n > 1 else 0.0

    # crop to the bounding box (with the box origin remembered) for the geometric work
    lo = idx.min(0)
    hi = idx.max(0) + 1
    crop = m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    result.long_axis, result.short_axis = _axial_axes(crop, lo, ct)
    result.max_3d_diameter_mm = _max_3d_diameter(crop, ct.spacing)
    return result


def measure_tracked(lesion: TrackedLesion, ct: Volume, series_uid: str | None = None) -> LesionMeasurement:
    """Measure a tracking result: :func:`measure_lesion` with the lesion's own identity and status."""
    return measure_lesion(
        lesion.mask,
        ct,
        tracking_uid=lesion.identity.tracking_uid,
        tracking_id=lesion.identity.tracking_id,
        is_node=lesion.identity.is_node,
        status=lesion.status,
        series_uid=series_uid,
        anatomic_site=lesion.identity.anatomic_site,
    )


def _axial_axes(crop: np.ndarray, lo: np.ndarray, ct: Volume) -> tuple[Axis, Axis]:
    si, sj = float(ct.spacing[0]), float(ct.spacing[1])
    best: tuple[float, np.ndarray, np.ndarray, int] | None = None
    for kk in range(crop.shape[0]):
        sl = crop[kk]
        if not sl.any():
            continue
        corners = _pixel_corners_mm(sl, si, sj)
        a, b, d = _feret(corners)
        if best is None or d > best[0] + 1e-9:
            best = (d, a, b, kk)
    if best is None:
        raise ValueError("no slice of the mask has an in-plane diameter")
    d, a, b, kk = best
    sa, sb, sd = _perpendicular_chord(crop[kk], a, b, si, sj)
    k = int(lo[0] + kk)

    def to_lps(p: np.ndarray) -> Point:
        # crop-local 2-D mm (x along i, y along j) → global continuous index → LPS
        return _point(ct.index_to_patient(np.array([p[0] / si + lo[2], p[1] / sj + lo[1], k], float)))

    return (Axis(float(d), to_lps(a), to_lps(b), k), Axis(float(sd), to_lps(sa), to_lps(sb), k))


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _pixel_corners_mm(sl: np.ndarray, si: float, sj: float) -> np.ndarray:
    jj, ii = np.nonzero(_boundary(sl))
    offs = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    pts = np.stack([ii, jj], 1)[:, None, :] + offs[None]
    return (pts.reshape(-1, 2) * np.array([si, sj])).astype(np.float64)


def _hull_points(points: np.ndarray) -> np.ndarray:
    points = np.unique(points, axis=0)
    if len(points) <= 4:
        return points
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:  # degenerate (all collinear/coplanar): every point is a candidate
        return points


def _feret(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """End points and length of the maximum pairwise distance (on the convex hull)."""
    h = _hull_points(points)
    best = (h[0], h[0], 0.0)
    for start in range(0, len(h), 512):
        block = h[start : start + 512]
        d2 = ((block[:, None, :] - h[None, :, :]) ** 2).sum(-1)
        a, b = np.unravel_index(int(np.argmax(d2)), d2.shape)
        if d2[a, b] > best[2] ** 2:
            best = (block[a], h[b], float(np.sqrt(d2[a, b])))
    return best


def _perpendicular_chord(
    sl: np.ndarray, a: np.ndarray, b: np.ndarray, si: float, sj: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Longest chord of the slice mask perpendicular to a→b (sampled at a quarter of the pixel size)."""
    length = float(np.linalg.norm(b - a))
    u = (b - a) / length
    v = np.array([-u[1], u[0]])
    step = 0.25 * min(si, sj)
    ts = np.arange(step / 2, length, step)
    reach = float(np.hypot(sl.shape[1] * si, sl.shape[0] * sj))
    ss = np.arange(-reach, reach + step, step)
    pts = a[None, None, :] + ts[:, None, None] * u[None, None, :] + ss[None, :, None] * v[None, None, :]
    ci = np.floor(pts[..., 0] / si + 0.5).astype(int)
    rj = np.floor(pts[..., 1] / sj + 0.5).astype(int)
    ok = (ci >= 0) & (ci < sl.shape[1]) & (rj >= 0) & (rj < sl.shape[0])
    inside = np.zeros(ok.shape, bool)
    inside[ok] = sl[rj[ok], ci[ok]]
    if not inside.any():
        return a, a, 0.0
    has = inside.any(1)
    first = np.where(has, inside.argmax(1), 0)
    last = np.where(has, inside.shape[1] - 1 - inside[:, ::-1].argmax(1), 0)
    width = np.where(has, (last - first + 1) * step, 0.0)
    t = int(np.argmax(width))
    p0 = a + ts[t] * u + (ss[first[t]] - step / 2) * v
    p1 = a + ts[t] * u + (ss[last[t]] + step / 2) * v
    return p0, p1, float(width[t])


def _max_3d_diameter(crop: np.ndarray, spacing: np.ndarray) -> float:
    kk, jj, ii = np.nonzero(_boundary(crop))
    offs = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    pts = (np.stack([ii, jj, kk], 1)[:, None, :] + offs[None]).reshape(-1, 3) * spacing[None, :]
    return _feret(pts.astype(np.float64))[2]


# -- changes --------------------------------------------------------------------------------------------------------


def lesion_changes(
    history: Sequence[LesionMeasurement | None], metrics: Sequence[str] = CHANGE_METRICS
) -> LesionChanges | None:
    """Changes of the LAST entry of ``history`` (oldest first) vs previous, baseline and nadir.

    ``None`` entries are timepoints at which the lesion was not assessed; they are skipped. A vanished lesion counts
    as 0. Baseline = first assessed timepoint; nadir = smallest value among the assessed timepoints before the
    current one (baseline included). Returns None when the current timepoint was not assessed.
    """
    if not history or history[-1] is None:
        return None
    current = history[-1]
    earlier = [h for h in history[:-1] if h is not None]
    out = LesionChanges(current.tracking_uid)
    for name in metrics:
        value = current.metric(name)
        mc = MetricChange(name, value)
        if earlier:
            values = [h.metric(name) for h in earlier]
            mc.previous = Change.between("previous", values[-1], value)
            mc.baseline = Change.between("baseline", values[0], value)
            mc.nadir = Change.between("nadir", min(values), value)
        out.metrics[name] = mc
    return out


# -- helpers --------------------------------------------------------------------------------------------------------


def _point(p: ArrayLike) -> Point:
    a = np.asarray(p, dtype=np.float64).reshape(3)
    return (float(a[0]), float(a[1]), float(a[2]))


def _opt_float(x: SupportsFloat | None) -> float | None:
    return None if x is None else float(x)


def _jsonable(x: object) -> object:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x
