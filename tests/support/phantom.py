"""A tracking phantom: a small body with lesions that move, grow, shrink and vanish over timepoints, rendered as
CT volumes (numpy), the ground truth beside each."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.science.lesions import Timepoint
from lesiontrack.synthetic.transforms import SpatialTransform


@dataclass
class PhantomLesion:
    centre_mm: tuple[float, float, float]  # in baseline LPS
    radius_mm: float
    hu: float
    name: str = ""


LESIONS = [
    PhantomLesion((60.0, -10.0, 20.0), 8.0, 30.0, "lung nodule"),
    PhantomLesion((-45.0, 5.0, -40.0), 11.0, 35.0, "liver low contrast"),
    PhantomLesion((-75.0, -20.0, -35.0), 7.0, 15.0, "liver pair A"),
    PhantomLesion((-75.0, -2.0, -35.0), 7.0, 15.0, "liver pair B"),
    PhantomLesion((95.0, 0.0, 25.0), 7.0, 40.0, "wall nodule"),
    PhantomLesion((40.0, -30.0, 45.0), 6.0, 30.0, "vanishing lung nodule"),
]


@dataclass
class PhantomTimepoint:
    ct: Volume
    labels: Volume  # label = index in LESIONS + 1
    radii: list[float] = field(default_factory=list)


def anatomy(p: np.ndarray) -> np.ndarray:
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    hu = np.full(x.shape, -1000.0, np.float32)
    body = (x / 120.0) ** 2 + (y / 85.0) ** 2 < 1.0
    hu[body] = 40.0
    for sx in (-1.0, 1.0):
        lung = ((x - sx * 55.0) / 45.0) ** 2 + ((y + 5.0) / 55.0) ** 2 + ((z - 30.0) / 60.0) ** 2 < 1.0
        hu[lung & body] = -850.0
    liver = ((x + 55.0) / 50.0) ** 2 + ((y - 0.0) / 50.0) ** 2 + ((z + 40.0) / 35.0) ** 2 < 1.0
    hu[liver & body] = 65.0
    spine = (x / 14.0) ** 2 + ((y - 60.0) / 14.0) ** 2 < 1.0
    hu[spine] = 350.0
    return hu


def grid(shape_kji=(40, 90, 124), spacing=(2.0, 2.0, 3.0), origin=(-123.0, -89.0, -70.0)) -> Volume:
    return Volume(np.zeros(shape_kji, np.int16), np.array(origin), np.array(spacing))


def render(
    g: Volume, transform: SpatialTransform | None, radii: list[float], rng: np.random.Generator, noise_hu: float = 12.0
) -> PhantomTimepoint:
    """CT + ground-truth labels on grid ``g``; ``transform`` maps ``g``'s points to baseline anatomy."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in g.shape), indexing="ij")
    p = g.index_to_patient(np.stack([i, j, k], -1).astype(np.float64))
    pb = p if transform is None else transform.followup_to_baseline(p.reshape(-1, 3)).reshape(p.shape)
    hu = anatomy(pb)
    labels = np.zeros(g.shape, np.uint8)
    for n, (les, r) in enumerate(zip(LESIONS, radii, strict=True), start=1):
        if r <= 0:
            continue
        inside = np.linalg.norm(pb - np.array(les.centre_mm), axis=-1) <= r
        hu[inside] = les.hu
        labels[inside] = n
    hu = hu + rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
    ct = Volume(np.rint(hu).astype(np.int16), g.origin, g.spacing, g.direction)
    return PhantomTimepoint(ct, Volume(labels, g.origin, g.spacing, g.direction), list(radii))


def series(seed: int = 0, shifts_mm=((0, 0, 0), (2, -1, 1), (-1, 2, -1)), radii_per_tp=None) -> list[PhantomTimepoint]:
    """Baseline + follow-ups, each rigidly shifted by ``shifts_mm`` (follow-up → baseline translation)."""
    rng = np.random.default_rng(seed)
    if radii_per_tp is None:
        base = [les.radius_mm for les in LESIONS]
        radii_per_tp = [
            base,
            [r * f for r, f in zip(base, (1.3, 1.0, 1.0, 1.1, 0.8, 0.75), strict=True)],
            [r * f for r, f in zip(base, (1.6, 0.8, 1.0, 1.2, 0.7, 0.0), strict=True)],
        ]
    g = grid()
    out = []
    for shift, radii in zip(shifts_mm, radii_per_tp, strict=False):  # as many timepoints as shifts
        tr = None if not any(shift) else SpatialTransform(translation=np.array(shift, float))
        out.append(render(g, tr, radii, rng))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / s if s else 1.0


def mask_prompts(tp: PhantomTimepoint) -> list[Prompt]:
    out = []
    for n in range(1, len(LESIONS) + 1):
        m = tp.labels.array == n
        if m.any():
            out.append(
                Prompt(
                    LesionIdentity(f"2.25.{1000 + n}", f"L{n}", n),
                    PromptKind.MASK,
                    mask=tp.labels.with_array(m.astype(np.uint8)),
                    source="test",
                )
            )
    return out


def phantom_volumes(tps: list[PhantomTimepoint]) -> list[Timepoint]:
    return [Timepoint(f"1.2.826.0.1.{i}", tp.ct, study_date=f"2024010{i + 1}") for i, tp in enumerate(tps)]
