"""Torch building blocks for the convex engine: MIND-SSC descriptors, box smoothing and trilinear sampling.

MIND-SSC (Heinrich et al., MICCAI 2013): for the 12 pairs of 6-neighbourhood voxels at distance ``dilation``
whose offsets are orthogonal, the box-filtered squared difference of the two shifted images, normalised by
its mean over the channels and passed through ``exp(-x)``. Contrast- and noise-robust, cheap (shifts + box filter).

Tensors are ``(B, C, K, J, I)`` (slice, row, column); sampling coordinates are voxel indices in ``(i, j, k)``
order, matching ``Volume``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

_AXES = [(0, 0, 1), (0, 1, 0), (1, 0, 0)]  # unit offsets along k, j, i in (dk, dj, di)


def _ssc_pairs() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    six = [(s * dk, s * dj, s * di) for dk, dj, di in _AXES for s in (1, -1)]
    pairs: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = []
    for a, b in itertools.combinations(six, 2):
        if sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) == 2:  # orthogonal neighbours
            pairs.append((a, b))
    if len(pairs) != 12:
        raise RuntimeError(f"MIND-SSC needs 12 neighbour pairs, built {len(pairs)}")
    return pairs


_PAIRS = _ssc_pairs()


def _shift(padded: torch.Tensor, off: tuple[int, int, int], pad: int, shape: tuple[int, int, int]) -> torch.Tensor:
    k, j, i = shape
    dk, dj, di = off
    return padded[:, :, pad + dk : pad + dk + k, pad + dj : pad + dj + j, pad + di : pad + di + i]


def box3(x: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Separable box mean with replicate borders (deterministic on CUDA when not differentiated)."""
    if radius <= 0:
        return x
    size = 2 * radius + 1
    x = F.pad(x, (radius,) * 6, mode="replicate")
    x = F.avg_pool3d(x, (size, 1, 1), stride=1)
    x = F.avg_pool3d(x, (1, size, 1), stride=1)
    return F.avg_pool3d(x, (1, 1, size), stride=1)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """12-channel MIND-SSC descriptor of a ``(1, 1, K, J, I)`` image, float32 in [0, 1]."""
    shape = (int(image.shape[2]), int(image.shape[3]), int(image.shape[4]))
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    chans = []
    for a, b in _PAIRS:
        oa = (dilation * a[0], dilation * a[1], dilation * a[2])
        ob = (dilation * b[0], dilation * b[1], dilation * b[2])
        d = _shift(padded, oa, dilation, shape) - _shift(padded, ob, dilation, shape)
        chans.append(d * d)
    del padded
    ssd = box3(torch.cat(chans, dim=1), radius)
    del chans
    ssd = ssd - ssd.min(dim=1, keepdim=True).values
    var = ssd.mean(dim=1, keepdim=True)
    m = float(var.mean())
    var = var.clamp(min=max(m * 1e-3, 1e-6), max=max(m * 1e3, 1e-5))
    return torch.exp(-ssd / var)


def _box_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if n < 2:
        return x
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    xp = torch.cat([first, x, last], dim=dim)
    return (xp.narrow(dim, 0, n) + xp.narrow(dim, 1, n) + xp.narrow(dim, 2, n)) / 3.0


class BoxSmoother(torch.nn.Module):
    """``passes`` × 3×3×3 mean filter. On CUDA built from slices and sums only (replicate borders), so the
    backward pass has no atomics and is deterministic; on CPU the equivalent pooling kernel (in-grid mean)."""

    def __init__(self, passes: int = 3) -> None:
        super().__init__()
        self.passes = passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # pooling kernels are faster on CPU (and deterministic there)
            for _ in range(self.passes):
                x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
            return x
        for _ in range(self.passes):
            for dim in (2, 3, 4):
                x = _box_axis(x, dim)
        return x


def normalise_coords(idx_ijk: torch.Tensor, shape_kji: tuple[int, ...]) -> torch.Tensor:
    """Voxel indices ``(..., 3)`` in (i, j, k) order → grid_sample coordinates (align_corners=True)."""
    k, j, i = shape_kji
    size = torch.tensor([i, j, k], dtype=idx_ijk.dtype, device=idx_ijk.device)
    return idx_ijk * (2.0 / (size - 1).clamp(min=1)) - 1.0


def sample(volume: torch.Tensor, idx_ijk: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Trilinear sample of ``(1, C, K, J, I)`` at voxel indices ``(K', J', I', 3)`` (i, j, k order)."""
    grid = normalise_coords(idx_ijk, tuple(volume.shape[2:]))
    return F.grid_sample(volume, grid.unsqueeze(0), mode="bilinear", padding_mode=padding, align_corners=True)


def identity_ijk(shape_kji: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Voxel index grid ``(K, J, I, 3)`` holding (i, j, k)."""
    k, j, i = shape_kji
    kk, jj, ii = torch.meshgrid(
        torch.arange(k, device=device, dtype=dtype),
        torch.arange(j, device=device, dtype=dtype),
        torch.arange(i, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([ii, jj, kk], dim=-1)


class Adam:
    """Minimal Adam (Kingma & Ba) over parameter groups ``[(tensor, lr), ...]``.

    Same update as ``torch.optim.Adam`` without its first-use import cost (several seconds for torch._dynamo),
    which matters for a one-shot CLI registration.
    """

    def __init__(
        self, groups: list[tuple[torch.Tensor, float]], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.groups = groups
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p, _ in groups]
        self.v = [torch.zeros_like(p) for p, _ in groups]

    def zero_grad(self) -> None:
        for p, _ in self.groups:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1 = 1 - self.b1**self.t
        c2 = 1 - self.b2**self.t
        for (p, lr), m, v in zip(self.groups, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-lr)
