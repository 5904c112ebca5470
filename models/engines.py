"""The one engine registry: every registration and segmentation engine by name, with what it needs to run.

Both kinds have the same shape (:class:`EngineSpec`): a name, a one-line summary, the packages it imports, the
``engines.*`` setting holding its local weights (if it needs any) and a ``build`` function that imports the engine
module only when the engine is built. Nothing here is imported by the engine modules, so there is no import cycle,
and the registry is a constant: adding an engine is one entry below.

:func:`check_engines` validates ``EngineSettings`` against the registry without building anything (unknown name,
package not installed, weights not configured or missing); ``lesiontrack config check`` and ``serve`` start-up
report its problems with the key that caused each.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from lesiontrack.config.settings import EngineSettings

if TYPE_CHECKING:
    from lesiontrack.models.registration.base import RegistrationEngine
    from lesiontrack.models.segmentation.base import SegmentationEngine

EngineKind = Literal["registration", "segmentation"]
E = TypeVar("E", covariant=True)  # an EngineSpec of an engine is an EngineSpec[object]
EngineT = TypeVar("EngineT")


@dataclass(frozen=True)
class BuildRequest:
    """What every engine factory gets: the engine settings, the compute device, the run seed and free options."""

    settings: EngineSettings
    device: str = "auto"
    seed: int = 0
    weights: Path | None = None  # the engine's weights (from ``EngineSpec.weights_key`` unless given explicitly)
    options: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class EngineSpec(Generic[E]):
    """One engine: how to build it and what it needs."""

    kind: EngineKind
    name: str
    summary: str
    build: Callable[[BuildRequest], E]
    requires: tuple[str, ...] = ()  # importable top-level modules it needs
    weights_key: str | None = None  # EngineSettings field with its local weights path (never downloaded)
    weights_kind: Literal["file", "folder"] = "file"


@dataclass(frozen=True)
class EngineProblem:
    """Why a configured engine cannot run, naming the configuration key to fix."""

    key: str  # dotted settings key, e.g. ``engines.segmentation``
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class UnknownEngine(ValueError):
    """No engine of that kind has that name."""


# -- registration -------------------------------------------------------------------------------------------------
def _none(req: BuildRequest) -> RegistrationEngine:
    # lazy: only the engine the settings name loads (torch 6 s at import)
    from lesiontrack.models.registration.identity import NoRegistrationEngine

    return NoRegistrationEngine()


def _convex(req: BuildRequest) -> RegistrationEngine:
    # lazy: only the engine the settings name loads (torch 6 s at import)
    from lesiontrack.models.registration.convex import ConvexEngine, ConvexParams

    params = ConvexParams(working_spacing_mm=req.settings.working_spacing_mm, seed=req.seed, **(req.options or {}))
    return ConvexEngine(params, device=req.device)


def _simpleitk(req: BuildRequest) -> RegistrationEngine:
    # lazy: only the engine the settings name loads (torch 6 s at import)
    from lesiontrack.models.registration.sitk_engine import SimpleITKEngine

    return SimpleITKEngine(working_spacing_mm=req.settings.working_spacing_mm, **(req.options or {}))


def _unigradicon(req: BuildRequest) -> RegistrationEngine:
    # lazy: only the engine the settings name loads (torch 6 s at import)
    from lesiontrack.models.registration.unigradicon_engine import UniGradIconEngine

    return UniGradIconEngine(
        req.weights, device=req.device, working_spacing_mm=req.settings.working_spacing_mm, **(req.options or {})
    )


REGISTRATION: dict[str, EngineSpec[RegistrationEngine]] = {
    s.name: s
    for s in (
        EngineSpec("registration", "none", "identity: grids assumed aligned (tests, pre-registered data)", _none),
        EngineSpec(
            "registration",
            "convex",
            "robust affine + MIND-SSC coupled-convex / Adam deformable registration (PyTorch)",
            _convex,
            requires=("torch",),
        ),
        EngineSpec(
            "registration",
            "simpleitk",
            "robust affine + SimpleITK fast symmetric-forces demons",
            _simpleitk,
            requires=("SimpleITK", "torch"),
        ),
        EngineSpec(
            "registration",
            "unigradicon",
            "the uniGradICON network from a local weights file",
            _unigradicon,
            requires=("torch", "icon_registration", "unigradicon"),
            weights_key="unigradicon_weights",
        ),
    )
}


# -- segmentation -------------------------------------------------------------------------------------------------
def _adaptive(req: BuildRequest) -> SegmentationEngine:
    # lazy: only the engine the settings name loads (torch 6 s at import)
    from lesiontrack.models.segmentation.adaptive import AdaptiveEngine

    return AdaptiveEngine(**(req.options or {}))


def _warped(req: BuildRequest) -> SegmentationEngine:
    # lazy: only the engine the settings name loads (torch 6 s at import)
    from lesiontrack.models.segmentation.warped import WarpedPromptEngine

    return WarpedPromptEngine(**(req.options or {}))


def _lesionlocator(req: BuildRequest) -> SegmentationEngine:
    # lazy: only the engine the settings name loads (torch 6 s at import)
    from lesiontrack.models.segmentation.lesionlocator import LesionLocatorEngine

    if req.weights is None:
        raise ValueError("the lesionlocator engine needs a checkpoint folder (engines.lesionlocator_weights)")
    return LesionLocatorEngine(Path(req.weights), device=req.device, **(req.options or {}))


SEGMENTATION: dict[str, EngineSpec[SegmentationEngine]] = {
    s.name: s
    for s in (
        EngineSpec("segmentation", "adaptive", "prompt-driven region growing (built in, no weights)", _adaptive),
        EngineSpec("segmentation", "warped-prompt", "the propagated prompt mask itself (a baseline)", _warped),
        EngineSpec(
            "segmentation",
            "lesionlocator",
            "LesionLocator (nnU-Net ResEnc) from a local checkpoint folder",
            _lesionlocator,
            requires=("torch", "dynamic_network_architectures"),
            weights_key="lesionlocator_weights",
            weights_kind="folder",
        ),
    )
}


def _registry(kind: EngineKind) -> Mapping[str, EngineSpec[object]]:
    return REGISTRATION if kind == "registration" else SEGMENTATION


def engine_names(kind: EngineKind) -> list[str]:
    return sorted(_registry(kind))


def spec(kind: EngineKind, name: str) -> EngineSpec[object]:
    return _lookup(_registry(kind), kind, name)


def _lookup(registry: Mapping[str, EngineSpec[EngineT]], kind: EngineKind, name: str) -> EngineSpec[EngineT]:
    found = registry.get(name.lower())
    if found is None:
        raise UnknownEngine(f"unknown {kind} engine {name!r}; available: {', '.join(engine_names(kind))}")
    return found


def _request(
    s: EngineSpec[object],
    settings: EngineSettings | None,
    device: str,
    seed: int,
    weights: str | Path | None,
    options: Mapping[str, Any],
) -> BuildRequest:
    settings = settings or EngineSettings()
    if weights is None and s.weights_key is not None:
        weights = getattr(settings, s.weights_key)
    return BuildRequest(settings, device, seed, Path(weights) if weights is not None else None, options)


def build_registration(
    name: str | None = None,
    settings: EngineSettings | None = None,
    device: str = "auto",
    seed: int = 0,
    weights: str | Path | None = None,
    **options: Any,
) -> RegistrationEngine:
    """The registration engine ``name`` (default ``settings.registration``)."""
    s = _lookup(REGISTRATION, "registration", name or (settings or EngineSettings()).registration)
    engine: RegistrationEngine = s.build(_request(s, settings, device, seed, weights, options))
    return engine


def build_segmentation(
    name: str | None = None,
    settings: EngineSettings | None = None,
    device: str = "auto",
    seed: int = 0,
    weights: str | Path | None = None,
    **options: Any,
) -> SegmentationEngine:
    """The segmentation engine ``name`` (default ``settings.segmentation``)."""
    s = _lookup(SEGMENTATION, "segmentation", name or (settings or EngineSettings()).segmentation)
    engine: SegmentationEngine = s.build(_request(s, settings, device, seed, weights, options))
    return engine


def check_engine(kind: EngineKind, name: str, settings: EngineSettings) -> list[EngineProblem]:
    """What prevents engine ``name`` of ``kind`` from running with ``settings`` (empty: nothing known)."""
    key = f"engines.{kind}"
    try:
        s = spec(kind, name)
    except UnknownEngine as exc:
        return [EngineProblem(key, str(exc))]
    problems = [
        EngineProblem(key, f"{kind} engine {s.name!r} needs the Python package {m!r}, which is not installed")
        for m in s.requires
        if importlib.util.find_spec(m) is None
    ]
    if s.weights_key is not None:
        wkey = f"engines.{s.weights_key}"
        path = getattr(settings, s.weights_key)
        if path is None:
            problems.append(
                EngineProblem(wkey, f"{kind} engine {s.name!r} needs local weights ({s.weights_kind}); none is set")
            )
        elif not (Path(path).is_dir() if s.weights_kind == "folder" else Path(path).is_file()):
            problems.append(EngineProblem(wkey, f"weights {s.weights_kind} {path} of engine {s.name!r} does not exist"))
    return problems


def check_engines(settings: EngineSettings) -> list[EngineProblem]:
    """Problems of the configured registration and segmentation engines (empty when both can run)."""
    return check_engine("registration", settings.registration, settings) + check_engine(
        "segmentation", settings.segmentation, settings
    )
