"""The validator wrappers catch real errors (negative controls); `lesiontrack validate` exits 1 on them."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from lesiontrack.cli import app
from lesiontrack.pipeline.dicom.validate import ToolMissing, dciodvfy_path, run_dciodvfy, run_dsrdump, run_sr_validator
from tests.support.tools import require_shared_data, require_tool

SAMPLES = ("interop", "seg_sr")


def _need_dciodvfy() -> None:
    try:
        dciodvfy_path()
    except ToolMissing:
        require_tool("dciodvfy")


def test_dciodvfy_flags_a_segment_without_tracking_id(tmp_path: Path) -> None:
    _need_dciodvfy()
    good = require_shared_data(*SAMPLES, "hd_seg_image_ct_binary.dcm")
    assert run_dciodvfy(good).ok
    ds = pydicom.dcmread(good)
    del ds.SegmentSequence[0].TrackingID  # Tracking UID without Tracking ID: Type 1C violated
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    rep = run_dciodvfy(bad)
    assert not rep.ok, rep.output
    assert any("TrackingID" in e or "Tracking ID" in e for e in rep.errors), rep.output


def test_dsrdump_rejects_a_non_sr(tmp_path: Path) -> None:
    require_tool("dsrdump")
    rep = run_dsrdump(require_shared_data(*SAMPLES, "hd_seg_image_ct_binary.dcm"))
    assert not rep.ok


@pytest.mark.slow
def test_pixelmed_flags_template_errors() -> None:
    require_tool("java", "/usr/share/java/pixelmed.jar")
    # highdicom's older sample: HAS PROPERTIES instead of HAS CONCEPT MOD, missing Person Observer Name
    rep = run_sr_validator(require_shared_data(*SAMPLES, "hd_sr_document.dcm"))[0]
    assert not rep.ok
    assert any("HAS CONCEPT MOD" in e for e in rep.errors)


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    _need_dciodvfy()
    require_tool("dsrdump")
    good = require_shared_data(*SAMPLES, "hd_seg_image_ct_binary.dcm")
    runner = CliRunner()
    res = runner.invoke(app, ["validate", "--no-pixelmed", str(good)])
    assert res.exit_code == 0, res.output
    assert "dciodvfy: OK" in res.output
    ds = pydicom.dcmread(good)
    del ds.SegmentSequence[0].TrackingID
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    res = runner.invoke(app, ["validate", "--no-pixelmed", str(bad)])
    assert res.exit_code == 1
    assert "FAILED" in res.output
    sr = require_shared_data(*SAMPLES, "hd_sr_document_with_multiple_groups.dcm")
    res = runner.invoke(app, ["validate", "--no-pixelmed", str(sr)])
    assert res.exit_code == 0, res.output
    assert "dsrdump: OK" in res.output, res.output
