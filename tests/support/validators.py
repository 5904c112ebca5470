"""Our SEG and SR through the DICOM validators (dciodvfy, PixelMed's SR validator): no error, no warning that
counts as one."""

from __future__ import annotations

from pathlib import Path

from lesiontrack.pipeline.dicom.validate import run_dciodvfy, run_sr_validator
from tests.support.tools import require_tool


def assert_seg_and_sr_validate(seg: str | Path, sr: str | Path) -> None:
    require_tool("java")
    for path in (seg, sr):
        report = run_dciodvfy(path)
        assert report.ok, report.errors
    (sr_report,) = run_sr_validator(sr)
    assert sr_report.ok, sr_report.errors
    assert not sr_report.errors, sr_report.errors
