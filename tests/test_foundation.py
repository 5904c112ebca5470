"""Project shape: CLI entry points, logging without PHI, Dockerfile basics, layering of imports."""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from lesiontrack import __version__
from lesiontrack.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_console_script_help_and_version():
    exe = Path(sys.executable).parent / "lesiontrack"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("version", "config", "db"):
        assert cmd in out
    out = subprocess.run([str(exe), "version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == __version__


def test_dockerfile_entrypoint_exists_in_cli():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER\s+(?!root)\S+", text, re.M), "image must run as a non-root user"
    assert "HEALTHCHECK" in text and "VOLUME" in text
    assert "torch==2.13.0" in text or "TORCH" in text
    m = re.search(r"(?:ENTRYPOINT|CMD)\s+\[(.*?)\]", text)
    args = json.loads(f"[{m.group(1)}]")
    assert args[0] == "lesiontrack"
    sub = args[1]
    res = CliRunner().invoke(app, [sub, "--help"])
    assert res.exit_code == 0, f"Dockerfile runs 'lesiontrack {sub}', which the CLI does not have"


def test_logging_masks_patient_identifiers(capsys):
    from config.logging import setup_logging

    setup_logging("INFO", json_format=True)
    logging.getLogger("lesiontrack.test").info("received PatientName=DOE^JOHN PatientID=12345 series 1.2.3")
    err = capsys.readouterr().err
    line = json.loads(err.strip().splitlines()[-1])
    assert "DOE" not in line["msg"] and "12345" not in line["msg"] and "1.2.3" in line["msg"]
    setup_logging("WARNING")


# Which top-level packages each package may import (besides itself). Inbound adapters (dicom_node, web) sit on
# pipeline, pipeline on models, db and config beneath all; synthetic (demo/test/bench data generators) sits on
# models and is imported only by the composition root (lesiontrack), tests and benches.
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "config": set(),
    "db": {"config"},
    "models": {"db", "config"},
    "synthetic": {"models", "db", "config"},
    "pipeline": {"models", "db", "config"},
    "dicom_node": {"pipeline", "models", "db", "config"},
    "web": {"pipeline", "models", "db", "config"},
    "lesiontrack": {"dicom_node", "web", "pipeline", "models", "synthetic", "db", "config"},
}


def test_imports_flow_one_way():
    """dicom_node / web → pipeline → models, with db and config beneath them; never upwards or sideways."""
    violations = []
    for pkg, allowed in ALLOWED_IMPORTS.items():
        for path in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in ALLOWED_IMPORTS and top != pkg and top not in allowed:
                        violations.append(f"{path.relative_to(REPO)} imports {name}")
    assert not violations, "\n".join(violations)
