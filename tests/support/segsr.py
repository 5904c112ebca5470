"""Synthetic longitudinal data for the SEG/SR tests: a small CT per timepoint (written as real DICOM by
``models.imaging.dicom_write``) and spherical/ellipsoidal lesions that shrink, vanish and appear."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity
from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion

SHAPE = (24, 72, 72)  # k, j, i
SPACING = (0.8, 0.8, 2.0)
ORIGIN = (-28.8, -28.8, -100.0)

# (tracking_id, site, is_node, centre offset mm from grid centre, radii mm per timepoint; 0 = vanished, None = absent)
LESIONS: list[tuple[str, str, bool, tuple[float, float, float], list[tuple[float, float, float] | int | None]]] = [
    ("L1 liver", "liver", False, (-10.0, -8.0, 0.0), [(10.0, 7.0, 6.0), (6.0, 4.0, 4.0), (8.0, 6.0, 5.0)]),
    ("L2 lymph node", "lymph node", True, (12.0, 10.0, 4.0), [(9.0, 8.0, 6.0), (5.0, 4.0, 4.0), (5.0, 4.0, 4.0)]),
    ("L3 lung", "lung", False, (10.0, -12.0, -6.0), [(6.0, 5.0, 4.0), 0, 0]),
    ("L4 liver", "liver", False, (-12.0, 12.0, -8.0), [None, None, (4.0, 4.0, 4.0)]),
]


@dataclass
class SyntheticTimepoint:
    index: int
    ct: Volume
    files: list[Path]
    datasets: list[pydicom.Dataset]
    lesions: list[TrackedLesion]
    study_uid: str
    series_uid: str


def _ellipsoid(ct: Volume, centre: np.ndarray, radii: tuple[float, float, float]) -> np.ndarray:
    k, j, i = np.indices(ct.shape)
    p = ct.index_to_patient(np.stack([i, j, k], -1).reshape(-1, 3)).reshape((*ct.shape, 3))
    return (((p - centre) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def make_series(tmp: Path, n_timepoints: int = 3, seed: int = 0) -> list[SyntheticTimepoint]:
    """Three CT studies of one patient with the tracked lesions of :data:`LESIONS` (identities shared)."""
    rng = np.random.default_rng(seed)
    identities = [
        LesionIdentity(generate_uid(), tid, n, site, node) for n, (tid, site, node, _, _) in enumerate(LESIONS, start=1)
    ]
    frame_uid = generate_uid()
    out: list[SyntheticTimepoint] = []
    for t in range(n_timepoints):
        hu = rng.normal(40, 8, SHAPE).astype(np.int16)
        ct = Volume(hu, origin=ORIGIN, spacing=SPACING)
        centre0 = ct.index_to_patient(np.array(ct.size_ijk, float) / 2 - 0.5)
        tracked: list[TrackedLesion] = []
        for ident, (_, _, _, offset, radii) in zip(identities, LESIONS, strict=True):
            r = radii[t]
            if r is None:
                continue
            if r == 0:
                tracked.append(
                    TrackedLesion(
                        ident, LesionStatus.VANISHED, ct.with_array(np.zeros(SHAPE, np.uint8)), "test-engine", "1.0"
                    )
                )
                continue
            m = _ellipsoid(ct, centre0 + np.asarray(offset), r)
            hu[m] = 90 + (10 * ident.label)
            first = next(i for i, x in enumerate(LESIONS[ident.label - 1][4]) if x is not None)
            status = LesionStatus.NEW if (t > 0 and first == t) else LesionStatus.PRESENT
            tracked.append(TrackedLesion(ident, status, ct.with_array(m.astype(np.uint8)), "test-engine", "1.0"))
        ct = ct.with_array(hu)
        study_uid, series_uid = generate_uid(), generate_uid()
        files = write_ct_series(
            ct,
            tmp / f"ct{t}",
            CTSeriesHeader(
                patient_id="LT-TEST-1",
                patient_name="Test^Patient",
                study_uid=study_uid,
                series_uid=series_uid,
                frame_of_reference_uid=frame_uid,
                study_date=f"2026010{t + 1}",
                series_number=1 + t,
                series_description=f"CT T{t}",
            ),
        )
        datasets: list[pydicom.Dataset] = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        out.append(SyntheticTimepoint(t, ct, files, datasets, tracked, study_uid, series_uid))
    return out


def content_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every SR content item of ``ds``, depth first (the document's tree flattened)."""
    out: list[pydicom.Dataset] = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(content_items(item))
    return out
