"""The "none" registration engine: masks are carried over in patient coordinates, the grids assumed aligned."""

from __future__ import annotations

import numpy as np

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.base import Registration, RegistrationQuality


class IdentityRegistration:
    """No registration: masks are carried over in patient coordinates (the "no registration" baseline)."""

    engine = "none"

    def __init__(self, baseline: Volume, followup: Volume) -> None:
        self.baseline_grid = baseline
        self.followup_grid = followup
        self.quality = RegistrationQuality(similarity_metric="none")

    def warp_image(self, baseline_image: Volume, default: float = -1024.0) -> Volume:
        return baseline_image.resample_to(self.followup_grid, default=default)

    def warp_labels(self, baseline_labels: Volume) -> Volume:
        if baseline_labels.same_grid(self.followup_grid):
            return baseline_labels.with_array(baseline_labels.array.copy())
        return baseline_labels.resample_to(self.followup_grid, label=True)

    def map_points_to_followup(self, points_mm: np.ndarray) -> np.ndarray:
        return np.asarray(points_mm, float)

    def map_points_to_baseline(self, points_mm: np.ndarray) -> np.ndarray:
        return np.asarray(points_mm, float)


class NoRegistrationEngine:
    name = "none"
    version = "1.0"

    def register(self, baseline: Volume, followup: Volume) -> Registration:
        return IdentityRegistration(baseline, followup)
