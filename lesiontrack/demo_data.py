"""A synthetic patient on disk as DICOM: phantom baseline CT + its lesions as a DICOM-SEG, and follow-up CTs.

Used by ``lesiontrack demo``, the end-to-end tests and ``bench/e2e.py``. The anatomy and lesions come from
:mod:`synthetic.phantom`; follow-ups from the longitudinal synthesis of :mod:`synthetic.synthesis`
(growth, shrinkage, a vanished lesion) with ``FollowUps.CHANGES``, or from patient motion only
(:mod:`synthetic.transforms`) with ``FollowUps.MOTION``. CT files are written by
:mod:`models.imaging.dicom_write`, the SEG by :mod:`pipeline.dicom.seg.writer` (one segment per lesion with its
Tracking ID and UID) — a stand-in for the radiologist's baseline annotation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from scipy import ndimage

from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity
from lesiontrack.pipeline.dicom.seg.writer import save_new, write_seg
from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion
from lesiontrack.synthetic.lesion_change import insert_lesion
from lesiontrack.synthetic.phantom import ORGANS, Phantom, make_phantom
from lesiontrack.synthetic.synthesis import SynthConfig, SynthIdentity, synthesize_patient
from lesiontrack.synthetic.transforms import SpatialTransform, apply_transform, random_patient_motion


@dataclass
class DemoSeries:
    label: str
    study_uid: str
    series_uid: str
    study_date: str
    files: list[Path]


class DemoLesion(TypedDict):
    """One baseline lesion of a demo patient (its identity as the baseline SEG carries it)."""

    label: int
    tracking_uid: str
    tracking_id: str
    organ: str
    kind: str


@dataclass
class DemoPatient:
    patient_id: str
    baseline: DemoSeries
    seg_file: Path
    followups: list[DemoSeries]
    lesions: list[DemoLesion] = field(default_factory=list)
    truth: dict[str, Any] = field(default_factory=dict)


def _write(volume: Volume, out_dir: Path, patient_id: str, date: str, label: str, number: int) -> DemoSeries:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = write_ct_series(
        volume,
        out_dir,
        CTSeriesHeader(
            patient_id=patient_id,
            patient_name="Demo^Phantom",
            study_uid=study,
            series_uid=series,
            frame_of_reference_uid=frame,
            study_date=date,
            series_number=number,
            series_description=f"Phantom CT {label}",
            study_description=f"LesionTrack demo {label}",
            accession_number=f"DEMO{number:04d}",
        ),
    )
    return DemoSeries(label, study, series, date, list(files))


def _baseline_seg(series: DemoSeries, labels: Volume, lesions: list[DemoLesion], out_dir: Path) -> Path:
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    tracked = []
    for les in lesions:
        mask = Volume((labels.array == les["label"]).astype(np.uint8), labels.origin, labels.spacing, labels.direction)
        ident = LesionIdentity(
            les["tracking_uid"],
            les["tracking_id"],
            les["label"],
            anatomic_site=les["organ"],
            is_node=les["kind"].startswith("node") or les["kind"] == "lymph_node",
        )
        tracked.append(TrackedLesion(ident, LesionStatus.PRESENT, mask, engine="manual", engine_version="1"))
    res = write_seg(
        sources,
        tracked,
        series_instance_uid=generate_uid(),
        series_description="Baseline lesions",
        algorithm_type="MANUAL",
    )
    return save_new(res.dataset, out_dir)


class FollowUps(Enum):
    """What happens between the baseline and each follow-up."""

    CHANGES = "changes"  # the longitudinal synthesis: lesions grow, shrink, vanish; the patient moves
    MOTION = "motion"  # patient motion only (rigid and elastic), the lesions unchanged
    STILL = "still"  # on the baseline's exact position, unchanged (tests that need no registration)


# the synthesis's own seed beside the patient's: with the default seeds (11, 2) lesion 5 vanishes at the second
# follow-up
_SYNTH_SEED = 2


def make_patient(
    out_dir: Path,
    *,
    seed: int = 11,
    shape: tuple[int, int, int] = (96, 144, 144),
    spacing: tuple[float, float, float] = (2.5, 2.5, 2.5),
    n_lesions: int = 5,
    n_followups: int = 2,
    follow_ups: FollowUps = FollowUps.CHANGES,
    new_lesions: dict[int, list[tuple[str, float, float]]] | None = None,
) -> DemoPatient:
    """``new_lesions``: follow-up index (1-based) → [(organ, diameter mm, HU)] of lesions that appear there and were
    not in the baseline (nothing marks them: only a new-lesion search can find them); recorded in ``truth``.
    ``follow_ups``: what happens between the scans (:class:`FollowUps`)."""
    out_dir = Path(out_dir)
    ph = make_phantom(seed=seed, shape=shape, spacing=spacing, n_lesions=n_lesions)
    patient_id = f"DEMO-{seed:04d}"
    lesions = [
        DemoLesion(
            label=info.label,
            tracking_uid=generate_uid(),
            tracking_id=f"L{info.label} {info.organ.replace('_', ' ')}",
            organ=info.organ.replace("_", " ").capitalize(),
            kind=info.kind,
        )
        for info in ph.lesion_info
    ]
    dates = ["20260105", "20260302", "20260427", "20260622"]
    baseline = _write(ph.ct, out_dir / "baseline", patient_id, dates[0], "baseline", 1)
    seg = _baseline_seg(baseline, ph.lesions, lesions, out_dir / "baseline_seg")
    followups: list[DemoSeries] = []
    truth: dict[str, Any] = {"lesions": lesions, "timepoints": []}
    if follow_ups is FollowUps.CHANGES:
        # no new lesions (nothing marks them); with the default seeds (11, 2): growth, shrinkage and lesion 5
        # vanishing at the second follow-up
        synth = synthesize_patient(
            ph.ct,
            ph.lesions,
            np.random.default_rng([seed, _SYNTH_SEED]),
            n_followups,
            SynthConfig(p_new=0.0, p_vanish=0.2),
            SynthIdentity(patient_id, seed=seed),
            lesion_kinds={i.label: i.kind for i in ph.lesion_info},
        )
        for tp in synth.timepoints[1:]:
            t = tp.index
            ct, labels = tp.ct, tp.labels
            if new_lesions and t in new_lesions and tp.transform is not None:
                for spec in new_lesions[t]:
                    ct, labels = _insert_new_lesion(ct, labels, tp.transform, ph, spec, truth, t, seed)
            followups.append(_write(ct, out_dir / f"followup{t}", patient_id, dates[t], f"follow-up {t}", t + 1))
            truth["timepoints"].append(
                {"index": t, "lesions": {k: v.to_dict() for k, v in tp.lesions.items()}, "changes": tp.changes}
            )
    else:
        rng = np.random.default_rng([seed, 98])
        for t in range(1, n_followups + 1):
            scale = 1.0 if follow_ups is FollowUps.MOTION else 0.0
            tr = random_patient_motion(
                rng, ph.ct, rotation_deg=2.0 * scale, translation_mm=6.0 * scale, elastic_mm=2.0 * scale
            )
            ct = apply_transform(ph.ct, tr, ph.ct)
            if new_lesions and t in new_lesions:
                labels = apply_transform(ph.lesions, tr, ph.ct, label=True)
                for spec in new_lesions[t]:
                    ct, labels = _insert_new_lesion(ct, labels, tr, ph, spec, truth, t, seed)
            followups.append(_write(ct, out_dir / f"followup{t}", patient_id, dates[t], f"follow-up {t}", t + 1))
            truth["timepoints"].append({"transform": "motion only"})
    return DemoPatient(patient_id, baseline, seg, followups, lesions, truth)


def _insert_new_lesion(
    ct: Volume,
    lesion_labels: Volume,
    transform: SpatialTransform,
    ph: Phantom,
    spec: tuple[str, float, float],
    truth: dict[str, Any],
    index: int,
    seed: int,
) -> tuple[Volume, Volume]:
    """Put a new lesion of ``spec`` = (organ, diameter mm, HU) deep inside that organ of the follow-up, away from
    the tracked lesions; its centre and size go into ``truth['new_lesions']``."""
    organ, diameter_mm, hu = spec
    organs = apply_transform(ph.organs, transform, ct, label=True)
    inside = organs.array == ORGANS[organ]
    away = ndimage.distance_transform_edt(lesion_labels.array == 0, sampling=ct.spacing[::-1])
    depth = ndimage.distance_transform_edt(inside, sampling=ct.spacing[::-1])
    score = np.where(away > diameter_mm * 2, depth, 0.0)
    if score.max() <= diameter_mm / 2:
        raise ValueError(f"no room for a {diameter_mm} mm lesion in the {organ} of follow-up {index}")
    k, j, i = np.unravel_index(int(np.argmax(score)), score.shape)
    centre = ct.index_to_patient(np.array([i, j, k], float))
    label = int(lesion_labels.array.max()) + 100
    new_ct, new_labels = insert_lesion(
        ct, lesion_labels, label, centre, diameter_mm / 2, hu, np.random.default_rng([seed, index, label])
    )
    truth.setdefault("new_lesions", []).append(
        {"followup": index, "organ": organ, "diameter_mm": diameter_mm, "centre_mm": [float(v) for v in centre]}
    )
    return new_ct, new_labels
