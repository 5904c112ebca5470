"""The segmentation-engine interface and the engine registry.

``engine.segment(image, prompt, reference) -> Volume`` returns a uint8 0/1 mask on ``image``'s grid. ``reference``
optionally carries what is known about the lesion at an earlier (or later) timepoint: the prior CT and the prior
lesion mask on it. Engines are looked up by name with :func:`get_engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from models.imaging.volume import Volume
from models.segmentation.prompts import Prompt


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


_FACTORIES: dict[str, Callable[..., SegmentationEngine]] = {}


def register_engine(name: str, factory: Callable[..., SegmentationEngine]) -> None:
    _FACTORIES[name] = factory


def available_engines() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def get_engine(
    name: str = "adaptive", *, weights: str | Path | None = None, device: str = "auto", **options: Any
) -> SegmentationEngine:
    """Build an engine by name: ``adaptive`` (default, no weights), ``lesionlocator`` (needs ``weights``)."""
    _load_builtin()
    if name not in _FACTORIES:
        raise ValueError(f"unknown segmentation engine {name!r}; available: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](weights=weights, device=device, **options)


def _load_builtin() -> None:
    if _FACTORIES:
        return

    def _adaptive(weights: Any = None, device: str = "auto", **options: Any) -> SegmentationEngine:
        from models.segmentation.adaptive import AdaptiveEngine

        return AdaptiveEngine(**options)

    def _lesionlocator(weights: Any = None, device: str = "auto", **options: Any) -> SegmentationEngine:
        from models.segmentation.lesionlocator import LesionLocatorEngine

        if weights is None:
            raise ValueError("the lesionlocator engine needs a checkpoint folder (engines.lesionlocator_weights)")
        return LesionLocatorEngine(Path(weights), device=device, **options)

    def _warped(weights: Any = None, device: str = "auto", **options: Any) -> SegmentationEngine:
        from models.segmentation.warped import WarpedPromptEngine

        return WarpedPromptEngine(**options)

    register_engine("adaptive", _adaptive)
    register_engine("warped-prompt", _warped)
    register_engine("lesionlocator", _lesionlocator)
