"""Engine "unigradicon": the uniGradICON foundation network (Tian et al. 2024) from a LOCAL weights file.

Needs the ``unigradicon`` and ``icon_registration`` packages and ``engines.unigradicon_weights`` pointing at the
official ``Step_2_final.trch`` (a ``torch.save``'d state dict of ``net.regis_net``). Nothing is ever downloaded:
the path is checked before the package is asked to build the network (its own code would fetch missing weights).

Install note: ``icon_registration`` declares ``torchvision`` as a requirement, which would replace the pinned CPU
torch, so the Makefile and Dockerfile install both packages with ``--no-deps`` and their real imports (itk, tqdm,
matplotlib, pyyaml) come from the ``models`` extra. Where they are missing the engine raises
:class:`EngineUnavailable` saying so.

Geometry: our robust affine pre-aligns the baseline on the working grid; both images are resampled to the
network's 175³ input, windowed to [-1000, 1000] HU → [0, 1]; the network's map (normalised [0, 1] coordinates of
the moving image, tensor-axis order) becomes a working-grid displacement and goes through the shared result path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.base import EngineUnavailable
from lesiontrack.models.registration.convex import compose_fixed_point_inverse, resolve_device
from lesiontrack.models.registration.field import DisplacementFieldRegistration
from lesiontrack.models.registration.stages import build_result, prepare

INPUT_SHAPE = [1, 1, 175, 175, 175]


def _import_packages() -> tuple[Any, Any]:
    try:
        # optional: installed apart with --no-deps (pyproject); torch 6 s at import
        import icon_registration
        import unigradicon  # lazy, as above
    except ImportError as exc:
        raise EngineUnavailable(
            "registration engine 'unigradicon' needs the 'unigradicon' and 'icon_registration' packages "
            f"({exc.name} is not installed). Install them with --no-deps (icon_registration declares torchvision, "
            "which would replace the pinned torch build) plus itk, tqdm, matplotlib and pyyaml; or use engine 'convex'."
        ) from exc
    return icon_registration, unigradicon


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read an official uniGradICON weights file (``torch.save`` of ``regis_net.state_dict()``), tensors only."""
    path = Path(path)
    if not path.is_file():
        raise EngineUnavailable(
            f"uniGradICON weights file not found: {path} (engines.unigradicon_weights); "
            "it is never downloaded — copy Step_2_final.trch there"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EngineUnavailable(f"{path}: not a readable PyTorch state dict ({exc})") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EngineUnavailable(f"{path}: expected a state dict of tensors (uniGradICON Step_2_final.trch)")
    return state


def build_network(weights: Path) -> torch.nn.Module:
    """The uniGradICON network with the local weights loaded through the package's own ``load_state_dict``."""
    _, unigradicon = _import_packages()
    state = load_state_dict(weights)
    net = unigradicon.make_network(INPUT_SHAPE, include_last_step=True)
    net.regis_net.load_state_dict(state, strict=True)  # raises naming any missing/unexpected key
    net.eval()
    return net


class UniGradIconEngine:
    name = "unigradicon"
    version = "1.0"

    def __init__(self, weights: Path | str | None, device: Any = "auto", working_spacing_mm: float = 2.0) -> None:
        if weights is None:
            raise EngineUnavailable(
                "engine 'unigradicon' needs engines.unigradicon_weights (a local "
                "Step_2_final.trch); weights are never downloaded"
            )
        self.weights = Path(weights)
        self.device = resolve_device(device)
        self.working_spacing_mm = working_spacing_mm
        self.net = build_network(self.weights).to(self.device)

    def register(self, baseline: Volume, followup: Volume) -> DisplacementFieldRegistration:
        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        prep = prepare(baseline, followup, self.working_spacing_mm, True, timings, erode_vox=0)
        t = time.perf_counter()
        shape = prep.fixed.shape

        def net_input(a: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy((np.clip(a, -1000, 1000) + 1000) / 2000.0).float()[None, None].to(self.device)
            return F.interpolate(x, size=INPUT_SHAPE[2:], mode="trilinear", align_corners=True)

        moving, fixed = net_input(prep.moving), net_input(prep.fixed)
        with torch.no_grad():
            regis_net: Any = self.net.regis_net  # icon_registration (untyped): returns the map φ as a callable
            phi = regis_net(moving, fixed)  # phi_AB: fixed (B) coords → moving (A) coords
            ident = self.net.identity_map.to(self.device)
            disp = phi(ident) - ident  # (1, 3, 175³), normalised, tensor-axis order
            disp = F.interpolate(disp, size=shape, mode="trilinear", align_corners=True)
            scale = torch.tensor([s - 1 for s in shape], dtype=disp.dtype, device=disp.device).view(1, 3, 1, 1, 1)
            u_kji = disp * scale  # working voxels along k, j, i
            u = u_kji.flip(1)  # → (i, j, k) components
            v = compose_fixed_point_inverse(u, 20)
        timings["network"] = time.perf_counter() - t
        return build_result(prep, u[0].cpu().numpy(), v[0].cpu().numpy(), self.name, str(self.device), timings, t_all)
