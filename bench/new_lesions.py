"""New-lesion detection benchmark (issue 15); prints one JSON document.

Scans: a baseline (digital phantom ``synthetic.phantom`` with its 6 lesions, the real chest CT ``real/lung1`` with
its real tumour, or the real thorax/abdomen CT ``real/body_ct``) and one synthetic follow-up of it. In the
baseline frame every existing lesion grows or shrinks (``grow_lesion``, LesionLocator-style), and new lobulated
lesions (``insert_lesion``, measured axial diameter ≈ 5–20 mm) appear, one per tissue where the CT has room
for it, plus one more in a random tissue:
a solid lung nodule (−50…50 HU) in lung parenchyma, a hypodense lesion (25–60 HU below) in homogeneous enhancing
parenchyma (liver-like, 80–160 HU), and a node (20–60 HU) in fat. Then the patient moves (rotation ±4°,
translation ±12 mm, elastic 4 mm, breathing 6 mm; exact analytic motion), is imaged on another grid (other slice
spacing and pixel size, shifted field of view — "another scanner") with contrast-phase scaling 0.9–1.1 and extra
noise 0–12 HU (``synthetic.synthesis`` helpers).

The detector gets the follow-up, the baseline warped onto it and the tracked lesions (the truth labels of the
pre-existing lesions on the follow-up, i.e. a perfect tracking result). Two warps, same scans:

* ``oracle``: the exact inverse of the synthetic motion (upper bound: no registration error);
* ``convex``: the product's default registration engine (``models.engines.build_registration("convex")``) at
  ``--spacing`` mm (registrations cached on disk by content hash with ``--cache``).

A new lesion is found when a candidate with confidence ≥ 0.5 overlaps it; a candidate that overlaps no new lesion
is a false candidate. Size bins use the lesion's measured longest axial diameter on the follow-up truth mask.
``--timing`` adds the detector's time on a 512×512×300 scan (real lung1 resampled to 0.8 mm slices).

``--longitudinal`` (issue 29): 6-timepoint chest and abdomen series of the digital phantom with bowel motion and
sliding breathing (:func:`make_series`), each follow-up against the timepoint before, warped by the best smooth
registration (:func:`smooth_oracle_warp`; ``--warp convex`` for the product's engine), the previous detector (read
from git at ``PREVIOUS_COMMIT``) and the current one side by side: false candidates per scan, the rank and organ of
each new lesion, untrusted ("not assessed") scans.

    .venv/bin/python bench/new_lesions.py --set tune --methods oracle
    .venv/bin/python bench/new_lesions.py --longitudinal --set heldout --cache /tmp/i29c --rows
    .venv/bin/python bench/new_lesions.py --set heldout --methods oracle,convex --cache /tmp/nl-regcache --timing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesiontrack.models.detection import DetectionOptions, detect_new_lesions
from lesiontrack.models.detection.new_lesions import _axial_diameter
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.synthetic.lesion_change import default_growth, grow_lesion, insert_lesion
from lesiontrack.synthetic.synthesis import SynthConfig, _followup_grid, _intensity_change
from lesiontrack.synthetic.transforms import SpatialTransform, apply_transform, random_patient_motion

SHARED = Path(os.environ.get("LESIONTRACK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# (background, seed); tuning seeds and held-out seeds never overlap
SETS = {
    "tune": [("phantom", 11), ("phantom", 12), ("lung1", 1), ("body_ct", 1)],
    "heldout": [
        ("phantom", 31),
        ("phantom", 32),
        ("phantom", 33),
        ("phantom", 34),
        ("lung1", 31),
        ("lung1", 32),
        ("body_ct", 31),
        ("body_ct", 32),
    ],
}


@dataclass
class Scan:
    name: str
    baseline: Volume
    followup: Volume
    transform: SpatialTransform  # follow-up mm → baseline mm
    new_truth: dict[int, dict[str, Any]]  # label → tissue, nominal diameter, measured diameter
    fu_labels: np.ndarray  # follow-up truth labels (pre-existing < 100 ≤ new)
    info: dict[str, Any] = field(default_factory=dict)


def background(kind: str, seed: int) -> tuple[Volume, Volume]:
    """Baseline CT (int16) and its lesion labels (uint16)."""
    if kind == "phantom":
        from lesiontrack.synthetic.phantom import make_phantom

        ph = make_phantom(seed=seed)
        return ph.ct, ph.lesions.with_array(ph.lesions.array.astype(np.uint16))
    if kind == "lung1":
        ct = Volume.read(str(SHARED / "real/lung1/lung1_image.nrrd"))
        lab = Volume.read(str(SHARED / "real/lung1/lung1_label.nrrd"))
        lab = lab if lab.same_grid(ct) else lab.resample_to(ct, label=True)
        return ct.with_array(ct.array.astype(np.int16)), lab.with_array((lab.array > 0).astype(np.uint16))
    ct = Volume.read(str(SHARED / "real/body_ct/ct.nii.gz"))
    ct = ct.with_array(np.clip(ct.array, -1024, 3071).astype(np.int16))
    return ct, ct.with_array(np.zeros(ct.shape, np.uint16))


def pick_site(
    ct: Volume, avoid: np.ndarray, tissue: str, radius: float, rng: np.random.Generator
) -> tuple[np.ndarray, float] | None:
    """A site for a new lesion of ``radius`` mm in ``tissue`` (by local HU statistics), its lesion HU."""
    arr = ct.array
    sp = ct.spacing[::-1]
    r_vox = np.maximum(1, np.ceil((radius + 4.0) / sp)).astype(int)
    z_margin = int(np.ceil(25.0 / sp[0]))
    clear = np.maximum(1, np.ceil((2 * radius + 15.0) / sp)).astype(int)
    ranges = {"lung": (-900.0, -750.0), "liver": (80.0, 160.0), "soft tissue": (-130.0, -70.0)}
    lo = [z_margin if a == 0 else r + 2 for a, r in enumerate(r_vox)]
    hi = [n - (z_margin if a == 0 else r + 2) for a, (r, n) in enumerate(zip(r_vox, arr.shape, strict=True))]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    inner = arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pool = np.flatnonzero((inner > ranges[tissue][0]) & (inner < ranges[tissue][1]))
    if pool.size == 0:
        return None
    for flat in rng.choice(pool, size=min(pool.size, 4000), replace=False):
        c = [int(v) + low for v, low in zip(np.unravel_index(int(flat), inner.shape), lo, strict=True)]
        box = tuple(slice(v - r, v + r + 1) for v, r in zip(c, r_vox, strict=True))
        far = tuple(slice(max(0, v - r), v + r + 1) for v, r in zip(c, clear, strict=True))
        if avoid[far].any():
            continue
        patch = arr[box].astype(np.float32)
        mean, sd = float(patch.mean()), float(patch.std())
        centre = ct.index_to_patient(np.array(c[::-1], float))
        if tissue == "lung" and -920 < mean < -700 and sd < 150 and patch.max() < 0:
            return centre, float(rng.uniform(-50, 50))
        if tissue == "liver" and 80 < mean < 160 and sd < 25:
            return centre, mean - float(rng.uniform(25, 60))
        if tissue == "soft tissue" and -140 < mean < -60 and sd < 35:
            return centre, float(rng.uniform(20, 60))
    return None


def make_scan(kind: str, seed: int) -> Scan:
    rng = np.random.default_rng([seed, 15])
    ct0, lab0 = background(kind, seed)
    ct, lab = ct0, lab0
    for les in [int(v) for v in np.unique(lab0.array) if v]:
        vol = float((lab.array == les).sum()) * lab.voxel_volume_mm3()
        ct, lab = grow_lesion(ct, lab, les, default_growth(rng, vol), rng)
    avoid = lab.array > 0
    truth: dict[int, dict[str, Any]] = {}
    label = 100
    extra = str(rng.choice(["lung", "liver", "soft tissue"]))
    for tissue in ("lung", "liver", "soft tissue", extra):
        # nominal sphere diameter; the lobulated lesion's measured axial diameter is ~1.2-1.5x larger
        small = rng.random() < 0.5
        diameter = float(rng.uniform(4.0, 7.5) if small else rng.uniform(8.0, 15.0))
        site = pick_site(ct, avoid, tissue, diameter / 2, rng)
        if site is None:
            continue
        centre, hu = site
        ct, lab = insert_lesion(ct, lab, label, centre, diameter / 2, hu, rng)
        avoid = lab.array > 0
        truth[label] = {"tissue": tissue, "nominal_diameter_mm": diameter, "hu": hu}
        label += 1
    cfg = SynthConfig()
    tr = random_patient_motion(rng, ct0, cfg.rotation_deg, cfg.translation_mm, cfg.elastic_mm, cfg.breathing_mm)
    grid, grid_info = _followup_grid(ct0, rng, cfg)
    fu = apply_transform(ct, tr, grid)
    fu_lab = apply_transform(lab, tr, grid, label=True)
    fu, inten = _intensity_change(fu, rng, cfg)
    for n in list(truth):
        m = fu_lab.array == n
        if not m.any():
            truth[n]["in_fov"] = False
            continue
        truth[n]["in_fov"] = True
        truth[n]["diameter_mm"] = _axial_diameter(np.argwhere(m), fu.spacing[::-1])
        truth[n]["volume_mm3"] = float(m.sum()) * fu.voxel_volume_mm3()
    info = {"grid": grid_info, "intensity": inten, "baseline_spacing_mm": ct0.spacing.tolist()}
    return Scan(f"{kind}-{seed}", ct0, fu, tr, truth, fu_lab.array, info)


def convex_warp(scan: Scan, spacing: float, cache: Path | None) -> tuple[Volume, float]:
    return register_pair(scan.baseline, scan.followup, scan.name, spacing, cache)


def register_pair(
    prior: Volume, followup: Volume, name: str, spacing: float, cache: Path | None
) -> tuple[Volume, float]:
    """The prior warped onto the follow-up by the product's default registration (cached by content hash)."""
    from lesiontrack.config.settings import EngineSettings
    from lesiontrack.models.engines import build_registration

    key = hashlib.sha1(prior.array.tobytes() + followup.array.tobytes()).hexdigest()[:12]
    path = cache / f"convex{spacing:g}_{name}_{key}.pkl" if cache else None
    if path is not None and path.exists():
        warped, secs = pickle.loads(path.read_bytes())
        return warped, secs
    engine = build_registration("convex", EngineSettings(working_spacing_mm=spacing))
    t0 = time.perf_counter()
    reg = engine.register(prior, followup)
    warped = reg.warp_image(prior, default=-1024.0)
    secs = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps((warped, secs)))
    return warped, secs


# -- longitudinal series with bowel and breathing (issue 29) ---------------------------------------------------
# (region, phantom seed); tuning and held-out seeds never overlap
SERIES = {
    "tune": [("chest", 101), ("abdomen", 102)],
    "heldout": [("chest", 131), ("chest", 132), ("chest", 133), ("abdomen", 141), ("abdomen", 142), ("abdomen", 143)],
    # drawn after the issue-29 detector's second round was designed on the sets above (never looked at before)
    "fresh": [("chest", 171), ("chest", 172), ("abdomen", 181), ("abdomen", 182)],
    # drawn after the issue-29 detector's third round (liver anatomy, misfit where the surroundings moved) was
    # designed on the sets above
    "fresh3": [("chest", 271), ("chest", 272), ("abdomen", 281), ("abdomen", 282)],
}
REGIONS = {"chest": (-10.0, 185.0), "abdomen": (-140.0, 40.0)}  # canonical z range of the field of view (mm)
N_TIMEPOINTS = 6


@dataclass
class Pair:
    """One follow-up of a longitudinal series and its prior (the timepoint before)."""

    name: str
    region: str
    prior: Volume
    followup: Volume
    tracked: np.ndarray  # truth of the lesions already there at the prior (a perfect tracking result)
    new_truth: dict[int, dict[str, Any]]  # label → tissue, diameter: the lesions that appeared since the prior
    fu_labels: np.ndarray
    prior_motion: tuple[SpatialTransform, SpatialTransform, Volume]  # outer, inner, viscera (canonical grid)
    fu_motion: tuple[SpatialTransform, SpatialTransform, Volume]


def _new_site(ph: Any, organ: str, radius: float, rng: np.random.Generator, z_range: tuple[float, float]) -> Any:
    """A point ≥ radius + 4 mm deep inside ``organ`` of the phantom, ≥ 20 mm from its lesions and the z ends."""
    from lesiontrack.synthetic.phantom import ORGANS
    from lesiontrack.synthetic.visceral_motion import viscera_mask

    sp = ph.ct.spacing[::-1]
    inside = ph.organs.array == ORGANS[organ]
    if organ == "fat":  # a node in the abdominal fat, not under the skin
        inside &= viscera_mask(ph.organs)
    depth = ndi.distance_transform_edt(inside, sampling=sp)
    clear = ndi.distance_transform_edt(ph.lesions.array == 0, sampling=sp)
    idx = np.argwhere((depth > radius + 4.0) & (clear > 20.0))
    pts = ph.ct.index_to_patient(idx[:, ::-1].astype(float))
    pts = pts[(pts[:, 2] > z_range[0] + 25.0) & (pts[:, 2] < z_range[1] - 25.0)]
    return pts[rng.integers(len(pts))] if len(pts) else None


def make_series(region: str, seed: int, cache: Path | None) -> list[Pair]:
    """A patient followed over ``N_TIMEPOINTS`` scans of the chest or the abdomen (digital phantom, 2 × 2 mm
    pixels, 2.5 mm slices before each scan's own grid). Between scans: the existing lesions grow or shrink; two new
    lesions appear at two random follow-ups (chest: lung nodules 6–14 mm; abdomen: a hypodense liver metastasis and
    a liver metastasis or a node in the abdominal fat) and stay; the bowel moves (loops shifted and deformed, gas
    elsewhere: ``make_phantom(bowel_state=...)``); each scan has its own breath-hold (the viscera slide along the
    wall by ±8 mm: ``synthetic.visceral_motion``), patient position (±4°, ±12 mm, 4 mm elastic), grid (slices
    1.25–5 mm, pixel ×0.92–1.08, field of view shifted), contrast phase ×0.9–1.1 and noise."""
    from lesiontrack.synthetic.phantom import make_phantom
    from lesiontrack.synthetic.visceral_motion import apply_sliding, breathing, viscera_mask

    path = cache / f"series_{region}_{seed}_v2.pkl" if cache else None
    if path is not None and path.exists():
        pairs: list[Pair] = pickle.loads(path.read_bytes())
        return pairs
    z0, z1 = REGIONS[region]
    sp = (2.0, 2.0, 2.5)
    shape = (int((z1 - z0) / sp[2]) + 1, 160, 160)
    centre = (0.0, 0.0, 0.5 * (z0 + z1))
    rng = np.random.default_rng([seed, 29])
    base = make_phantom(seed=seed, shape=shape, spacing=sp, center_mm=centre)
    events = []  # (timepoint it appears at, label, tissue, centre, radius, hu)
    appear = sorted(rng.choice(np.arange(1, N_TIMEPOINTS), size=2, replace=False).tolist())
    organs = ("lung", "lung") if region == "chest" else ("liver", str(rng.choice(["liver", "fat"])))
    liver_hu = float(np.median(base.ct.array[base.organs.array == 13])) if region == "abdomen" else 0.0
    for n, (t_app, organ) in enumerate(zip(appear, organs, strict=True)):
        radius = float(rng.uniform(3.0, 7.0))
        site = _new_site(base, organ, radius, rng, (z0, z1))
        if site is None:
            continue
        hu = {"lung": rng.uniform(-50, 50), "liver": liver_hu - rng.uniform(25, 60), "fat": rng.uniform(20, 60)}[organ]
        tissue = {"lung": "lung", "liver": "liver", "fat": "soft tissue"}[organ]
        events.append((int(t_app), 100 + n, tissue, site, radius, float(hu)))
    cfg = SynthConfig()
    scans: list[tuple[Volume, Volume]] = []
    motions: list[tuple[SpatialTransform, SpatialTransform, Volume]] = []
    for t in range(N_TIMEPOINTS):
        ph = base if t == 0 else make_phantom(seed=seed, shape=shape, spacing=sp, center_mm=centre, bowel_state=t)
        ct, lab = ph.ct, ph.lesions.with_array(ph.lesions.array.astype(np.uint16))
        trng = np.random.default_rng([seed, 29, t])
        if t > 0:
            for les in [int(v) for v in np.unique(lab.array) if v]:
                vol = float((lab.array == les).sum()) * lab.voxel_volume_mm3()
                ct, lab = grow_lesion(ct, lab, les, default_growth(trng, vol), trng)
        for t_app, label, _tissue, site, radius, hu in events:
            if t >= t_app:
                shape_rng = np.random.default_rng([seed, 29, label])  # the same lesion, growing
                ct, lab = insert_lesion(ct, lab, label, site, radius * (1.0 + 0.1 * (t - t_app)), hu, shape_rng)
        outer = random_patient_motion(trng, ct, cfg.rotation_deg, cfg.translation_mm, cfg.elastic_mm, 0.0)
        inner = breathing(outer, ct, float(trng.uniform(-8.0, 8.0)), 30.0, 170.0)
        grid, _info = _followup_grid(ct, trng, cfg)
        viscera = ph.organs.with_array(viscera_mask(ph.organs).astype(np.uint8))
        scan = apply_sliding(ct, viscera, outer, inner, grid)
        labels = apply_sliding(lab, viscera, outer, inner, grid, label=True)
        scan, _inten = _intensity_change(scan, trng, cfg)
        scans.append((scan, labels))
        motions.append((outer, inner, viscera))
    pairs = []
    for t in range(1, N_TIMEPOINTS):
        fu, fu_lab = scans[t]
        new_now = {e[1]: e for e in events if e[0] == t}
        truth: dict[int, dict[str, Any]] = {}
        for label, (_t, _l, tissue, _site, _r, hu) in new_now.items():
            m = fu_lab.array == label
            truth[label] = {"tissue": tissue, "hu": hu, "in_fov": bool(m.any())}
            if m.any():
                truth[label]["diameter_mm"] = _axial_diameter(np.argwhere(m), fu.spacing[::-1])
                truth[label]["volume_mm3"] = float(m.sum()) * fu.voxel_volume_mm3()
        tracked = (fu_lab.array > 0) & ~np.isin(fu_lab.array, list(new_now))
        pairs.append(
            Pair(
                f"{region}-{seed}-t{t}",
                region,
                scans[t - 1][0],
                fu,
                tracked,
                truth,
                fu_lab.array.astype(np.uint16),
                motions[t - 1],
                motions[t],
            )
        )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(pairs))
    return pairs


def smooth_oracle_warp(pair: Pair, sigma_mm: float = 8.0, step_mm: float = 4.0) -> Volume:
    """The prior warped onto the follow-up by the best a *smooth* registration can do: the exact follow-up → prior
    mapping (sliding viscera and wall each through their own motion), Gaussian-smoothed with ``sigma_mm`` like a
    regularised deformable registration's field. It aligns the patient's repositioning, elastic motion and the bulk
    of the breathing, and leaves what no smooth field undoes: the seams along the pleura and the abdominal wall,
    and the bowel (its loops and gas are not in the motion at all)."""
    fu = pair.followup
    step = np.maximum(1, np.round(step_mm / fu.spacing).astype(int))  # i, j, k
    n_k, n_j, n_i = fu.shape
    kk, jj, ii = np.meshgrid(
        np.arange(0, n_k, step[2]), np.arange(0, n_j, step[1]), np.arange(0, n_i, step[0]), indexing="ij"
    )
    ijk = np.stack([ii, jj, kk], -1).astype(float)
    pts = fu.index_to_patient(ijk.reshape(-1, 3))

    def pick(viscera: Volume, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        idx = np.rint(viscera.patient_to_index(a)).astype(int)[:, ::-1]
        inside = np.all((idx >= 0) & (idx < np.array(viscera.shape)), axis=1)
        vis = np.zeros(len(a), bool)
        vis[inside] = viscera.array[tuple(idx[inside].T)] > 0
        return np.where(vis[:, None], a, b)

    f_out, f_in, f_vis = pair.fu_motion
    q = pick(f_vis, f_in.followup_to_baseline(pts), f_out.followup_to_baseline(pts))  # canonical
    p_out, p_in, p_vis = pair.prior_motion
    r_in, r_out = p_in.baseline_to_followup(q), p_out.baseline_to_followup(q)
    idx = np.rint(p_vis.patient_to_index(q)).astype(int)[:, ::-1]
    inside = np.all((idx >= 0) & (idx < np.array(p_vis.shape)), axis=1)
    vis = np.zeros(len(q), bool)
    vis[inside] = p_vis.array[tuple(idx[inside].T)] > 0
    r = np.where(vis[:, None], r_in, r_out)  # prior scan (LPS)
    disp = (r - pts).reshape(*kk.shape, 3)
    sig = sigma_mm / (fu.spacing[::-1] * step[::-1])
    disp = np.stack([ndi.gaussian_filter(disp[..., c], sig, mode="nearest") for c in range(3)], -1)
    full = np.empty((*fu.shape, 3), np.float32)
    coords = np.stack(
        np.meshgrid(*(np.arange(n) / s for n, s in zip(fu.shape, step[::-1], strict=True)), indexing="ij")
    )
    for c in range(3):
        full[..., c] = ndi.map_coordinates(disp[..., c], coords, order=1, mode="nearest")
    del coords
    out = np.empty(fu.shape, np.float32)
    prior = pair.prior.array.astype(np.float32)
    for k0 in range(0, n_k, 16):
        k1 = min(n_k, k0 + 16)
        kk2, jj2, ii2 = np.meshgrid(np.arange(k0, k1), np.arange(n_j), np.arange(n_i), indexing="ij")
        p = fu.index_to_patient(np.stack([ii2, jj2, kk2], -1).astype(float)) + full[k0:k1]
        src = pair.prior.patient_to_index(p)
        out[k0:k1] = ndi.map_coordinates(
            prior, [src[..., 2], src[..., 1], src[..., 0]], order=1, mode="constant", cval=-1024.0, prefilter=False
        )
    return fu.with_array(np.rint(out).astype(np.int16))


def cached_smooth_oracle_warp(pair: Pair, cache: Path | None) -> Volume:
    key = hashlib.sha1(pair.prior.array.tobytes() + pair.followup.array.tobytes()).hexdigest()[:12]
    path = cache / f"smooth-oracle_{pair.name}_{key}.pkl" if cache else None
    if path is not None and path.exists():
        warped: Volume = pickle.loads(path.read_bytes())
        return warped
    warped = smooth_oracle_warp(pair)
    if path is not None:
        path.write_bytes(pickle.dumps(warped))
    return warped


PREVIOUS_COMMIT = "628cdd6"  # the detector at main before issue 29


def previous_detector(commit: str = PREVIOUS_COMMIT) -> Any:
    """The detector as it was at ``commit`` (read from git), to run side by side in one run: every module of
    ``models/detection`` at that commit (anatomy, misfit and blob measure too, not today's), loaded as a package of
    its own so that the two detectors share no code."""
    import importlib
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", commit, "models/detection/"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    package = f"previous_detection_{commit}"
    where = Path(tempfile.mkdtemp(prefix="prev-detector-")) / package
    where.mkdir()
    for name in names:
        if not name.endswith(".py"):
            continue
        src = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=root, capture_output=True, text=True, check=True)
        text = src.stdout.replace("lesiontrack.models.detection.", f"{package}.")
        text = text.replace("from lesiontrack.models.detection import", f"from {package} import")
        (where / Path(name).name).write_text(text)
    sys.path.insert(0, str(where.parent))
    return importlib.import_module(f"{package}.new_lesions")


def evaluate_pair(pair: Pair, warped: Volume, module: Any) -> dict[str, Any]:
    """One detector (a module with ``search_new_lesions`` and ``DetectionOptions``) on one follow-up, as the
    product's detect step runs it (trust check, defaults): false candidates, the rank of each new lesion."""
    t0 = time.perf_counter()
    search = module.search_new_lesions(pair.followup, warped, pair.tracked, module.DetectionOptions())
    secs = time.perf_counter() - t0
    cands = search.candidates
    new_map = np.where(pair.fu_labels >= 100, pair.fu_labels, 0)
    near = ndi.maximum_filter(new_map, size=3)
    false = []
    for c in cands:
        if not any(v >= 100 for v in np.unique(near[c.mask])):
            false.append({"tissue": c.tissue, "diameter_mm": round(c.diameter_mm, 1),
                          "contrast_hu": round(c.contrast_hu), "confidence": round(c.confidence, 2),
                          "centre_mm": [round(v, 1) for v in c.centre_mm]})  # fmt: skip
    rows = []
    for n, t in pair.new_truth.items():
        if not t.get("in_fov"):
            continue
        ranks = [i for i, c in enumerate(cands, start=1) if (c.mask & (near == n)).any()]
        rows.append({
            "scan": pair.name, "label": n, "tissue": t["tissue"], "diameter_mm": round(t["diameter_mm"], 1),
            "found": bool(ranks), "rank": ranks[0] if ranks else None,
            "tissue_called": cands[ranks[0] - 1].tissue if ranks else None,
        })  # fmt: skip
    return {"scan": pair.name, "region": pair.region, "trusted": search.trusted, "n_candidates": len(cands),
            "false": false, "rows": rows, "seconds": secs}  # fmt: skip


def summarise_longitudinal(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for region in ("chest", "abdomen", "all"):
        res = [r for r in results if region in ("all", r["region"])]
        if not res:
            continue
        rows = [row for r in res for row in r["rows"]]
        n_false = [len(r["false"]) for r in res]
        ranks = [row["rank"] for row in rows]
        out[region] = {
            "scans": len(res),
            "untrusted_scans": sum(not r["trusted"] for r in res),
            "false_per_scan": float(np.mean(n_false)),
            "max_false_in_a_scan": max(n_false),
            "scans_without_false": sum(n == 0 for n in n_false),
            "candidates_per_scan": float(np.mean([r["n_candidates"] for r in res])),
            "new_lesions": len(rows),
            "found": sum(row["found"] for row in rows),
            "ranked_first": sum(r == 1 for r in ranks),
            "ranks": ranks,
            "tissue_named_right": sum(row["tissue_called"] == row["tissue"] for row in rows if row["found"]),
            "detector_seconds_per_scan": float(np.mean([r["seconds"] for r in res])),
        }
    return out


def run_longitudinal(args: argparse.Namespace) -> dict[str, Any]:
    from lesiontrack.models.detection import new_lesions as current

    detectors = {"previous": previous_detector(args.previous), "current": current}
    wanted = [d for d in args.detectors.split(",") if d]
    series = [(r, s) for r, s in SERIES[args.set] if not args.only or f"{r}-{s}" in args.only.split(",")]
    t0 = time.perf_counter()
    pairs = [p for r, s in series for p in make_series(r, s, args.cache)]
    synth_s = time.perf_counter() - t0
    results: dict[str, list[dict[str, Any]]] = {d: [] for d in wanted}
    reg_s = []
    for pair in pairs:
        if args.warp == "convex":
            warped, secs = register_pair(pair.prior, pair.followup, pair.name, args.spacing, args.cache)
            reg_s.append(secs)
        else:
            warped = cached_smooth_oracle_warp(pair, args.cache)
        for d in wanted:
            results[d].append(evaluate_pair(pair, warped, detectors[d]))
    doc: dict[str, Any] = {
        "benchmark": "new_lesions --longitudinal",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), load {os.getloadavg()[0]:.1f}",
        "set": args.set,
        "series": [f"{r}-{s}" for r, s in series],
        "timepoints_per_series": N_TIMEPOINTS,
        "previous_detector": f"models/detection/new_lesions.py at {args.previous}",
        "synthesis_seconds": synth_s,
        "registration": {
            "engine": args.warp,
            "working_spacing_mm": args.spacing,
            "seconds_per_pair": float(np.mean(reg_s)) if reg_s else None,
        },
        "detectors": {d: summarise_longitudinal(results[d]) for d in wanted},
    }
    if args.rows:
        doc["per_scan"] = {d: results[d] for d in wanted}
    return doc


def evaluate(scan: Scan, warped: Volume, opt: DetectionOptions, module: Any = None) -> dict[str, Any]:
    """One scan with the current detector, or with ``module`` (a previous detector) at its own defaults."""
    tracked = (scan.fu_labels > 0) & (scan.fu_labels < 100)
    t0 = time.perf_counter()
    if module is None:
        cands = detect_new_lesions(scan.followup, warped, tracked, opt)
    else:
        cands = module.detect_new_lesions(scan.followup, warped, tracked, module.DetectionOptions())
    secs = time.perf_counter() - t0
    new_map = np.where(scan.fu_labels >= 100, scan.fu_labels, 0)
    near = ndi.maximum_filter(new_map, size=3)  # each new lesion, dilated by one voxel
    rows = []
    hit_labels: set[int] = set()
    false = []
    for c in cands:
        labs = {int(v) for v in np.unique(near[c.mask]) if v >= 100}
        if labs:
            hit_labels |= labs
        else:
            false.append(
                {
                    "tissue": c.tissue,
                    "diameter_mm": round(c.diameter_mm, 1),
                    "contrast_hu": round(c.contrast_hu),
                    "elongation": round(c.elongation, 2),
                    "strength": round(c.strength, 2),
                    "confidence": round(c.confidence, 2),
                    "centre_mm": [round(v, 1) for v in c.centre_mm],
                }
            )
    for n, t in scan.new_truth.items():
        if not t.get("in_fov"):
            continue
        best = [c for c in cands if (c.mask & (near == n)).any()]
        rows.append(
            {
                "scan": scan.name,
                "label": n,
                **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in t.items()},
                "found": n in hit_labels,
                "confidence": round(best[0].confidence, 2) if best else None,
                "tissue_called": best[0].tissue if best else None,
            }
        )
    return {"rows": rows, "false": false, "seconds": secs, "n_candidates": len(cands)}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for res in results for r in res["rows"]]
    big = [r for r in rows if r["diameter_mm"] >= 10.0]
    small = [r for r in rows if r["diameter_mm"] < 10.0]
    per_tissue = {
        t: f"{sum(r['found'] for r in rows if r['tissue'] == t)}/{sum(r['tissue'] == t for r in rows)}"
        for t in ("lung", "liver", "soft tissue")
    }
    n_false = sum(len(res["false"]) for res in results)
    return {
        "new_lesions": len(rows),
        "sensitivity_ge10mm": sum(r["found"] for r in big) / max(len(big), 1),
        "found_ge10mm": f"{sum(r['found'] for r in big)}/{len(big)}",
        "sensitivity_5_10mm": sum(r["found"] for r in small) / max(len(small), 1),
        "found_5_10mm": f"{sum(r['found'] for r in small)}/{len(small)}",
        "found_per_tissue": per_tissue,
        "false_candidates": n_false,
        "false_per_scan": n_false / max(len(results), 1),
        "detector_seconds_per_scan": float(np.mean([res["seconds"] for res in results])),
    }


def timing_512(opt: DetectionOptions) -> dict[str, Any]:
    """Detector wall/CPU time on a 512×512×300 scan (lung1 resampled to 0.8 mm slices), prior shifted 1.5 mm."""
    ct, _ = background("lung1", 0)
    lo, hi = ct.world_bounds()
    sp = np.array([ct.spacing[0], ct.spacing[1], (hi[2] - lo[2]) / 299])
    grid = Volume(np.zeros((300, 512, 512), np.uint8), ct.origin, sp, ct.direction)
    fu = ct.resample_to(grid)
    prior = Volume(ct.array, ct.origin + np.array([1.5, -1.0, 0.5]), ct.spacing, ct.direction).resample_to(grid)
    t0, c0 = time.perf_counter(), time.process_time()
    cands = detect_new_lesions(fu, prior, None, opt)
    return {
        "shape": list(fu.shape),
        "spacing_mm": [round(v, 3) for v in sp],
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "candidates": len(cands),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--set", choices=sorted(set(SETS) | set(SERIES)), default="heldout")
    ap.add_argument("--methods", default="oracle,convex")
    ap.add_argument("--spacing", type=float, default=3.0, help="convex registration working spacing (mm)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--rows", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated scan names (development)")
    ap.add_argument("--longitudinal", action="store_true", help="6-timepoint chest/abdomen series (issue 29)")
    ap.add_argument("--detectors", default="previous,current", help="side by side (issue-15 set: current unless named)")
    ap.add_argument("--previous", default=PREVIOUS_COMMIT, help="git commit of the previous detector")
    ap.add_argument("--warp", choices=["smooth-oracle", "convex"], default="smooth-oracle", help="with --longitudinal")
    args = ap.parse_args()
    if args.longitudinal:
        print(json.dumps(run_longitudinal(args), indent=1, default=str))
        return
    opt = DetectionOptions()
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    scans = [make_scan(k, s) for k, s in SETS[args.set] if not args.only or f"{k}-{s}" in args.only.split(",")]
    synth_s = time.perf_counter() - t0
    out: dict[str, Any] = {}
    reg_seconds: list[float] = []
    all_res: dict[str, list[dict[str, Any]]] = {}
    wanted = [d for d in args.detectors.split(",") if d]
    modules: dict[str, Any] = {"current": None}
    if "previous" in wanted and "--detectors" in sys.argv:  # the issue-15 runs compare only when asked
        modules = {"previous": previous_detector(args.previous), "current": None}
    for method in methods:
        res: dict[str, list[dict[str, Any]]] = {d: [] for d in modules}
        for scan in scans:
            if method == "oracle":
                warped = apply_transform(scan.baseline, scan.transform, scan.followup)
            else:
                warped, secs = convex_warp(scan, args.spacing, args.cache)
                reg_seconds.append(secs)
            for d, module in modules.items():
                res[d].append(evaluate(scan, warped, opt, module))
        for d in modules:
            key = method if d == "current" else f"{method} (previous {args.previous})"
            all_res[key] = res[d]
            out[key] = summarise(res[d])
    doc: dict[str, Any] = {
        "benchmark": "new_lesions",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), load {os.getloadavg()[0]:.1f}",
        "set": args.set,
        "scans": [
            {
                "name": s.name,
                "followup_spacing_mm": [round(v, 2) for v in s.followup.spacing],
                "followup_shape": list(s.followup.shape),
                "new": len([t for t in s.new_truth.values() if t.get("in_fov")]),
            }
            for s in scans
        ],
        "synthesis_seconds": synth_s,
        "registration": {"engine": "convex", "working_spacing_mm": args.spacing, "seconds_per_pair": None},
        "options": {k: v for k, v in opt.__dict__.items()},
        "methods": out,
        "targets": {
            m: {
                "sensitivity>=10mm>=0.80": s["sensitivity_ge10mm"] >= 0.8,
                "sensitivity5-10mm>=0.60": s["sensitivity_5_10mm"] >= 0.6,
                "false/scan<=1": s["false_per_scan"] <= 1.0,
            }
            for m, s in out.items()
        },
    }
    if reg_seconds:
        doc["registration"]["seconds_per_pair"] = float(np.mean(reg_seconds))
    if args.rows:
        doc["rows"] = {m: [r for res in v for r in res["rows"]] for m, v in all_res.items()}
        doc["false"] = {m: {s.name: res["false"] for s, res in zip(scans, v, strict=True)} for m, v in all_res.items()}
    if args.timing:
        doc["timing_512x512x300"] = timing_512(opt)
    print(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
