"""Baseline engine ``warped-prompt``: returns the prompt itself rasterised on the image grid (no segmentation).

Used by the benchmark as the "warped mask only" baseline and as a safe fallback when no engine is wanted.
"""

from __future__ import annotations

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.base import SegReference
from lesiontrack.models.segmentation.prompts import Prompt
from lesiontrack.models.segmentation.rasterize import prompt_to_mask


class WarpedPromptEngine:
    name = "warped-prompt"
    version = "1.0"

    def __init__(self, point_radius_mm: float = 5.0) -> None:
        self.point_radius_mm = point_radius_mm

    def segment(self, image: Volume, prompt: Prompt, reference: SegReference | None = None) -> Volume:
        return prompt_to_mask(prompt, image, point_radius_mm=self.point_radius_mm)
