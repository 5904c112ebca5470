"""deploy/compose.yaml against the package: every LesionTrack service runs a command the CLI has, every
``LESIONTRACK_*`` variable it (or deploy/example.env) names is a setting, the values it gives validate, every variable
is documented in docs/deploy.md, every long-running service has a health check, and the Orthanc routing script it
mounts is the one docs/pacs/orthanc.md (and its test) describe. tests/test_packaging.py repeats the command and
settings checks with the installed wheel."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from lesiontrack.cli import app
from lesiontrack.config.settings import ENV_PREFIX, Settings, load_settings
from tests.support.deploy import (
    _INTERPOLATION,
    COMPOSE,
    REPO,
    example_env,
    lesiontrack_services,
    load_compose,
    named_settings,
)

DOC = REPO / "docs" / "deploy.md"


def setting_exists(env_name: str) -> bool:
    """``LESIONTRACK_DICOM__PORT`` → Settings.dicom.port (nested models joined with ``__``)."""
    model: type[BaseModel] = Settings
    parts = env_name.removeprefix(ENV_PREFIX).lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
    return True


def test_compose_services_run_commands_the_cli_has() -> None:
    services = lesiontrack_services()
    assert {s.name for s in services} >= {"migrate", "lesiontrack", "worker"}
    for s in services:
        res = CliRunner().invoke(app, [*s.command, "--help"])
        assert res.exit_code == 0, f"{s.name}: `lesiontrack {' '.join(s.command)}`: {res.output}"


def test_every_lesiontrack_variable_is_a_setting() -> None:
    names = named_settings()
    assert "LESIONTRACK_DATABASE_URL" in names
    assert "LESIONTRACK_WORKER__BROKER_URL" in names
    unknown = sorted(n for n in names if not setting_exists(n))
    assert not unknown, f"not settings of config/settings.py: {unknown}"


def test_compose_values_validate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for s in lesiontrack_services():
        with monkeypatch.context() as m:
            for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
                m.delenv(key)
            for key, value in s.environment.items():
                m.setenv(key, value)
            m.setenv("LESIONTRACK_DATA_DIR", str(tmp_path))
            settings = load_settings(None)
        assert settings.worker.executor == "celery", s.name
        assert settings.effective_database_url.startswith("postgresql"), s.name


def test_every_variable_is_documented() -> None:
    doc = DOC.read_text()
    compose_vars = set(_INTERPOLATION.findall(COMPOSE.read_text()))
    names = named_settings() | {v[0] for v in compose_vars} | set(example_env())
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/deploy.md does not document {missing}"


def test_long_running_services_have_health_checks() -> None:
    compose = load_compose()
    for name, spec in compose["services"].items():
        if name == "migrate":
            assert spec.get("restart") == "no"
            continue
        if name == "lesiontrack":
            assert "healthcheck" not in spec  # the image's HEALTHCHECK (GET /health) applies
            assert "HEALTHCHECK" in (REPO / "Dockerfile").read_text()
            continue
        assert "healthcheck" in spec, f"{name} has no health check"


def test_services_start_after_the_schema_is_migrated() -> None:
    compose = load_compose()
    assert compose["services"]["migrate"]["command"] == ["db", "upgrade"]
    for name in ("lesiontrack", "worker"):
        assert compose["services"][name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_orthanc_routing_script_is_the_documented_one() -> None:
    doc = re.search(r"```lua\n(.*?)```", (REPO / "docs" / "pacs" / "orthanc.md").read_text(), re.S)
    assert doc
    ours = (REPO / "deploy" / "orthanc" / "lesiontrack.lua").read_text()

    def body(text: str) -> list[str]:
        return [
            ln
            for ln in text.splitlines()
            if not ln.startswith(("--", "local LESIONTRACK_URL", "local LESIONTRACK_KEY"))
        ]

    assert body(ours) == body(doc.group(1))
    compose = load_compose()
    orthanc_env = compose["services"]["orthanc"]["environment"]
    for var in re.findall(r"os\.getenv\('([A-Z_]+)'\)", ours):
        assert var in orthanc_env, var
