"""OHIF in headless Chromium over Orthanc with DICOMweb: run tests/browser/ohif-check.mjs on a study and read back
what the viewer showed, or draw and save a radiologist's measurement there (tests/browser/ohif-draw.mjs)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.services import OrthancServer
from tests.support.tools import REPO, require_tool

BROWSER_DIR = REPO / "tests" / "browser"
OHIF_DIST = BROWSER_DIR / "node_modules" / "@ohif" / "app" / "dist" / "index.html"


def require_browser_stack() -> None:
    require_tool(
        "node",
        "/usr/bin/chromium",
        "/usr/sbin/Orthanc",
        "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
        str(OHIF_DIST),
        str(BROWSER_DIR / "node_modules" / "playwright-core"),
    )


@dataclass(frozen=True)
class OhifExpectation:
    """What ohif-check.mjs looks for in the study: the SEG and SR series (by description), the segment labels, texts
    in the SR panel, further entries in the measurement list, the OHIF measurements SR and its tracked rows; the
    segment to jump to for the screenshot, and whether to save an SR from the viewer ("Create SR")."""

    seg: str
    sr: str
    labels: list[str]
    sr_texts: list[str] = field(default_factory=list)
    also_listed: list[str] = field(default_factory=list)
    track_sr: str = ""
    tracked_texts: list[str] = field(default_factory=list)
    focus_label: str = ""
    save_sr: bool = False

    def arguments(self) -> list[str]:
        args = ["--seg", self.seg, "--sr", self.sr, "--labels", "|".join(self.labels)]
        args += ["--sr-texts", "|".join(self.sr_texts), "--also-listed", "|".join(self.also_listed)]
        if self.track_sr:
            args += ["--track-sr", self.track_sr, "--tracked-texts", "|".join(self.tracked_texts)]
        if self.focus_label:
            args += ["--focus-label", self.focus_label]
        if self.save_sr:
            args.append("--save-sr")
        return args


def run_ohif_check(
    tmp: Path,
    files: list[Path],
    study_uid: str,
    expect: OhifExpectation,
    *,
    before_stop: Callable[[OrthancServer], None] | None = None,
) -> tuple[dict[str, Any], int]:
    """Store ``files`` in a fresh Orthanc with DICOMweb and run ohif-check.mjs on the study; (result, exit code).
    ``before_stop`` reads what it needs from Orthanc (e.g. an SR the viewer saved) before Orthanc stops."""
    require_browser_stack()
    orthanc = OrthancServer(tmp / "orthanc", enable_dicomweb=True).start()
    try:
        for f in files:
            orthanc.post("/instances", Path(f).read_bytes())
        cmd = ["node", str(BROWSER_DIR / "ohif-check.mjs"), "--orthanc", orthanc.url, "--study", study_uid]
        cmd += ["--out", str(tmp / "shots"), *expect.arguments()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=BROWSER_DIR)
        if before_stop is not None:
            before_stop(orthanc)
    finally:
        orthanc.stop()
    assert proc.stdout.strip(), f"ohif-check printed nothing; stderr:\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    assert "error" not in result, result.get("error")
    assert result["blocked"] == [], f"OHIF tried to reach the network: {result['blocked']}"
    return result, proc.returncode


@dataclass(frozen=True)
class OhifDrawing:
    """What tests/browser/ohif-draw.mjs reports: the Measurements panel's text after naming the measurement, the
    archive's answer to the STOW-RS of the report, and the screenshots it took."""

    panel_text: str
    stow_status: int
    screenshots: list[str]


def run_ohif_draw(
    out: Path, orthanc_url: str, study_uid: str, line: tuple[Sequence[float], Sequence[float]], label: str
) -> OhifDrawing:
    """Draw ``line`` (two LPS points in mm on one slice) with OHIF's Length tool on the study in a running Orthanc
    with DICOMweb, name it ``label`` and save it as OHIF does (Create SR → Save: STOW-RS); what
    tests/browser/ohif-draw.mjs saw. Fails with its output unless the archive accepted the report."""
    require_browser_stack()
    start, end = (",".join(f"{float(v):.3f}" for v in p) for p in line)
    cmd = ["node", str(BROWSER_DIR / "ohif-draw.mjs"), "--orthanc", orthanc_url, "--study", study_uid]
    cmd += ["--out", str(out), "--from", start, "--to", end, "--label", label]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=BROWSER_DIR)
    assert proc.stdout.strip(), f"ohif-draw printed nothing; stderr:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout)
    assert "error" not in result, (result.get("error"), result["steps"], proc.stderr[-2000:])
    assert result["blocked"] == [], f"OHIF tried to reach the network: {result['blocked']}"
    assert proc.returncode == 0, result
    return OhifDrawing(str(result["measurementsPanelText"]), int(result["stowStatus"]), list(result["screenshots"]))
