"""What a radiologist would draw on a lesion, from its true mask: the drawings the annotation benchmark prompts with.

* a RECIST long-axis line on the slice where the lesion's in-plane diameter is longest (endpoints at the pixel
  edges, jittered by up to ``jitter_mm`` as a hand places them);
* a bidirectional pair: that line and the longest chord perpendicular to it;
* an ellipse around the lesion on that slice (moment ellipse of the cross-section, 10 % wider, as drawn around it);
* an arrow whose tip sits inside the lesion near its edge and whose tail points away from it (20 mm);
* contours on every slice (the RTSTRUCT case, :func:`contours`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind


def _plane_points(grid: Volume, k: int, jj: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """Continuous (j, i) indices on slice ``k`` → LPS mm."""
    ijk = np.stack([ii, jj, np.full(np.shape(jj), float(k))], -1)
    return np.asarray(grid.index_to_patient(ijk))


def recist_slice(mask: np.ndarray, sp: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(slice, endpoint a, endpoint b) of the RECIST long axis, endpoints as (j, i) pixel-edge positions: on the slice
    where the lesion's cross-section is largest, the longest diameter of its body (one-pixel strands such as a
    spiculated nodule's spicules left out, as radiologists measure)."""
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    body = ndi.binary_opening(mask[k])
    body = body if body.sum() >= 0.5 * mask[k].sum() else mask[k]
    pts = np.argwhere(body).astype(float)
    edge = pts[_boundary(body)[body]] if len(pts) > 2 else pts
    mm = edge * sp[1:]
    d = np.linalg.norm(mm[:, None] - mm[None], axis=-1)
    a, b = np.unravel_index(int(np.argmax(d)), d.shape)
    pa, pb = edge[a].copy(), edge[b].copy()
    u = (pb - pa) * sp[1:]
    n = float(np.linalg.norm(u))
    if n > 0:  # out to the pixels' edges along the line
        step = 0.5 * u / n / sp[1:] * float(np.min(sp[1:]))
        pa, pb = pa - step, pb + step
    return k, pa, pb


def _boundary(m: np.ndarray) -> np.ndarray:
    return np.asarray(m & ~ndi.binary_erosion(m))


def drawings(mask: Volume, rng: np.random.Generator, jitter_mm: float = 0.5) -> dict[str, Drawing]:
    """The drawings a radiologist would leave on the lesion ``mask`` (0/1 on its CT grid)."""
    m = mask.array > 0
    sp = mask.spacing[::-1]
    k, a, b = recist_slice(m, sp)

    def jit(p: np.ndarray) -> np.ndarray:
        return p + rng.uniform(-jitter_mm, jitter_mm, 2) / sp[1:]

    a, b = jit(a), jit(b)
    line = _plane_points(mask, k, np.array([a[0], b[0]]), np.array([a[1], b[1]]))
    # short axis: the longest chord perpendicular to the long axis
    u = (b - a) * sp[1:]
    u = u / max(float(np.linalg.norm(u)), 1e-6)
    n = np.array([-u[1], u[0]])
    pts = np.argwhere(m[k]).astype(float) * sp[1:]
    along, across = pts @ u, pts @ n
    best = (0.0, pts[0], pts[0])
    for t in np.unique(np.round(along / float(np.min(sp[1:])))):
        sel = np.abs(along / float(np.min(sp[1:])) - t) <= 0.5
        if sel.sum() == 0:
            continue
        lo, hi = across[sel].min(), across[sel].max()
        w = hi - lo + float(np.min(sp[1:]))
        if w > best[0]:
            c = float(t) * float(np.min(sp[1:]))
            half = 0.5 * float(np.min(sp[1:]))
            best = (w, c * u + (lo - half) * n, c * u + (hi + half) * n)
    s0, s1 = jit(best[1] / sp[1:]), jit(best[2] / sp[1:])
    short = _plane_points(mask, k, np.array([s0[0], s1[0]]), np.array([s0[1], s1[1]]))
    # ellipse: moments of the cross-section, 10 % wider
    cen = pts.mean(0)
    cov = np.cov((pts - cen).T) if len(pts) > 2 else np.eye(2)
    w, v = np.linalg.eigh(cov)
    semi = 1.1 * 2.0 * np.sqrt(np.maximum(w, 0.25 * float(np.min(sp[1:])) ** 2)) + 0.5 * float(np.min(sp[1:]))
    major, minor = v[:, 1] * semi[1], v[:, 0] * semi[0]
    ell_mm = np.array([cen - major, cen + major, cen - minor, cen + minor])
    ell = _plane_points(mask, k, ell_mm[:, 0] / sp[1], ell_mm[:, 1] / sp[2])
    # arrow: tip inside the lesion near its edge, tail 20 mm away outwards
    edge = np.argwhere(_boundary(m[k])).astype(float) * sp[1:]
    e = edge[rng.integers(len(edge))]
    out = e - cen
    out = out / max(float(np.linalg.norm(out)), 1e-6)
    tip = cen + 0.6 * (e - cen)
    tail = e + 20.0 * out
    arrow = _plane_points(mask, k, np.array([tip[0], tail[0]]) / sp[1], np.array([tip[1], tail[1]]) / sp[2])
    return {
        "line": Drawing(DrawingKind.LINE, [line], "long axis"),
        "bidirectional": Drawing(DrawingKind.BIDIRECTIONAL, [line, short], "long + short axis"),
        "ellipse": Drawing(DrawingKind.ELLIPSE, [ell], "ellipse"),
        "arrow": Drawing(DrawingKind.ARROW, [arrow], "arrow"),
    }


def contours(mask: Volume) -> list[np.ndarray]:
    """Closed contours (LPS mm, one per island and slice) of ``mask`` along the pixel centres' boundary, as a
    planning system traces them (vertices on pixel edges, half a pixel out from the boundary pixels' centres)."""
    from skimage import measure

    out = []
    m = mask.array > 0
    for k in np.flatnonzero(m.any(axis=(1, 2))):
        padded = np.pad(m[k].astype(float), 1)
        for c in measure.find_contours(padded, 0.5):
            jj, ii = c[:, 0] - 1, c[:, 1] - 1
            if len(c) >= 4:
                out.append(_plane_points(mask, int(k), jj[:-1], ii[:-1]))
    return out
