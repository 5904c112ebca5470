"""Registration engines behind one interface (see ``models.registration.base``).

``get_engine(name, settings, device)`` returns an object with ``register(baseline, followup) -> Registration``:

* ``"convex"`` (default): robust affine + MIND-SSC / coupled-convex / Adam deformable registration in PyTorch.
* ``"simpleitk"``: the same robust initialisation, SimpleITK affine refinement + fast symmetric-forces demons.
* ``"unigradicon"``: the uniGradICON network from a local weights file (``engines.unigradicon_weights``);
  never downloads anything.
"""

from __future__ import annotations

from typing import Any

from config.settings import EngineSettings
from models.registration.base import EngineUnavailable, Registration, RegistrationEngine, RegistrationQuality
from models.registration.field import DisplacementFieldRegistration

ENGINES = ("convex", "simpleitk", "unigradicon")


def get_engine(
    name: str | None = None, settings: EngineSettings | None = None, device: Any = "auto", seed: int = 0, **params: Any
) -> RegistrationEngine:
    """Build a registration engine by name (``None`` → ``settings.registration``)."""
    settings = settings or EngineSettings()
    name = (name or settings.registration).lower()
    if name == "convex":
        from models.registration.convex import ConvexEngine, ConvexParams

        return ConvexEngine(
            ConvexParams(working_spacing_mm=settings.working_spacing_mm, seed=seed, **params), device=device
        )
    if name == "simpleitk":
        from models.registration.sitk_engine import SimpleITKEngine

        return SimpleITKEngine(working_spacing_mm=settings.working_spacing_mm, **params)
    if name == "unigradicon":
        from models.registration.unigradicon_engine import UniGradIconEngine

        return UniGradIconEngine(
            settings.unigradicon_weights, device=device, working_spacing_mm=settings.working_spacing_mm, **params
        )
    raise ValueError(f"unknown registration engine {name!r} (known: {', '.join(ENGINES)})")


__all__ = [
    "ENGINES",
    "DisplacementFieldRegistration",
    "EngineUnavailable",
    "Registration",
    "RegistrationEngine",
    "RegistrationQuality",
    "get_engine",
]
