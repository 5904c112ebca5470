"""Registration engines behind one interface (see ``models.registration.base``).

``models.engines.build_registration(name, settings, device)`` returns an object with
``register(baseline, followup) -> Registration``:

* ``"convex"`` (default): robust affine + MIND-SSC / coupled-convex / Adam deformable registration in PyTorch.
* ``"simpleitk"``: the same robust initialisation, SimpleITK affine refinement + fast symmetric-forces demons.
* ``"unigradicon"``: the uniGradICON network from a local weights file (``engines.unigradicon_weights``);
  never downloads anything.
* ``"none"``: identity (``models.registration.identity``).

The registry itself (names, packages, weights) is :mod:`models.engines`.
"""

from __future__ import annotations

from lesiontrack.models.registration.base import (
    EngineUnavailable,
    Registration,
    RegistrationEngine,
    RegistrationQuality,
)
from lesiontrack.models.registration.field import DisplacementFieldRegistration

ENGINES = ("convex", "simpleitk", "unigradicon")  # the deformable ones; "none" too in models.engines.REGISTRATION


__all__ = [
    "ENGINES",
    "DisplacementFieldRegistration",
    "EngineUnavailable",
    "Registration",
    "RegistrationEngine",
    "RegistrationQuality",
]
