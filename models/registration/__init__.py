"""Registration engines behind one interface (see ``models.registration.base``).

``get_engine(name, settings, device)`` returns an object with ``register(baseline, followup) -> Registration``:

* ``"convex"`` (default): robust affine + MIND-SSC / coupled-convex / Adam deformable registration in PyTorch.
* ``"simpleitk"``: the same robust initialisation, SimpleITK affine refinement + fast symmetric-forces demons.
* ``"unigradicon"``: the uniGradICON network from a local weights file (``engines.unigradicon_weights``);
  never downloads anything.
* ``"none"``: identity (``models.registration.identity``).

The registry itself (names, packages, weights) is :mod:`models.engines`.
"""

from __future__ import annotations

from typing import Any

from lesiontrack.config.settings import EngineSettings
from lesiontrack.models.registration.base import (
    EngineUnavailable,
    Registration,
    RegistrationEngine,
    RegistrationQuality,
)
from lesiontrack.models.registration.field import DisplacementFieldRegistration

ENGINES = ("convex", "simpleitk", "unigradicon")  # the deformable ones; "none" too in models.engines.REGISTRATION


def get_engine(
    name: str | None = None, settings: EngineSettings | None = None, device: Any = "auto", seed: int = 0, **params: Any
) -> RegistrationEngine:
    """Build a registration engine by name (``None`` → ``settings.registration``) from :mod:`models.engines`."""
    from lesiontrack.models.engines import build_registration

    return build_registration(name, settings, device, seed, **params)


__all__ = [
    "ENGINES",
    "DisplacementFieldRegistration",
    "EngineUnavailable",
    "Registration",
    "RegistrationEngine",
    "RegistrationQuality",
    "get_engine",
]
