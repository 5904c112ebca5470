"""`lesiontrack synth` end to end: phantom source and real CT (lung1) source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lesiontrack.cli import app
from lesiontrack.synthetic.phantom import make_phantom
from lesiontrack.synthetic.synthesis import load_truth
from tests.support.tools import require_shared_data


def test_synth_from_files(tmp_path: Path) -> None:
    ph = make_phantom(4, shape=(30, 56, 64), spacing=(4.5, 4.5, 4.5), n_lesions=3)
    ph.ct.write(str(tmp_path / "ct.nii.gz"))
    ph.lesions.write(str(tmp_path / "lab.nii.gz"))
    res = CliRunner().invoke(
        app,
        [
            "synth",
            "--out",
            str(tmp_path / "out"),
            "--patients",
            "2",
            "--timepoints",
            "2",
            "--seed",
            "5",
            "--source",
            str(tmp_path / "ct.nii.gz"),
            "--labels",
            str(tmp_path / "lab.nii.gz"),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert [s["patient_id"] for s in summary] == ["SYNTH-0005", "SYNTH-0006"]
    truth = load_truth(Path(summary[0]["dir"]))
    assert len(truth["timepoints"]) == 2
    assert len(list((Path(summary[0]["dir"]) / "tp1").glob("*.dcm"))) == truth["timepoints"][1]["grid"]["size_ijk"][2]


def test_synth_rejects_half_source(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--source", str(tmp_path / "x.nii.gz")])
    assert res.exit_code != 0
    assert "--labels" in res.output


@pytest.mark.slow
def test_synth_from_real_lung_ct(tmp_path: Path) -> None:
    src = require_shared_data("real", "lung1")
    res = CliRunner().invoke(
        app,
        [
            "synth",
            "--out",
            str(tmp_path),
            "--timepoints",
            "2",
            "--seed",
            "1",
            "--no-dicom",
            "--source",
            str(src / "lung1_image.nrrd"),
            "--labels",
            str(src / "lung1_label.nrrd"),
        ],
    )
    assert res.exit_code == 0, res.output
    truth = load_truth(Path(json.loads(res.output)[0]["dir"]))
    tp1 = truth["timepoints"][1]
    tumour = next(d for d in tp1["lesions"] if d["label"] == 1)
    assert tumour["status"] in ("present", "vanished", "out_of_fov")
    b, f = np.array(tp1["landmarks"]["baseline_mm"]), np.array(tp1["landmarks"]["followup_mm"])
    assert len(b) > 20
    assert np.abs(tp1["transform"].baseline_to_followup(b) - f).max() < 0.1
