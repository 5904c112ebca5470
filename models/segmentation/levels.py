"""Tissue levels from samples of an image: the most frequent tissue's level and a robust spread, shared by the
adaptive engine and the derivation of a lesion from a drawing (from_drawing, arrow)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def dominant_level(values: np.ndarray) -> float:
    """The level of the most frequent tissue among ``values``: the median of those within 100 HU of the smoothed
    histogram's mode. Around a juxtapleural nodule the ring is lung and chest wall; its median is pulled from the lung
    towards the wall (or between the two) and made the half-way level cut the nodule's lung-side edge."""
    vals = np.asarray(values, np.float64).ravel()
    edges = np.arange(-1200.0, 3210.0, 10.0)
    hist, _ = np.histogram(np.clip(vals, edges[0], edges[-1] - 1), bins=edges)
    mode = float(edges[int(np.argmax(ndi.gaussian_filter1d(hist.astype(np.float64), 2.0)))] + 5.0)
    close = vals[np.abs(vals - mode) <= 100.0]
    return float(np.median(close)) if close.size >= 10 else float(np.median(vals))


def robust_sd(v: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation (robust to a minority of other tissue); 0 for none."""
    if v.size == 0:
        return 0.0
    return 1.4826 * float(np.median(np.abs(v - np.median(v))))
