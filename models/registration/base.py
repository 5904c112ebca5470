"""The registration interface every engine implements.

``engine.register(baseline, followup) -> Registration``. All geometry is patient LPS mm (see
``models.imaging.volume``), whatever the two grids' spacing, direction, FOV and slice count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from lesiontrack.models.imaging.volume import Volume


class EngineUnavailable(RuntimeError):
    """A registration engine cannot run here (missing package or weights file); the message says what."""


@dataclass
class RegistrationQuality:
    """How well it went: similarity before/after, folding, per-stage runtime, device."""

    similarity_metric: str = ""
    similarity_before: float | None = None
    similarity_after: float | None = None
    folding_fraction: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Registration(Protocol):
    """Result of registering a baseline onto a follow-up."""

    baseline_grid: Volume  # geometry only is guaranteed (array may be a placeholder)
    followup_grid: Volume
    quality: RegistrationQuality
    engine: str

    def warp_image(self, baseline_image: Volume, default: float = -1024.0) -> Volume:
        """Pull a baseline-space image onto the follow-up grid (linear)."""
        ...

    def warp_labels(self, baseline_labels: Volume) -> Volume:
        """Pull a baseline-space label map onto the follow-up grid without mixing labels."""
        ...

    def map_points_to_followup(self, points_mm: np.ndarray) -> np.ndarray:
        """Baseline LPS mm (N, 3) → follow-up LPS mm (N, 3)."""
        ...

    def map_points_to_baseline(self, points_mm: np.ndarray) -> np.ndarray:
        """Follow-up LPS mm (N, 3) → baseline LPS mm (N, 3)."""
        ...


class RegistrationEngine(Protocol):
    name: str
    version: str

    def register(self, baseline: Volume, followup: Volume) -> Registration: ...
