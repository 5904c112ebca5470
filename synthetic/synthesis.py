"""Synthetic longitudinal patients with known truth, from any CT + lesion label map (phantom or real CT).

For each follow-up, in the baseline frame: lesions grow/shrink (seed 000 eq. 5–6, staged; see
:mod:`synthetic.lesion_change`), some vanish, new ones appear (new integer labels; a label is a lesion's
identity for the whole patient). Then the patient is repositioned (rotation, translation), deformed smoothly
(elastic tissue motion + breathing) through an exact analytic :class:`SpatialTransform`, imaged on a new grid
(shifted field of view, other slice spacing / in-plane pixel size) and with other noise and contrast.

Truth per timepoint: CT volume, lesion label map on that grid, lesion centres and volumes with a status
(present / new / vanished / out_of_fov), the transform (follow-up mm → baseline mm) and landmark pairs
(baseline mm → follow-up mm) computed from it. :func:`write_patient` writes DICOM series (one study per timepoint,
same patient, new study/series/frame-of-reference UIDs, dates weeks apart), NIfTI label maps and ``truth.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid
from scipy import ndimage
from scipy.spatial import cKDTree

from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.synthetic.lesion_change import default_growth, grow_lesion, insert_lesion, remove_lesion
from lesiontrack.synthetic.transforms import SpatialTransform, apply_transform, random_patient_motion

log = logging.getLogger(__name__)
Array = np.ndarray


@dataclass
class SynthConfig:
    """Knobs of the generator (defaults: moderate, clinically plausible changes)."""

    rotation_deg: float = 4.0
    translation_mm: float = 12.0
    elastic_mm: float = 4.0
    breathing_mm: float = 6.0
    p_vanish: float = 0.15
    p_new: float = 0.5
    new_radius_mm: tuple[float, float] = (4.0, 8.0)
    fov_shift_mm: float = 15.0
    slice_spacings_mm: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
    inplane_scale: tuple[float, float] = (0.92, 1.08)
    extra_noise_hu: tuple[float, float] = (0.0, 12.0)
    contrast_scale: tuple[float, float] = (0.9, 1.1)
    weeks_between: tuple[int, int] = (6, 13)
    n_landmarks: int = 200
    landmark_lesion_clearance_mm: float = 20.0


@dataclass
class LesionState:
    label: int
    status: str  # present | new | vanished | out_of_fov
    center_mm: list[float] | None
    volume_mm3: float
    baseline_frame_center_mm: list[float] | None = None
    truncated_by_fov: bool = False  # present, but touching the edge of the follow-up field of view

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class SyntheticTimepoint:
    index: int
    ct: Volume
    labels: Volume
    lesions: dict[int, LesionState]
    days_from_baseline: int
    transform: SpatialTransform | None = None  # follow-up mm → baseline mm (None for the baseline)
    landmarks_baseline_mm: Array | None = None
    landmarks_followup_mm: Array | None = None
    changes: dict[str, object] = field(default_factory=dict)  # what the generator did (written to truth.json)


@dataclass(frozen=True)
class SynthIdentity:
    """Who the synthetic patient is: the DICOM patient and the seed its dates and accession numbers derive from."""

    patient_id: str = "SYNTH-0001"
    patient_name: str = "Synthetic^Patient"
    seed: int = 0


@dataclass
class SynthPatient:
    patient_id: str
    patient_name: str
    seed: int
    timepoints: list[SyntheticTimepoint]
    lesion_kinds: dict[int, str] = field(default_factory=dict)


# -- helpers ----------------------------------------------------------------------------------------------
def lesion_table(labels: Volume) -> dict[int, tuple[list[float], float]]:
    """label → (centroid LPS mm, volume mm³) for every non-zero label (cost ∝ lesion voxels, not image size)."""
    arr = labels.array
    idx = np.nonzero(arr)
    if not idx[0].size:
        return {}
    vals = arr[idx].astype(np.int64)
    counts = np.bincount(vals)
    out: dict[int, tuple[list[float], float]] = {}
    sums = [np.bincount(vals, weights=ax.astype(np.float64)) for ax in idx]  # k, j, i
    for lab in np.nonzero(counts)[0]:
        if lab == 0:
            continue
        n = counts[lab]
        ijk = np.array([sums[2][lab] / n, sums[1][lab] / n, sums[0][lab] / n])
        out[int(lab)] = (labels.index_to_patient(ijk).tolist(), float(n) * labels.voxel_volume_mm3())
    return out


def _followup_grid(baseline: Volume, rng: np.random.Generator, cfg: SynthConfig) -> tuple[Volume, dict[str, object]]:
    """Same orientation, new slice spacing and pixel size, field of view shifted: a different scanner setup."""
    si, sj, sk = baseline.spacing
    ni, nj, nk = baseline.size_ijk
    choices = [s for s in cfg.slice_spacings_mm if 0.5 * sk <= s <= 2.0 * sk] or [sk]
    new_sk = float(rng.choice(choices))
    scale = float(rng.uniform(*cfg.inplane_scale))
    new_si, new_sj = si * scale, sj * scale
    extent = np.array([si * (ni - 1), sj * (nj - 1), sk * (nk - 1)])
    shift = rng.uniform(-cfg.fov_shift_mm, cfg.fov_shift_mm, 3)
    shift[:2] *= 0.5
    new_extent = extent * np.array([1.0, 1.0, rng.uniform(0.9, 1.05)])
    n = np.maximum(2, np.round(new_extent / np.array([new_si, new_sj, new_sk])).astype(int) + 1)
    centre = baseline.index_to_patient((np.array([ni, nj, nk]) - 1) / 2) + shift
    spacing = np.array([new_si, new_sj, new_sk])
    origin = centre - baseline.direction @ (spacing * (n - 1) / 2)
    grid = Volume(np.zeros((n[2], n[1], n[0]), np.uint8), origin, spacing, baseline.direction.copy())
    return grid, {
        "spacing_mm": spacing.tolist(),
        "size_ijk": n.tolist(),
        "fov_shift_mm": shift.tolist(),
        "pixel_scale": scale,
    }


def _intensity_change(ct: Volume, rng: np.random.Generator, cfg: SynthConfig) -> tuple[Volume, dict[str, object]]:
    """Contrast-enhancement scale for soft tissue/vessels and extra correlated noise."""
    c = float(rng.uniform(*cfg.contrast_scale))
    extra = float(rng.uniform(*cfg.extra_noise_hu))
    a = ct.array.astype(np.float32)
    soft = (a > 0) & (a < 400)
    a[soft] = a[soft] * c
    if extra > 0:
        noise = rng.standard_normal(a.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, sigma=(0, 0.7, 0.7))
        a += noise * np.float32(extra / max(float(noise.std()), 1e-6))
    out = np.clip(np.rint(a), -1024, 3071).astype(np.int16)
    return ct.with_array(out), {"contrast_scale": c, "extra_noise_hu": extra}


def _pick_new_lesion_site(
    ct: Volume, labels: Volume, rng: np.random.Generator, radius: float
) -> tuple[Array, float, str] | None:
    """A spot in lung (→ solid nodule) or homogeneous soft tissue (→ hypodense lesion), away from lesions."""
    arr = ct.array
    lesion_mask = labels.array > 0
    sp = ct.spacing[::-1]
    r_vox = np.maximum(1, np.round((radius + 4) / sp)).astype(int)
    for _ in range(600):
        k, j, i = (int(rng.integers(r, n - r)) if n > 2 * r else -1 for r, n in zip(r_vox, arr.shape, strict=True))
        if min(k, j, i) < 0:
            return None
        box = tuple(slice(c - r, c + r + 1) for c, r in zip((k, j, i), r_vox, strict=True))
        if lesion_mask[
            tuple(slice(max(0, c - 3 * r), c + 3 * r + 1) for c, r in zip((k, j, i), r_vox, strict=True))
        ].any():
            continue
        patch = arr[box].astype(np.float32)
        mean, sd = float(patch.mean()), float(patch.std())
        centre = ct.index_to_patient(np.array([i, j, k], float))
        if -920 < mean < -750 and sd < 90:
            return centre, float(rng.uniform(15, 45)), "new lung nodule"
        if 70 < mean < 150 and sd < 30:
            return centre, mean - float(rng.uniform(25, 55)), "new hypodense lesion"
    return None


def _landmarks(
    ct: Volume, lesion_ever: Array, tr: SpatialTransform, grid: Volume, rng: np.random.Generator, cfg: SynthConfig
) -> tuple[Array, Array]:
    """Baseline points inside the body, away from any lesion (ever), that land inside the follow-up FOV."""
    cand = np.stack([rng.integers(0, n, cfg.n_landmarks * 60) for n in ct.shape], axis=1)  # k, j, i
    cand = cand[ct.array[tuple(cand.T)] > -400]
    base = ct.index_to_patient(cand[:, ::-1].astype(float) + rng.uniform(-0.5, 0.5, (len(cand), 3)))
    les = np.argwhere(lesion_ever)
    if len(les):
        if len(les) > 200_000:
            les = les[rng.choice(len(les), 200_000, replace=False)]
        tree = cKDTree(ct.index_to_patient(les[:, ::-1].astype(float)))
        dist, _ = tree.query(base, distance_upper_bound=cfg.landmark_lesion_clearance_mm + 1.0)
        base = base[dist > cfg.landmark_lesion_clearance_mm]
    base = base[: cfg.n_landmarks * 3]
    if not len(base):
        return np.zeros((0, 3)), np.zeros((0, 3))
    fu = tr.baseline_to_followup(base)
    idx = grid.patient_to_index(fu)
    inside = np.all((idx >= 0) & (idx <= np.array(grid.size_ijk) - 1), axis=1)
    base, fu = base[inside][: cfg.n_landmarks], fu[inside][: cfg.n_landmarks]
    return base, fu


# -- generator --------------------------------------------------------------------------------------------
def synthesize_patient(
    source_ct: Volume,
    labels: Volume,
    rng: np.random.Generator,
    n_followups: int = 2,
    config: SynthConfig | None = None,
    identity: SynthIdentity | None = None,
    lesion_kinds: dict[int, str] | None = None,
) -> SynthPatient:
    """Baseline (the source, unchanged) + ``n_followups`` synthetic follow-ups with full truth."""
    cfg = config or SynthConfig()
    who = identity or SynthIdentity()
    if not source_ct.same_grid(labels, atol=1e-3):
        labels = labels.resample_to(source_ct, label=True)
    ct0 = source_ct.with_array(np.clip(np.rint(source_ct.array), -1024, 3071).astype(np.int16))
    lab0 = labels.with_array(labels.array.astype(np.uint16))
    kinds = dict(lesion_kinds or {})
    table0 = lesion_table(lab0)
    for lab in table0:
        kinds.setdefault(lab, "lesion")
    tps = [
        SyntheticTimepoint(
            0, ct0, lab0, {lab: LesionState(lab, "present", c, v, c) for lab, (c, v) in table0.items()}, 0
        )
    ]

    state_ct, state_lab = ct0, lab0  # evolving patient, in the baseline frame
    next_label = max(table0, default=0) + 1
    lesion_ever = lab0.array > 0
    days = 0
    for t in range(1, n_followups + 1):
        days += 7 * int(rng.integers(cfg.weeks_between[0], cfg.weeks_between[1] + 1))
        state_ct, state_lab, lesion_log = _evolve(state_ct, state_lab, rng, cfg)
        new_labels: set[int] = set()
        if rng.random() < cfg.p_new:
            radius = float(rng.uniform(*cfg.new_radius_mm))
            site = _pick_new_lesion_site(state_ct, state_lab, rng, radius)
            if site is not None:
                centre, hu, kind = site
                state_ct, state_lab = insert_lesion(state_ct, state_lab, next_label, centre, radius, hu, rng)
                kinds[next_label] = kind
                new_labels.add(next_label)
                lesion_log[str(next_label)] = {"change": "new", "kind": kind, "radius_mm": radius, "hu": hu}
                next_label += 1
        lesion_ever |= state_lab.array > 0

        tr = random_patient_motion(rng, ct0, cfg.rotation_deg, cfg.translation_mm, cfg.elastic_mm, cfg.breathing_mm)
        grid, grid_info = _followup_grid(ct0, rng, cfg)
        fu_ct = apply_transform(state_ct, tr, grid)
        fu_lab = apply_transform(state_lab, tr, grid, label=True)
        fu_ct, inten = _intensity_change(fu_ct, rng, cfg)

        states = _lesion_states(sorted(set(kinds)), state_lab, fu_lab, new_labels, tr)
        lm_b, lm_f = _landmarks(ct0, lesion_ever, tr, grid, rng, cfg)
        tps.append(
            SyntheticTimepoint(
                t,
                fu_ct,
                fu_lab,
                states,
                days,
                tr,
                lm_b,
                lm_f,
                {"grid": grid_info, "intensity": inten, "lesions": lesion_log},
            )
        )
        log.debug(
            "synthesised %s timepoint %d: %d lesions present, grid %s",
            who.patient_id,
            t,
            sum(s.status in ("present", "new") for s in states.values()),
            grid_info["size_ijk"],
        )
    return SynthPatient(who.patient_id, who.patient_name, who.seed, tps, kinds)


def _evolve(
    state_ct: Volume, state_lab: Volume, rng: np.random.Generator, cfg: SynthConfig
) -> tuple[Volume, Volume, dict[str, object]]:
    """One interval of the disease, in the baseline frame: each present lesion vanishes (``cfg.p_vanish``), grows
    or shrinks; returns the new state and what happened to each lesion."""
    prev_table = lesion_table(state_lab)
    lesion_log: dict[str, object] = {}
    for lab in sorted(set(prev_table)):
        if rng.random() < cfg.p_vanish:
            state_ct, state_lab = remove_lesion(state_ct, state_lab, lab, rng)
            lesion_log[str(lab)] = {"change": "vanished"}
            continue
        vol = prev_table[lab][1]
        params = default_growth(rng, vol)
        state_ct, state_lab = grow_lesion(state_ct, state_lab, lab, params, rng)
        lesion_log[str(lab)] = {
            "change": "grow" if params.amplitude > 0 else "shrink",
            "amplitude": params.amplitude,
            "stages": params.stages,
            "sigma_s_mm": params.sigma_s_mm,
        }
    return state_ct, state_lab, lesion_log


def _lesion_states(
    known: list[int], state_lab: Volume, fu_lab: Volume, new_labels: set[int], tr: SpatialTransform
) -> dict[int, LesionState]:
    """The truth of every lesion ever known at one follow-up: present (or new) with its follow-up centre, volume
    and whether the field of view cuts it; out of the field of view; or vanished."""
    base_table = lesion_table(state_lab)
    fu_table = lesion_table(fu_lab)
    states: dict[int, LesionState] = {}
    for lab in known:
        if lab in fu_table:
            c, v = fu_table[lab]
            status = "new" if lab in new_labels else "present"
            m = fu_lab.array == lab
            cut = bool(m[[0, -1]].any() or m[:, [0, -1]].any() or m[:, :, [0, -1]].any())
            states[lab] = LesionState(lab, status, c, v, base_table[lab][0], truncated_by_fov=cut)
        elif lab in base_table:
            states[lab] = LesionState(
                lab,
                "out_of_fov",
                tr.baseline_to_followup(np.array(base_table[lab][0])).tolist(),
                0.0,
                base_table[lab][0],
            )
        else:  # known before, gone now (stays listed as vanished at every later timepoint)
            states[lab] = LesionState(lab, "vanished", None, 0.0, None)
    return states


# -- writing ---------------------------------------------------------------------------------------------
def write_patient(
    patient: SynthPatient, out_dir: Path | str, *, base_date: dt.date | None = None, write_dicom: bool = True
) -> Path:
    """Write ``out_dir/<patient_id>/``: ``tpN/`` DICOM CT series, ``tpN_lesions.nii.gz``, ``truth.json``."""
    root = Path(out_dir) / patient.patient_id
    root.mkdir(parents=True, exist_ok=True)
    base_date = base_date or dt.date(2025, 1, 6) + dt.timedelta(days=patient.seed % 300)
    timepoints: list[dict[str, object]] = []
    truth: dict[str, object] = {
        "patient_id": patient.patient_id,
        "patient_name": patient.patient_name,
        "seed": patient.seed,
        "lesion_kinds": {str(k): v for k, v in patient.lesion_kinds.items()},
        "coordinate_system": "DICOM patient LPS, millimetres",
        "timepoints": timepoints,
    }
    for tp in patient.timepoints:
        date = (base_date + dt.timedelta(days=tp.days_from_baseline)).strftime("%Y%m%d")
        ids: dict[str, str] = {
            "study_uid": generate_uid(),
            "series_uid": generate_uid(),
            "frame_of_reference_uid": generate_uid(),
        }
        entry: dict[str, object] = {
            "index": tp.index,
            "study_date": date,
            "days_from_baseline": tp.days_from_baseline,
            **ids,
            "grid": {
                "origin": tp.ct.origin.tolist(),
                "spacing": tp.ct.spacing.tolist(),
                "direction": tp.ct.direction.tolist(),
                "size_ijk": list(tp.ct.size_ijk),
            },
            "lesions": [s.to_dict() for s in tp.lesions.values()],
            "changes": tp.changes,
        }
        if write_dicom:
            files = write_ct_series(
                tp.ct,
                root / f"tp{tp.index}",
                CTSeriesHeader(
                    patient_id=patient.patient_id,
                    patient_name=patient.patient_name,
                    study_date=date,
                    study_id=str(tp.index + 1),
                    accession_number=f"ACC{patient.seed:04d}{tp.index}",
                    study_description="CT CHEST ABDOMEN (synthetic)",
                    series_description=f"synthetic timepoint {tp.index}",
                    study_uid=ids["study_uid"],
                    series_uid=ids["series_uid"],
                    frame_of_reference_uid=ids["frame_of_reference_uid"],
                ),
            )
            entry["dicom_dir"] = f"tp{tp.index}"
            entry["n_files"] = len(files)
        tp.labels.write(str(root / f"tp{tp.index}_lesions.nii.gz"))
        entry["label_map"] = f"tp{tp.index}_lesions.nii.gz"
        if tp.transform is not None:
            entry["transform_followup_to_baseline"] = tp.transform.to_dict()
            lb, lf = tp.landmarks_baseline_mm, tp.landmarks_followup_mm
            if lb is not None and lf is not None:
                entry["landmarks"] = {"baseline_mm": np.round(lb, 6).tolist(), "followup_mm": np.round(lf, 6).tolist()}
        timepoints.append(entry)
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return root


def load_truth(patient_dir: Path | str) -> dict[str, Any]:
    """``truth.json`` of a written patient, with transforms rebuilt as :class:`SpatialTransform`."""
    truth = json.loads((Path(patient_dir) / "truth.json").read_text())
    for tp in truth["timepoints"]:
        if "transform_followup_to_baseline" in tp:
            tp["transform"] = SpatialTransform.from_dict(tp["transform_followup_to_baseline"])
    return truth
