"""LesionLocator engine: runs a LesionLocator checkpoint folder (nnU-Net v2 layout) on a prompt, GPU or CPU.

Accepted folders (see docs/models.md):

* the released top folder ``LesionLocatorCheckpoint/`` holding ``LesionLocatorSeg/{point_optimized,bbox_optimized}``
  and optionally ``LesionLocatorTrack``; points use ``point_optimized``, boxes ``bbox_optimized``, masks (the warped
  prior lesion while tracking) the UNet of ``LesionLocatorTrack`` (its ``unet.*`` weights; registration is ours),
  else ``bbox_optimized`` with the mask's bounding box;
* a single model folder with ``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth``, used for all
  prompt kinds.

Per model: ResidualEncoderUNet (dynamic-network-architectures) built from the plans' ``architecture``; 2 input
channels (CT + dense prompt), 2 outputs. Preprocessing as nnU-Net's CTNormalization (clip to the plans' 0.5/99.5
percentiles, z-score with the plans' mean/std) on a grid with the plans' target spacing, in an ROI centred on the
prompt (tiles of the plans' patch size with Gaussian weighting when the prompt is larger). Point prompts are radius-5
voxel balls, boxes dense boxes dilated by one voxel. Softmax averaged over folds (and mirror TTA if enabled); the
foreground probability is resampled back to the CT grid and thresholded at 0.5.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import pydoc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.base import SegReference
from lesiontrack.models.segmentation.prompts import Prompt, PromptKind
from lesiontrack.models.segmentation.rasterize import prompt_to_mask

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or holds something unexpected (message names the file)."""


@dataclass
class _Model:
    folder: Path
    configuration: str
    spacing_xyz: np.ndarray  # our (i, j, k) order, mm
    patch_kji: tuple[int, int, int]  # plans order (z, y, x)
    clip: tuple[float, float]
    mean: float
    std: float
    networks: list[Any]  # one torch module per fold
    mirror_axes: tuple[int, ...]


def _resolve_device(device: str) -> str:
    # lazy: torch costs 6 s at import, only when this engine runs
    import torch

    if device in ("auto", "", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA requested but not available; LesionLocator runs on CPU")
        return "cpu"
    return device


class LesionLocatorEngine:
    name = "lesionlocator"
    version = "1.0"

    def __init__(
        self,
        folder: Path,
        device: str = "auto",
        folds: tuple[int, ...] | None = None,
        tta: bool = False,
        step_size: float = 0.5,
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"LesionLocator checkpoint folder not found: {self.folder}")
        self.device = _resolve_device(device)
        self.folds = folds
        self.tta = tta
        self.step_size = step_size
        self._models: dict[str, _Model] = {}
        self._paths = self._discover()
        # fail fast on a bad folder: load the first model now
        self._model(next(iter(self._paths)))

    # ---- checkpoint discovery & loading ------------------------------------------------------------
    def _discover(self) -> dict[str, Path]:
        f = self.folder
        if (f / "plans.json").is_file():
            return {"any": f}
        found: dict[str, Path] = {}
        seg = f / "LesionLocatorSeg" if (f / "LesionLocatorSeg").is_dir() else f
        for key, sub in (("point", "point_optimized"), ("box", "bbox_optimized")):
            if (seg / sub / "plans.json").is_file():
                found[key] = seg / sub
        if (f / "LesionLocatorTrack" / "plans.json").is_file():
            found["track"] = f / "LesionLocatorTrack"
        if not found:
            raise CheckpointError(
                f"{f}: no plans.json, LesionLocatorSeg/{{point,bbox}}_optimized/plans.json or "
                "LesionLocatorTrack/plans.json found"
            )
        return found

    def _model_for(self, kind: PromptKind) -> tuple[str, PromptKind]:
        p = self._paths
        if "any" in p:
            return "any", kind
        if kind is PromptKind.POINTS:
            return ("point" if "point" in p else "box"), (PromptKind.POINTS if "point" in p else PromptKind.BOX)
        if kind is PromptKind.BOX:
            return ("box" if "box" in p else "point"), (PromptKind.BOX if "box" in p else PromptKind.POINTS)
        if "track" in p:
            return "track", PromptKind.MASK
        return ("box" if "box" in p else "point"), (PromptKind.BOX if "box" in p else PromptKind.POINTS)

    def _model(self, key: str) -> _Model:
        if key not in self._models:
            self._models[key] = load_model_folder(
                self._paths[key], self.device, self.folds, strip_prefix="unet." if key == "track" else None
            )
        return self._models[key]

    # ---- inference ---------------------------------------------------------------------------------
    def segment(self, image: Volume, prompt: Prompt, reference: SegReference | None = None) -> Volume:
        key, enc = self._model_for(prompt.kind)
        model = self._model(key)
        dense = prompt_to_mask(prompt, image, point_radius_mm=float(np.max(image.spacing)))
        if not dense.array.any():
            return _zeros(image)
        idx = np.argwhere(dense.array > 0)
        lo_kji, hi_kji = idx.min(0), idx.max(0)
        # ROI on the model grid: the prompt's extent plus a margin, at least one patch, centred on the prompt
        corners = np.array(
            [[i, j, k] for i in (lo_kji[2], hi_kji[2]) for j in (lo_kji[1], hi_kji[1]) for k in (lo_kji[0], hi_kji[0])],
            float,
        )
        ext = np.ptp(image.index_to_patient(corners) @ image.direction, axis=0)  # along the grid axes, mm
        patch_ijk = np.array(model.patch_kji[::-1])
        n = np.maximum(patch_ijk, np.ceil(ext / model.spacing_xyz).astype(int) + 2 * 8)
        centre = image.index_to_patient((lo_kji[::-1] + hi_kji[::-1]) / 2.0)
        origin = centre - image.direction @ (model.spacing_xyz * (n - 1) / 2.0)
        roi = Volume(np.zeros((n[2], n[1], n[0]), np.uint8), origin, model.spacing_xyz, image.direction)
        ct = image.resample_to(roi, default=-1024.0).array.astype(np.float32)
        ct = (np.clip(ct, *model.clip) - model.mean) / max(model.std, 1e-8)
        chan = _encode_prompt(prompt, enc, roi, dense)
        prob = self._predict(model, ct, chan)
        prob_vol = Volume(prob.astype(np.float32), roi.origin, roi.spacing, roi.direction)
        back = prob_vol.resample_to(image, default=0.0).array
        return Volume((back > 0.5).astype(np.uint8), image.origin.copy(), image.spacing.copy(), image.direction.copy())

    def _predict(self, model: _Model, ct: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        # lazy: torch costs 6 s at import, only when this engine runs
        import torch

        patch = np.array(model.patch_kji)
        shape = np.array(ct.shape)
        starts = [_starts(int(s), int(p), self.step_size) for s, p in zip(shape, patch, strict=True)]
        gauss = _gaussian(tuple(int(p) for p in patch))
        acc = np.zeros(ct.shape, np.float32)
        wsum = np.zeros(ct.shape, np.float32)
        x_full = np.stack([ct, prompt.astype(np.float32)])
        mirrors: list[tuple[int, ...]] = [()]
        if self.tta:
            ax = [a + 2 for a in model.mirror_axes]
            mirrors = [c for r in range(len(ax) + 1) for c in itertools.combinations(ax, r)]
        autocast = torch.autocast("cuda", enabled=True) if self.device.startswith("cuda") else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for z in starts[0]:
                for y in starts[1]:
                    for x in starts[2]:
                        sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                        if not prompt[sl].any():
                            continue  # LesionLocator only predicts tiles overlapping the prompt
                        xt = torch.from_numpy(np.ascontiguousarray(x_full[(slice(None), *sl)]))[None].to(self.device)
                        p = torch.zeros((1, 2, *tuple(int(v) for v in patch)), device=self.device)
                        for net in model.networks:
                            for m in mirrors:
                                inp = torch.flip(xt, m) if m else xt
                                out = net(inp)
                                if isinstance(out, (list, tuple)):
                                    out = out[0]
                                out = torch.softmax(out.float(), 1)
                                p += torch.flip(out, m) if m else out
                        p /= len(model.networks) * len(mirrors)
                        acc[sl] += p[0, 1].cpu().numpy() * gauss
                        wsum[sl] += gauss
        return np.where(wsum > 0, acc / np.maximum(wsum, 1e-8), 0.0)


# ---- loading ---------------------------------------------------------------------------------------------
def load_model_folder(
    folder: Path, device: str = "cpu", folds: tuple[int, ...] | None = None, strip_prefix: str | None = None
) -> _Model:
    """Build the network of ``folder`` (plans.json, dataset.json, fold_N/checkpoint_final.pth) with weights loaded."""
    # lazy: torch costs 6 s at import, only when this engine runs
    import torch

    plans_path, ds_path = folder / "plans.json", folder / "dataset.json"
    for p in (plans_path, ds_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
    plans = _read_json(plans_path)
    dataset = _read_json(ds_path)
    fold_dirs = sorted(d for d in folder.glob("fold_*") if (d / "checkpoint_final.pth").is_file())
    if folds is not None:
        fold_dirs = [d for d in fold_dirs if d.name.split("_", 1)[1] in {str(f) for f in folds}]
    if not fold_dirs:
        raise CheckpointError(f"{folder}: no fold_N/checkpoint_final.pth" + (f" for folds {folds}" if folds else ""))
    nets, cfg_name, mirror = [], None, (0, 1, 2)
    for d in fold_dirs:
        ck_path = d / "checkpoint_final.pth"
        try:
            ck = torch.load(ck_path, map_location="cpu", weights_only=False)  # nnU-Net pickles init_args
        except Exception as exc:
            raise CheckpointError(f"{ck_path}: cannot be read as a torch checkpoint ({exc})") from exc
        if not isinstance(ck, dict) or "network_weights" not in ck:
            raise CheckpointError(f"{ck_path}: no 'network_weights' entry")
        name = (ck.get("init_args") or {}).get("configuration") or "3d_fullres"
        cfg_name = cfg_name or name
        mirror = tuple(ck.get("inference_allowed_mirroring_axes") or mirror)
        cfg = _configuration(plans, name, plans_path)
        n_classes = len(dataset.get("labels", {"background": 0, "lesion": 1})) or 2
        net = _build_network(cfg["architecture"], 2, n_classes, plans_path)
        sd = ck["network_weights"]
        if strip_prefix:
            sd = {k[len(strip_prefix) :]: v for k, v in sd.items() if k.startswith(strip_prefix)}
        sd = {k[len("_orig_mod.") :] if k.startswith("_orig_mod.") else k: v for k, v in sd.items()}
        missing, unexpected = net.load_state_dict(sd, strict=True)
        if missing:
            raise CheckpointError(
                f"{ck_path}: weights do not match the plans' network "
                f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected)"
            )
        nets.append(net.to(device).eval())
    if cfg_name is None:
        raise CheckpointError(f"{folder}: no fold checkpoint loaded")
    cfg = _configuration(plans, cfg_name, plans_path)
    props = (plans.get("foreground_intensity_properties_per_channel") or {}).get("0")
    if not props:
        raise CheckpointError(f"{plans_path}: no foreground_intensity_properties_per_channel['0'] (CT normalisation)")
    spacing_zyx = np.asarray(cfg["spacing"], float)
    return _Model(
        folder,
        cfg_name,
        spacing_zyx[::-1].copy(),
        (int(cfg["patch_size"][0]), int(cfg["patch_size"][1]), int(cfg["patch_size"][2])),
        (float(props["percentile_00_5"]), float(props["percentile_99_5"])),
        float(props["mean"]),
        float(props["std"]),
        nets,
        mirror,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc


def _configuration(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    confs = plans.get("configurations", {})
    if name not in confs:
        raise CheckpointError(f"{path}: requested configuration {name!r} not found (have {sorted(confs)})")
    cfg = dict(confs[name])
    seen = {name}
    while "inherits_from" in cfg:
        parent = cfg.pop("inherits_from")
        if parent in seen or parent not in confs:
            raise CheckpointError(f"{path}: configuration {name!r} inherits from unknown {parent!r}")
        seen.add(parent)
        cfg = {**confs[parent], **cfg}
    for key in ("spacing", "patch_size", "architecture"):
        if key not in cfg:
            raise CheckpointError(f"{path}: configuration {name!r} lacks {key!r}")
    return cfg


def _build_network(arch: dict[str, Any], in_channels: int, n_classes: int, path: Path) -> Any:
    cls = pydoc.locate(arch.get("network_class_name", ""))
    if cls is None:
        raise CheckpointError(f"{path}: network class {arch.get('network_class_name')!r} not importable")
    kwargs = dict(arch.get("arch_kwargs", {}))
    for key in arch.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise CheckpointError(f"{path}: {key} {kwargs[key]!r} not importable")
            kwargs[key] = located
    if not callable(cls):
        raise CheckpointError(f"{path}: network_class_name {arch.get('network_class_name')!r} is not a class")
    return cls(input_channels=in_channels, num_classes=n_classes, deep_supervision=False, **kwargs)


# ---- prompt encoding & helpers ---------------------------------------------------------------------------
def _encode_prompt(prompt: Prompt, enc: PromptKind, roi: Volume, dense_on_image: Volume) -> np.ndarray:
    from skimage.morphology import ball  # lazy: skimage.morphology costs ~0.6 s at import, only for this engine

    out = np.zeros(roi.shape, np.uint8)
    if enc is PromptKind.MASK:
        return (dense_on_image.resample_to(roi, label=True).array > 0).astype(np.uint8)
    if enc is PromptKind.BOX:
        if prompt.kind is PromptKind.BOX:
            m = prompt_to_mask(prompt, roi).array > 0
        else:
            m = dense_on_image.resample_to(roi, label=True).array > 0
        if m.any():
            idx = np.argwhere(m)
            lo, hi = np.maximum(idx.min(0) - 1, 0), idx.max(0) + 2  # dilated by one voxel per side
            out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
        return out
    # points → radius-5 voxel balls on the model grid
    pts = prompt.points_mm if prompt.kind is PromptKind.POINTS else None
    if pts is None:  # a box/mask routed to a point model: its centre
        pts = np.asarray([prompt.centre_mm()])
    b = ball(5).astype(bool)
    for p in pts:
        c = np.rint(roi.patient_to_index(p)[::-1]).astype(int)
        lo = c - 5
        sl_out, sl_b = [], []
        for d in range(3):
            a0, a1 = max(lo[d], 0), min(lo[d] + 11, roi.shape[d])
            if a1 <= a0:
                break
            sl_out.append(slice(a0, a1))
            sl_b.append(slice(a0 - lo[d], a1 - lo[d]))
        else:
            out[tuple(sl_out)] |= b[tuple(sl_b)]
    return out


def _starts(size: int, patch: int, step: float) -> list[int]:
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    return [round(v) for v in np.linspace(0, size - patch, n)]


def _gaussian(patch: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    g = np.zeros(patch, np.float32)
    g[tuple(p // 2 for p in patch)] = 1
    g = ndi.gaussian_filter(g, [p * sigma_scale for p in patch], mode="constant")
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return g.astype(np.float32)


def _zeros(grid: Volume) -> Volume:
    return Volume(np.zeros(grid.shape, np.uint8), grid.origin.copy(), grid.spacing.copy(), grid.direction.copy())
