"""The segmentation-engine interface and the engine registry.

``engine.segment(image, prompt, reference) -> Volume`` returns a uint8 0/1 mask on ``image``'s grid. ``reference``
optionally carries what is known about the lesion at an earlier (or later) timepoint: the prior CT and the prior
lesion mask on it. Engines are built by name in the one registry, :mod:`models.engines`
(:func:`~models.engines.build_segmentation`); nothing here imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import Prompt


@dataclass
class SegReference:
    """The lesion at the timepoint the prompt came from: that CT and the lesion mask on it (same grid)."""

    image: Volume
    mask: Volume
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image.same_grid(self.mask):
            raise ValueError("SegReference: image and mask must share one grid")


@runtime_checkable
class SegmentationEngine(Protocol):
    name: str
    version: str

    def segment(self, image: Volume, prompt: Prompt, reference: SegReference | None = None) -> Volume:
        """uint8 0/1 mask of the prompted lesion on ``image``'s grid (all zero when the lesion is not there)."""
        ...
