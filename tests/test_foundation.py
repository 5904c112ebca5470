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


def _exec_form(text: str, instruction: str) -> list[str]:
    m = re.search(rf"^{instruction}\s+(\[.*?\])\s*$", text, re.M)
    assert m, f"Dockerfile has no {instruction} in exec form"
    return list(json.loads(m.group(1)))


def test_dockerfile_entrypoint_exists_in_cli():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER\s+(?!root|0\b)\S+", text, re.M), "image must run as a non-root user"
    assert "HEALTHCHECK" in text and "/health" in text and "VOLUME" in text
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_VARIANT=cpu" in text
    args = _exec_form(text, "ENTRYPOINT") + _exec_form(text, "CMD")
    assert args[0] == "lesiontrack"
    res = CliRunner().invoke(app, [*args[1:], "--help"])
    assert res.exit_code == 0, f"Dockerfile runs 'lesiontrack {' '.join(args[1:])}', which the CLI does not have"


def test_dockerfile_installs_the_wheel_and_its_context_holds_every_package():
    """The runtime stage installs the wheel the first stage builds from the tree; .dockerignore must not drop a
    folder the wheel packages (web/ and synthetic/ were once missing from the image)."""
    import tomllib

    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM .* AS wheel$", text, re.M) and "pip wheel" in text
    assert "COPY --from=wheel" in text
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "README.md" not in ignored and "pyproject.toml" not in ignored
    for folder in _packaged_folders(project):
        assert (REPO / folder).is_dir(), folder
        assert folder not in ignored, f".dockerignore drops {folder}/, which the wheel packages"


def _packaged_folders(project: dict) -> list[str]:
    """Top-level source folders the wheel packages: lesiontrack and the layer folders linked into it."""
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["lesiontrack", "lesiontrack.*"]
    return ["lesiontrack", *sorted(LAYERS)]


# the layers, each a folder of the repository linked into the package as lesiontrack/<layer>
LAYERS = ("config", "db", "models", "pipeline", "dicom_node", "web", "synthetic")


def test_only_lesiontrack_at_the_top_and_layers_linked_into_it():
    for layer in LAYERS:
        link = REPO / "lesiontrack" / layer
        assert link.is_symlink() and link.resolve() == (REPO / layer).resolve(), f"lesiontrack/{layer} -> ../{layer}"


def test_logging_masks_patient_identifiers(capsys):
    from lesiontrack.config.logging import setup_logging

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
            if not path.resolve().is_relative_to((REPO / pkg).resolve()):
                continue  # lesiontrack/<layer> links: checked as <layer>
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    parts = name.split(".")
                    if parts[0] in ALLOWED_IMPORTS and parts[0] != "lesiontrack":
                        violations.append(f"{path.relative_to(REPO)} imports {name}: import lesiontrack.{name}")
                        continue
                    if parts[0] != "lesiontrack":
                        continue
                    top = parts[1] if len(parts) > 1 and parts[1] in ALLOWED_IMPORTS else "lesiontrack"
                    if top != pkg and top not in allowed:
                        violations.append(f"{path.relative_to(REPO)} imports {name}")
    assert not violations, "\n".join(violations)
