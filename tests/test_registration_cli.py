"""`lesiontrack register` end to end on NIfTI files, and the uniGradICON engine's no-download / no-package paths."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.synthetic.transforms import apply_transform, random_patient_motion
from tests.support.tools import require_shared_data


@pytest.fixture(scope="module")
def nifti_pair(tmp_path_factory):
    src = Volume.read(str(require_shared_data("real", "body_ct", "ct.nii.gz")))
    base = src.with_array(np.clip(src.array, -1024, 3071).astype(np.int16))
    tr = random_patient_motion(np.random.default_rng(5), base, rotation_deg=3, translation_mm=12, elastic_mm=4)
    fu = apply_transform(base, tr, base)
    d = tmp_path_factory.mktemp("cli")
    base.write(str(d / "baseline.nii.gz"))
    fu.write(str(d / "followup.nrrd"))
    lab = np.zeros(base.shape, np.uint8)
    c = np.array(base.shape) // 2
    lab[c[0] - 4 : c[0] + 4, c[1] - 5 : c[1] + 5, c[2] - 5 : c[2] + 5] = 3
    base.with_array(lab).write(str(d / "labels.nii.gz"))
    return d, base, fu, tr


def test_register_cli_maps_points_warps_labels_saves_field(nifti_pair, monkeypatch):
    from lesiontrack.cli import app

    d, base, fu, tr = nifti_pair
    monkeypatch.setenv("LESIONTRACK_ENGINES__WORKING_SPACING_MM", "4")
    rng = np.random.default_rng(0)
    body = np.argwhere(base.array > -200)
    pts = base.index_to_patient(body[rng.choice(len(body), 12, replace=False)][:, ::-1].astype(float))
    with (d / "in.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "z"])
        w.writerows(pts.tolist())
    res = CliRunner().invoke(
        app,
        [
            "register",
            "--baseline",
            str(d / "baseline.nii.gz"),
            "--followup",
            str(d / "followup.nrrd"),
            "--map-points",
            str(d / "in.csv"),
            "--out",
            str(d / "out.csv"),
            "--warp-labels",
            str(d / "labels.nii.gz"),
            "--out-labels",
            str(d / "warped.nii.gz"),
            "--save-field",
            str(d / "field.nii.gz"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["engine"] == "convex"
    assert summary["device"] == "cpu"
    assert summary["points"] == 12
    assert summary["similarity_after"] > summary["similarity_before"]
    with (d / "out.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    mapped = np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in rows])
    truth = tr.baseline_to_followup(pts)
    err = np.linalg.norm(mapped - truth, axis=1)  # rows in input order: every point near its own partner
    assert err.max() < 5.0, err
    warped = Volume.read(str(d / "warped.nii.gz"))
    assert warped.same_grid(fu)
    assert set(np.unique(warped.array)) == {0, 3}
    field = sitk.ReadImage(str(d / "field.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3


def test_register_cli_bad_input_is_a_clear_error(tmp_path):
    from lesiontrack.cli import app

    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    res = CliRunner().invoke(
        app, ["register", "--baseline", str(tmp_path / "junk.nii.gz"), "--followup", str(tmp_path / "missing")]
    )
    assert res.exit_code != 0
    assert "junk.nii.gz" in res.output or "missing" in res.output


def test_unigradicon_never_downloads_and_explains_missing_parts(tmp_path):
    from lesiontrack.config.settings import EngineSettings
    from lesiontrack.models.engines import build_registration
    from lesiontrack.models.registration import EngineUnavailable
    from lesiontrack.models.registration.unigradicon_engine import load_state_dict

    with pytest.raises(EngineUnavailable, match="never downloaded"):
        build_registration("unigradicon", EngineSettings())
    with pytest.raises(EngineUnavailable, match="not found"):
        load_state_dict(tmp_path / "Step_2_final.trch")
    (tmp_path / "bad.trch").write_bytes(b"garbage")
    with pytest.raises(EngineUnavailable, match="not a readable PyTorch state dict"):
        load_state_dict(tmp_path / "bad.trch")
    # a state dict in the official file format (torch.save of an OrderedDict of tensors) is read back intact
    sd = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.Conv3d(4, 3, 3)).state_dict()
    torch.save(sd, tmp_path / "Step_2_final.trch")
    back = load_state_dict(tmp_path / "Step_2_final.trch")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_unigradicon_loads_random_weights_and_registers(tmp_path):
    """Random weights in the official format (a torch.save'd ``regis_net`` state dict named Step_2_final.trch in
    a local folder) load through the configured engine and register a small pair end to end on CPU."""
    import unigradicon  # installed by the Makefile (--no-deps); a missing package fails here, never skips

    from lesiontrack.config.settings import EngineSettings
    from lesiontrack.models.engines import build_registration
    from lesiontrack.models.registration import Registration
    from lesiontrack.models.registration.unigradicon_engine import INPUT_SHAPE

    torch.manual_seed(0)
    net = unigradicon.make_network(INPUT_SHAPE, include_last_step=True)
    weights = tmp_path / "unigradicon" / "Step_2_final.trch"
    weights.parent.mkdir()
    torch.save(net.regis_net.state_dict(), weights)
    engine = build_registration(
        "unigradicon", EngineSettings(unigradicon_weights=weights, working_spacing_mm=4.0), device="cpu"
    )
    for k, v in net.regis_net.state_dict().items():
        assert torch.equal(engine.net.regis_net.state_dict()[k], v)
    k, j, i = np.indices((24, 40, 40))
    body = ((i - 20) ** 2 / 15**2 + (j - 20) ** 2 / 12**2 < 1).astype(np.int16)
    base = Volume((body * 1040 - 1000 + (k % 7) * 30 * body).astype(np.int16), (-80.0, -80.0, -48.0), (4.0, 4.0, 4.0))
    fu = base.with_array(np.roll(base.array, 1, axis=2))
    reg = engine.register(base, fu)
    assert isinstance(reg, Registration)
    assert reg.warp_image(base).shape == fu.shape
    assert np.isfinite(reg.map_points_to_followup(np.array([[0.0, 0.0, 0.0]]))).all()
    assert reg.quality.device == "cpu"
