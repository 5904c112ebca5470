"""OHIF in headless Chromium over a fresh Orthanc with DICOMweb: run tests/browser/ohif-check.mjs on a study."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.support.tools import REPO, require_tool

BROWSER_DIR = REPO / "tests" / "browser"


OHIF_DIST = BROWSER_DIR / "node_modules" / "@ohif" / "app" / "dist" / "index.html"


def _require_browser_stack() -> None:
    require_tool(
        "node",
        "/usr/bin/chromium",
        "/usr/sbin/Orthanc",
        "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
        str(OHIF_DIST),
        str(BROWSER_DIR / "node_modules" / "playwright-core"),
    )


def run_ohif_check(
    tmp: Path,
    files: list[Path],
    study_uid: str,
    *,
    seg: str,
    sr: str,
    labels: list[str],
    sr_texts: list[str] = [],  # noqa: B006  (read only)
    also_listed: list[str] = [],  # noqa: B006  (read only)
    track_sr: str = "",
    tracked_texts: list[str] = [],  # noqa: B006  (read only)
) -> tuple[dict[str, Any], int]:
    """Store ``files`` in a fresh Orthanc with DICOMweb and run ohif-check.mjs on the study; (result, exit code)."""
    from tests.support.services import OrthancServer

    _require_browser_stack()
    orthanc = OrthancServer(tmp / "orthanc", enable_dicomweb=True).start()
    try:
        for f in files:
            orthanc.post("/instances", Path(f).read_bytes())
        cmd = ["node", str(BROWSER_DIR / "ohif-check.mjs"), "--orthanc", orthanc.url, "--study", study_uid]
        cmd += ["--out", str(tmp / "shots"), "--seg", seg, "--sr", sr, "--labels", "|".join(labels)]
        cmd += ["--sr-texts", "|".join(sr_texts), "--also-listed", "|".join(also_listed)]
        if track_sr:
            cmd += ["--track-sr", track_sr, "--tracked-texts", "|".join(tracked_texts)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=BROWSER_DIR)
    finally:
        orthanc.stop()
    assert proc.stdout.strip(), f"ohif-check printed nothing; stderr:\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    assert "error" not in result, result.get("error")
    assert result["blocked"] == [], f"OHIF tried to reach the network: {result['blocked']}"
    return result, proc.returncode
