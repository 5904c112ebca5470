"""The segmentation-engine interface and the engine registry.

``engine.segment(image, prompt, reference) -> Volume`` returns a uint8 0/1 mask on ``image``'s grid. ``reference``
optionally carries what is known about the lesion at an earlier (or later) timepoint: the prior CT and the prior
lesion mask on it. Engines are looked up by name with :func:`get_engine` in the one registry, :mod:`models.engines`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import Prompt


@dataclass
class SegReference:
    """The lesion at the timepoint the prompt came from: that CT and the lesion mask on it (same grid)."""

    image: Volume
    mask: Volume
    meta: dict[str, Any] = field(default_factory=dict)

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


def available_engines() -> list[str]:
    """Names of the segmentation engines in the registry (:mod:`models.engines`)."""
    from lesiontrack.models.engines import engine_names

    return engine_names("segmentation")


def get_engine(
    name: str = "adaptive", *, weights: str | Path | None = None, device: str = "auto", **options: Any
) -> SegmentationEngine:
    """Build an engine by name: ``adaptive`` (default, no weights), ``lesionlocator`` (needs ``weights``)."""
    from lesiontrack.models.engines import build_segmentation

    return build_segmentation(name, device=device, weights=weights, **options)
