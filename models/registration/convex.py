"""The default engine "convex": robust affine + ConvexAdam-style deformable registration in PyTorch.

Pipeline (fixed = follow-up, moving = baseline; everything on an isotropic working grid in the follow-up's
orientation, ``engines.working_spacing_mm``, default 2 mm):

1. :func:`models.registration.initial.robust_affine` — FOV-masked translation search, rigid then affine.
2. MIND-SSC features of both images (12 channels), pooled 2× (4 mm).
3. Dense SSD cost volume over (2R+1)³ displacements in 2-voxel steps, aggregated on a 4×-coarse node grid
   (8 mm); voxels outside either field of view carry no cost.
4. Coupled convex optimisation (Heinrich et al. 2013; Siebert et al. 2021): alternating per-node argmin of
   ``cost + θ‖d − smooth(d)‖²`` with increasing θ — global regularisation without an iterative solver.
   Done forward and backward, then made inverse consistent by fixed-point averaging.
5. Adam instance optimisation of a 4 mm displacement grid (smoothed by three box filters per step): feature
   SSD + λ·diffusion, trilinear upsampling to the working grid.
6. The inverse field by fixed-point iteration, the Jacobian folding fraction, NCC before/after.

Written for this project from the published method; the PyPI ``convexadam`` package is only a benchmark anchor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.features import Adam, BoxSmoother, box3, identity_ijk, mind_ssc, sample
from lesiontrack.models.registration.field import DisplacementFieldRegistration
from lesiontrack.models.registration.stages import build_result, prepare

log = logging.getLogger(__name__)

Array = np.ndarray


@dataclass
class ConvexParams:
    """Tunable parameters of the convex engine (defaults are the benchmarked ones)."""

    working_spacing_mm: float = 2.0
    affine: bool = True
    mind_radius: int = 1
    mind_dilation: int = 2
    search_radius: int = 4  # displacement labels per axis: ±R steps of 2 working voxels
    coupling: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    inverse_consistent: bool = True
    ic_iterations: int = 15
    adam_iterations: int = 50
    adam_lr: float = 1.0
    lambda_diffusion: float = 1.25
    smooth_passes: int = 3
    adam_coarsening: int = 1  # Adam grid = feature grid (4 mm) / this
    inverse_iterations: int = 20
    seed: int = 0
    intensity_window: tuple[float, float] = (-1000.0, 1500.0)
    extra: dict[str, object] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """ "auto"/None → CUDA when available else CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


# --- coarse stage ---------------------------------------------------------------------------------------------
def _label_mesh(radius: int, device: torch.device) -> torch.Tensor:
    """(3, L) displacement labels in (i, j, k) order, label index = ((dk * n) + dj) * n + di."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    dk, dj, di = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([di.reshape(-1), dj.reshape(-1), dk.reshape(-1)])


def cost_volume(fix: torch.Tensor, mov: torch.Tensor, valid: torch.Tensor, radius: int) -> torch.Tensor:
    """SSD cost ``(L, K/2, J/2, I/2)`` on the 2×-pooled node grid of ``fix`` vs ``mov`` displaced by ``d`` (label
    mesh, in feature-voxel units), box-smoothed; zero (uninformative) where the node lies outside the valid region.

    Features are pooled 2× first; an odd displacement uses the moving features pooled from a one-voxel-shifted
    window, so every label is exact without interpolation (8 pooled copies instead of one per label).
    """
    _, _c, k, j, i = fix.shape
    k2, j2, i2 = k // 2, j // 2, i // 2
    n = 2 * radius + 1
    f8 = F.avg_pool3d(fix, 2)
    v8 = F.avg_pool3d(valid, 2)
    q = radius // 2 + 1
    padded = F.pad(mov, (2 * q,) * 6, mode="replicate")
    shifted = {}
    for hk in (0, 1):
        for hj in (0, 1):
            for hi in (0, 1):
                # pooled[x] = mean of mov over the 2-window starting at 2x + h (in feature voxels)
                sl = padded[:, :, hk : hk + 2 * (k2 + 2 * q), hj : hj + 2 * (j2 + 2 * q), hi : hi + 2 * (i2 + 2 * q)]
                shifted[(hk, hj, hi)] = F.avg_pool3d(sl, 2)  # node x ↔ index x + q
    out = torch.empty(n**3, k2, j2, i2, device=fix.device, dtype=torch.float32)
    r = list(range(-radius, radius + 1))
    idx = 0
    for dk in r:
        for dj in r:
            for di in r:
                hk, hj, hi = dk % 2, dj % 2, di % 2
                qk, qj, qi = (dk - hk) // 2 + q, (dj - hj) // 2 + q, (di - hi) // 2 + q
                m = shifted[(hk, hj, hi)][:, :, qk : qk + k2, qj : qj + j2, qi : qi + i2]
                out[idx] = ((f8 - m) ** 2).sum(1)[0]
                idx += 1
    out = box3(out[None], 1)[0]
    out *= (v8[0, 0] > 0.5).float()
    return out


def coupled_convex(
    cost: torch.Tensor, mesh: torch.Tensor, coupling: tuple[float, ...], chunk_nodes: int = 8192
) -> torch.Tensor:
    """Per-node argmin with increasing coupling to the smoothed field; returns (1, 3, K, J, I) in label units.

    ``θ‖d − s‖² = θ‖d‖² − 2θ d·s + const`` per node, so each round is one matrix product and one argmin over
    labels (node-major layout, labels contiguous).
    """
    lcount, k, j, i = cost.shape
    nodes = cost.reshape(lcount, -1).t().contiguous()  # (N, L)
    norm2 = (mesh**2).sum(0)  # a tiny prior towards zero breaks ties in flat regions

    def pick(theta: float, smooth: torch.Tensor | None) -> torch.Tensor:
        bias = (1e-4 + theta) * norm2 if smooth is not None else 1e-4 * norm2
        s = smooth[0].reshape(3, -1).t() if smooth is not None else None  # (N, 3)
        arg = torch.empty(nodes.shape[0], dtype=torch.long, device=cost.device)
        for n0 in range(0, nodes.shape[0], chunk_nodes):
            c = nodes[n0 : n0 + chunk_nodes] + bias
            if s is not None:
                c = c - (2.0 * theta) * (s[n0 : n0 + chunk_nodes] @ mesh)
            arg[n0 : n0 + chunk_nodes] = torch.argmin(c, dim=1)
        return box3(mesh[:, arg].view(1, 3, k, j, i), 1)

    soft = pick(0.0, None)
    for theta in coupling:
        soft = pick(theta, soft)
    return soft


def compose_fixed_point_inverse(u: torch.Tensor, iterations: int) -> torch.Tensor:
    """v with ``v(x) = -u(x + v(x))`` for a (1, 3, K, J, I) field in voxel units (i, j, k components)."""
    ident = identity_ijk(tuple(u.shape[2:]), u.device)
    v = -u
    for _ in range(iterations):
        v = -sample(u, ident + v[0].permute(1, 2, 3, 0))
    return v


def inverse_consistency(fwd: torch.Tensor, bwd: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrise a forward/backward pair so that ``fwd ∘ bwd ≈ id`` (fields in voxel units)."""
    ident = identity_ijk(tuple(fwd.shape[2:]), fwd.device)
    f, b = fwd, bwd
    for _ in range(iterations):
        f_new = 0.5 * (f - sample(b, ident + f[0].permute(1, 2, 3, 0)))
        b_new = 0.5 * (b - sample(f, ident + b[0].permute(1, 2, 3, 0)))
        f, b = f_new, b_new
    return f, b


def instance_optimise(
    fix: torch.Tensor, mov: torch.Tensor, valid: torch.Tensor, init: torch.Tensor, p: ConvexParams
) -> torch.Tensor:
    """Adam on a displacement grid ``p.adam_coarsening``× coarser than ``fix`` (voxel units of ``fix``), smoothed
    by box filters and upsampled trilinearly; loss = feature SSD over the valid region + λ·diffusion."""
    smoother = BoxSmoother(p.smooth_passes)
    c = p.adam_coarsening
    start = F.avg_pool3d(init, c) if c > 1 else init
    param = start.clone().requires_grad_(True)
    opt = Adam([(param, p.adam_lr / c)])
    ident = identity_ijk(tuple(fix.shape[2:]), fix.device)
    nvalid = valid.sum().clamp(min=1.0)
    with torch.no_grad():
        fixv = fix * valid

    def full(x: torch.Tensor) -> torch.Tensor:
        x = smoother(x)
        return F.interpolate(x, size=tuple(fix.shape[2:]), mode="trilinear", align_corners=False) if c > 1 else x

    for _ in range(p.adam_iterations):
        opt.zero_grad()
        disp = full(param)
        reg = (
            ((disp[:, :, 1:] - disp[:, :, :-1]) ** 2).mean()
            + ((disp[:, :, :, 1:] - disp[:, :, :, :-1]) ** 2).mean()
            + ((disp[..., 1:] - disp[..., :-1]) ** 2).mean()
        )
        warped = sample(mov, ident + disp[0].permute(1, 2, 3, 0))
        sim = ((warped * valid - fixv) ** 2).sum() / nvalid
        loss = sim + p.lambda_diffusion * reg
        loss.backward()
        opt.step()
    with torch.no_grad():
        return full(param).detach()


def deformable(
    fix_img: torch.Tensor, mov_img: torch.Tensor, valid: torch.Tensor, p: ConvexParams, timings: dict[str, float]
) -> torch.Tensor:
    """Forward displacement (1, 3, K/2, J/2, I/2) on the 2×-pooled feature grid, in feature-voxel units, for
    images on the working grid."""
    t = time.perf_counter()
    with torch.no_grad():
        lo, hi = p.intensity_window
        fm = mind_ssc(((fix_img.clamp(lo, hi) - lo) / (hi - lo)), p.mind_radius, p.mind_dilation)
        mm = mind_ssc(((mov_img.clamp(lo, hi) - lo) / (hi - lo)), p.mind_radius, p.mind_dilation)
        f2, m2 = F.avg_pool3d(fm, 2), F.avg_pool3d(mm, 2)
        del fm, mm
        v2 = (F.avg_pool3d(valid, 2) > 0.99).float()
    timings["features"] = time.perf_counter() - t
    t = time.perf_counter()
    mesh = _label_mesh(p.search_radius, fix_img.device)
    with torch.no_grad():
        cost = cost_volume(f2, m2, v2, p.search_radius)
        d_fwd = coupled_convex(cost, mesh, p.coupling)  # label units = 1 feature voxel (2 working)
        if p.inverse_consistent:
            del cost
            cost = cost_volume(m2, f2, v2, p.search_radius)
            d_bwd = coupled_convex(cost, mesh, p.coupling)
            # node spacing = 2 feature voxels: convert label units → node units for composition
            d_fwd, _ = inverse_consistency(d_fwd / 2.0, d_bwd / 2.0, p.ic_iterations)
            d_fwd = d_fwd * 2.0
        del cost
        init = F.interpolate(d_fwd, scale_factor=2, mode="trilinear", align_corners=False)  # feature grid
    timings["convex"] = time.perf_counter() - t
    t = time.perf_counter()
    disp = instance_optimise(f2, m2, v2, init, p) if p.adam_iterations > 0 else init
    timings["adam"] = time.perf_counter() - t
    return disp


class ConvexEngine:
    """Default engine: robust affine + MIND / coupled-convex / Adam deformable registration (PyTorch)."""

    name = "convex"
    version = "1.0"

    def __init__(self, params: ConvexParams | None = None, device: str | torch.device | None = "auto") -> None:
        self.params = params or ConvexParams()
        self.device = resolve_device(device)

    def register(self, baseline: Volume, followup: Volume) -> DisplacementFieldRegistration:
        p = self.params
        torch.manual_seed(p.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        prep = prepare(
            baseline, followup, p.working_spacing_mm, p.affine, timings, erode_vox=p.mind_dilation + p.mind_radius
        )
        dev = self.device
        fix_t = torch.from_numpy(prep.fixed).float()[None, None].to(dev)
        mov_t = torch.from_numpy(prep.moving).float()[None, None].to(dev)
        val_t = torch.from_numpy(prep.valid_core.astype(np.float32))[None, None].to(dev)
        u_half = deformable(fix_t, mov_t, val_t, p, timings)
        del fix_t, mov_t, val_t
        t = time.perf_counter()
        with torch.no_grad():
            v_half = compose_fixed_point_inverse(u_half, p.inverse_iterations)

            def up(d: torch.Tensor) -> torch.Tensor:
                return F.interpolate(d * 2.0, scale_factor=2, mode="trilinear", align_corners=False)

            u_np = up(u_half)[0].cpu().numpy()
            v_np = up(v_half)[0].cpu().numpy()
        timings["inverse"] = time.perf_counter() - t
        return build_result(prep, u_np, v_np, self.name, str(dev), timings, t_all)


def with_overrides(params: ConvexParams, **kw: Any) -> ConvexParams:
    return replace(params, **kw)
