"""Evaluation metrics shared by tests, benchmarks and the dashboard.

Segmentation: Dice, normalised surface Dice (NSD, default 2 mm tolerance), centre distance (mm).
Registration: target registration error (TRE) of landmark pairs.
Tracking (LesionLocator, seed 000 §9.2): CPM@25 (share of ground-truth lesions whose predicted centre lies within
25 mm), Dice@25 (Dice of those matched lesions), MED (mean centre distance over lesions present in both prediction
and truth), overall Dice (all tracked lesions, misses count 0; a lesion that vanished scores 1 if nothing is
predicted and 0 otherwise). Every tracking metric is averaged over the lesions of a scan first, then over the
scans of a patient, then over patients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume

Array = np.ndarray
MATCH_MM = 25.0


def _arrays(pred: Volume | Array, gt: Volume | Array) -> tuple[Array, Array]:
    if isinstance(pred, Volume) and isinstance(gt, Volume) and not pred.same_grid(gt):
        pred = pred.resample_to(gt, label=True)
    p = pred.array if isinstance(pred, Volume) else np.asarray(pred)
    g = gt.array if isinstance(gt, Volume) else np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    return p > 0, g > 0


def dice(pred: Volume | Array, gt: Volume | Array) -> float:
    """2|P∩G| / (|P|+|G|); 1.0 when both are empty."""
    p, g = _arrays(pred, gt)
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom


def _surface(mask: Array) -> Array:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def nsd(
    pred: Volume | Array, gt: Volume | Array, tolerance_mm: float = 2.0, spacing: Sequence[float] | None = None
) -> float:
    """Normalised surface Dice: share of both surfaces lying within ``tolerance_mm`` of the other surface.

    ``spacing`` (si, sj, sk) is needed for plain arrays; Volumes bring their own. 1.0 when both are empty,
    0.0 when exactly one is.
    """
    p, g = _arrays(pred, gt)
    sp: Sequence[float] | Array = spacing if spacing is not None else (1.0, 1.0, 1.0)
    if spacing is None and isinstance(gt, Volume):
        sp = gt.spacing
    samp = tuple(float(s) for s in sp)[::-1]
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    sp_, sg = _surface(p), _surface(g)
    dist_to_g = ndimage.distance_transform_edt(~sg, sampling=samp)
    dist_to_p = ndimage.distance_transform_edt(~sp_, sampling=samp)
    ok = int((dist_to_g[sp_] <= tolerance_mm).sum()) + int((dist_to_p[sg] <= tolerance_mm).sum())
    return ok / float(sp_.sum() + sg.sum())


def centroid_mm(mask: Volume) -> Array | None:
    """Centre of mass of a mask in LPS mm (None if empty)."""
    idx = np.argwhere(mask.array > 0)
    if not len(idx):
        return None
    return mask.index_to_patient(idx.mean(0)[::-1])


def centre_distance(pred: Volume, gt: Volume) -> float | None:
    """Euclidean distance (mm) between the centroids of two masks on any grids; None if one is empty."""
    a, b = centroid_mm(pred), centroid_mm(gt)
    return None if a is None or b is None else float(np.linalg.norm(a - b))


@dataclass
class TRE:
    mean: float
    median: float
    p95: float
    max: float
    n: int
    per_point: Array


def tre(mapped_mm: Array, target_mm: Array) -> TRE:
    """Target registration error between mapped landmarks and their true positions (both ``(N, 3)`` mm)."""
    a, b = np.asarray(mapped_mm, float).reshape(-1, 3), np.asarray(target_mm, float).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"landmark arrays differ: {a.shape} vs {b.shape}")
    d = np.linalg.norm(a - b, axis=1)
    if not len(d):
        return TRE(float("nan"), float("nan"), float("nan"), float("nan"), 0, d)
    return TRE(float(d.mean()), float(np.median(d)), float(np.percentile(d, 95)), float(d.max()), len(d), d)


# -- tracking ---------------------------------------------------------------------------------------------
@dataclass
class LesionResult:
    """One tracked lesion in one follow-up scan."""

    patient_id: str
    scan_id: str
    lesion_id: int
    dice: float
    distance_mm: float | None  # centre distance; None when prediction or truth is empty
    gt_present: bool
    pred_present: bool

    @property
    def matched(self) -> bool:
        return self.distance_mm is not None and self.distance_mm <= MATCH_MM


def evaluate_lesion(
    patient_id: str, scan_id: str, lesion_id: int, pred: Volume | None, gt: Volume | None
) -> LesionResult:
    """Dice and centre distance of one predicted lesion mask against its ground truth (either may be missing)."""
    pred_present = pred is not None and bool((pred.array > 0).any())
    gt_present = gt is not None and bool((gt.array > 0).any())
    if pred is not None and gt is not None and pred_present and gt_present:
        return LesionResult(patient_id, scan_id, lesion_id, dice(pred, gt), centre_distance(pred, gt), True, True)
    score = 1.0 if not pred_present and not gt_present else 0.0
    return LesionResult(patient_id, scan_id, lesion_id, score, None, gt_present, pred_present)


@dataclass
class TrackingSummary:
    cpm25: float  # percent
    dice25: float
    med_mm: float
    dice: float
    n_patients: int
    n_scans: int
    n_lesions: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def _hier_mean(
    results: Sequence[LesionResult],
    value: Callable[[LesionResult], float | None],
    include: Callable[[LesionResult], bool],
) -> float:
    """Mean over lesions per scan, then over scans per patient, then over patients (NaN-skipping)."""
    patients: dict[str, dict[str, list[float]]] = {}
    for r in results:
        v = value(r)
        if include(r) and v is not None:
            patients.setdefault(r.patient_id, {}).setdefault(r.scan_id, []).append(float(v))
    per_patient = []
    for scans in patients.values():
        scan_means = [float(np.mean(v)) for v in scans.values() if v]
        if scan_means:
            per_patient.append(float(np.mean(scan_means)))
    return float(np.mean(per_patient)) if per_patient else float("nan")


def tracking_metrics(results: Iterable[LesionResult]) -> TrackingSummary:
    """CPM@25 (%), Dice@25, MED (mm) and overall Dice, averaged per scan, then per patient, then overall."""
    res = list(results)
    return TrackingSummary(
        cpm25=100.0 * _hier_mean(res, lambda r: r.matched, lambda r: r.gt_present),
        dice25=_hier_mean(res, lambda r: r.dice, lambda r: r.matched),
        med_mm=_hier_mean(res, lambda r: r.distance_mm, lambda r: r.distance_mm is not None),
        dice=_hier_mean(res, lambda r: r.dice, lambda r: True),
        n_patients=len({r.patient_id for r in res}),
        n_scans=len({(r.patient_id, r.scan_id) for r in res}),
        n_lesions=len(res),
    )
