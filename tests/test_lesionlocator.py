"""LesionLocator engine: a generated tiny checkpoint in the released folder layout runs end to end on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.segmentation.lesionlocator import CheckpointError, LesionLocatorEngine
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.science.lesions import LesionStatus, Timepoint
from lesiontrack.pipeline.science.tracking import NoRegistrationEngine, track_lesions
from tests.support.phantom import LESIONS, series

ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "arch_kwargs": {
        "n_stages": 3,
        "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_blocks_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def write_tiny_model(folder: Path, configuration: str, folds=(0, 1), prefix: str = "", seed: int = 0) -> None:
    """plans.json + dataset.json + fold_N/checkpoint_final.pth exactly as nnU-Net v2 / LesionLocator lay them out."""
    from lesiontrack.models.segmentation.lesionlocator import _build_network

    folder.mkdir(parents=True, exist_ok=True)
    plans = {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": "nnUNetResEncUNetLPlans",
        "configurations": {
            "3d_fullres": {
                "data_identifier": "x",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [16, 32, 32],
                "spacing": [3.0, 2.0, 2.0],
                "normalization_schemes": ["CTNormalization"],
                "architecture": ARCH,
            },
            "3d_fullres_bs3": {"inherits_from": "3d_fullres", "batch_size": 3},
        },
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": -63.00682, "std": 282.36023, "percentile_00_5": -918.0, "percentile_99_5": 723.0}
        },
    }
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"})
    )
    for f in folds:
        torch.manual_seed(seed + f)
        net = _build_network(ARCH, 2, 2, folder / "plans.json")
        sd = {prefix + k: v for k, v in net.state_dict().items()}
        if prefix:
            sd["reg_net.dummy"] = torch.zeros(1)
            sd["unet_patch_size"] = torch.tensor([16, 32, 32])
        (folder / f"fold_{f}").mkdir(exist_ok=True)
        torch.save(
            {
                "network_weights": sd,
                "trainer_name": "LesionLocatorTrainerSegment",
                "init_args": {"configuration": configuration},
                "inference_allowed_mirroring_axes": (0, 1, 2),
            },
            folder / f"fold_{f}" / "checkpoint_final.pth",
        )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("ll") / "LesionLocatorCheckpoint"
    write_tiny_model(top / "LesionLocatorSeg" / "point_optimized", "3d_fullres_bs3")
    write_tiny_model(top / "LesionLocatorSeg" / "bbox_optimized", "3d_fullres_bs3", seed=10)
    write_tiny_model(top / "LesionLocatorTrack", "3d_fullres", prefix="unet.", seed=20)
    return top


def test_loader_reads_released_layout_and_segments_on_cpu(checkpoint: Path) -> None:
    eng = build_segmentation("lesionlocator", weights=checkpoint, device="cpu")
    assert isinstance(eng, LesionLocatorEngine)
    assert eng.device == "cpu"
    m = eng._model("point")
    assert m.configuration == "3d_fullres_bs3"
    assert m.patch_kji == (16, 32, 32)
    assert len(m.networks) == 2
    np.testing.assert_allclose(m.spacing_xyz, [2.0, 2.0, 3.0])
    ct = series(seed=3)[0].ct
    lung = LESIONS[0]
    ident = LesionIdentity("2.25.1", "L1", 1)
    for prompt in (
        Prompt(ident, PromptKind.POINTS, points_mm=np.array([lung.centre_mm])),
        Prompt(ident, PromptKind.BOX, box_mm=(np.array(lung.centre_mm) - 9, np.array(lung.centre_mm) + 9)),
    ):
        out = eng.segment(ct, prompt)
        assert out.same_grid(ct)
        assert out.array.dtype == np.uint8
        assert set(np.unique(out.array)) <= {0, 1}
    assert "track" not in eng._models  # lazy: the track UNet is loaded only for mask prompts
    tta = LesionLocatorEngine(checkpoint, device="cpu", folds=(0,), tta=True)  # mirror TTA: 8 passes per tile
    out = tta.segment(ct, Prompt(ident, PromptKind.POINTS, points_mm=np.array([lung.centre_mm])))
    assert out.same_grid(ct)
    assert len(tta._model("point").networks) == 1


def test_tracking_loop_runs_with_lesionlocator_track_unet(checkpoint: Path) -> None:
    eng = build_segmentation("lesionlocator", weights=checkpoint, device="cpu", folds=(0,))
    ph = series(seed=4)[:2]
    tps = [Timepoint(f"1.2.3.{i}", p.ct) for i, p in enumerate(ph)]
    m = ph[0].labels.array == 1
    prompts = [
        Prompt(LesionIdentity("2.25.9", "L1", 1), PromptKind.MASK, mask=ph[0].labels.with_array(m.astype(np.uint8)))
    ]
    track_lesions(tps, prompts, source_index=0, registration=NoRegistrationEngine(), segmentation=eng)
    les = tps[1].lesions[0]
    assert les.engine == "lesionlocator"
    assert les.status in (LesionStatus.PRESENT, LesionStatus.VANISHED)
    assert isinstance(eng, LesionLocatorEngine)
    assert len(eng._models["track"].networks) == 1


def test_single_model_folder_and_bad_folders(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "one", "3d_fullres", folds=(0,))
    eng = LesionLocatorEngine(tmp_path / "one", device="cpu")
    assert eng._model_for(PromptKind.MASK)[0] == "any"
    with pytest.raises(CheckpointError, match=r"no plans\.json"):
        LesionLocatorEngine(tmp_path, device="cpu")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plans.json").write_text("{}")
    (tmp_path / "bad" / "dataset.json").write_text("{}")
    with pytest.raises(CheckpointError, match="fold_N"):
        LesionLocatorEngine(tmp_path / "bad", device="cpu")
    write_tiny_model(tmp_path / "cfg", "3d_lowres", folds=(0,))
    with pytest.raises(CheckpointError, match="3d_lowres"):
        LesionLocatorEngine(tmp_path / "cfg", device="cpu")
    with pytest.raises(ValueError, match="needs a checkpoint folder"):
        build_segmentation("lesionlocator")
