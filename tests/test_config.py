"""Configuration: precedence default < file < environment, bad keys named, CLI show/check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lesiontrack.cli import app
from lesiontrack.config.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lt.toml"
    p.write_text(text)
    return p


def test_precedence_default_file_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LESIONTRACK_DICOM__PORT", raising=False)
    assert load_settings().dicom.port == 11112
    cfg = _write(tmp_path, "[dicom]\nport = 12000\nae_title = 'FROMFILE'\n")
    s = load_settings(cfg)
    assert (s.dicom.port, s.dicom.ae_title) == (12000, "FROMFILE")
    monkeypatch.setenv("LESIONTRACK_DICOM__PORT", "13000")
    s = load_settings(cfg)
    assert s.dicom.port == 13000  # environment beats file
    assert s.dicom.ae_title == "FROMFILE"  # file beats default


def test_config_file_from_environment_variable(tmp_path, monkeypatch):
    cfg = _write(tmp_path, "[compute]\ndevice = 'cpu'\n")
    monkeypatch.setenv("LESIONTRACK_CONFIG", str(cfg))
    assert load_settings().compute.device == "cpu"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[dicom]\nport = 'not-a-port'\n", "dicom.port"),
        ("[dicom]\nport = 70000\n", "dicom.port"),
        ("[dicom]\nbogus_key = 1\n", "dicom.bogus_key"),
        ("[compute]\ndevice = 'tpu'\n", "compute.device"),
        ("[[pacs]]\nname = 'x'\nae_title = 'X'\nhost = 'h'\nport = 0\n", "pacs.0.port"),
    ],
)
def test_bad_value_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, text))
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_bad_environment_value_names_the_key(monkeypatch):
    monkeypatch.setenv("LESIONTRACK_DICOM__MAX_ASSOCIATIONS", "zero")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.key == "dicom.max_associations"


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    bad = _write(tmp_path, "[dicom\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_example_config_is_valid_and_documents_every_section():
    example = REPO / "config" / "lesiontrack.example.toml"
    s = load_settings(example)
    text = example.read_text()
    for section in type(s).model_fields:
        if section not in ("database_url", "data_dir", "pacs"):
            assert f"[{section}]" in text, section


def test_cli_show_sources_and_masks_secrets(tmp_path, monkeypatch):
    cfg = _write(
        tmp_path,
        "[dicom]\nae_title = 'FILEAE'\n[[http.api_keys]]\nname = 'ops'\nkey = 'supersecret'\nrole = 'operator'\n",
    )
    monkeypatch.setenv("LESIONTRACK_DICOM__PORT", "11999")
    monkeypatch.setenv("LESIONTRACK_DATABASE_URL", "postgresql://lt:hunter2@db:5432/lt")
    res = CliRunner().invoke(app, ["--config", str(cfg), "config", "show", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["key"]: r for r in json.loads(res.output)}
    assert rows["dicom.ae_title"] == {"key": "dicom.ae_title", "value": "FILEAE", "source": "file"}
    assert rows["dicom.port"]["source"] == "environment"
    assert rows["dicom.port"]["value"] == 11999
    assert rows["dicom.max_associations"]["source"] == "default"
    assert "supersecret" not in res.output
    assert "hunter2" not in res.output
    assert rows["http.api_keys[0].key"]["value"] == "********"


def test_cli_check_good_and_bad(tmp_path):
    runner = CliRunner()
    good = _write(tmp_path, "[dicom]\nport = 11113\n")
    assert runner.invoke(app, ["--config", str(good), "config", "check"]).exit_code == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[routing]\nmin_slices = -3\n")
    res = runner.invoke(app, ["--config", str(bad), "config", "check"])
    assert res.exit_code != 0
    assert "routing.min_slices" in res.output


def test_check_fails_on_an_unknown_engine_naming_the_key(tmp_path):
    """`nninteractive` does not exist: `config check` exits non-zero naming engines.segmentation (not a job failure)."""
    res = CliRunner().invoke(
        app, ["--config", str(_write(tmp_path, "[engines]\nsegmentation = 'nninteractive'\n")), "config", "check"]
    )
    assert res.exit_code != 0
    assert "engines.segmentation" in res.output
    assert "nninteractive" in res.output
    assert "adaptive" in res.output  # the message lists what is available
    res = CliRunner().invoke(
        app, ["--config", str(_write(tmp_path, "[engines]\nregistration = 'elastix'\n")), "config", "check"]
    )
    assert res.exit_code != 0
    assert "engines.registration" in res.output


def test_check_fails_on_missing_weights_naming_the_weights_key(tmp_path):
    res = CliRunner().invoke(
        app, ["--config", str(_write(tmp_path, "[engines]\nsegmentation = 'lesionlocator'\n")), "config", "check"]
    )
    assert res.exit_code != 0
    assert "engines.lesionlocator_weights" in res.output
    cfg = _write(
        tmp_path, f"[engines]\nregistration = 'unigradicon'\nunigradicon_weights = '{tmp_path / 'absent.trch'}'\n"
    )
    res = CliRunner().invoke(app, ["--config", str(cfg), "config", "check"])
    assert res.exit_code != 0
    assert "engines.unigradicon_weights" in res.output
    assert "absent.trch" in res.output


def test_engine_registry_has_one_shape_for_both_kinds(tmp_path):
    from lesiontrack.config.settings import EngineSettings
    from lesiontrack.models.engines import REGISTRATION, SEGMENTATION, build_registration, check_engines

    assert {"none", "convex", "simpleitk", "unigradicon"} <= set(REGISTRATION)
    assert {"adaptive", "warped-prompt", "lesionlocator"} <= set(SEGMENTATION)
    assert all(s.kind == "registration" for s in REGISTRATION.values())
    assert all(s.kind == "segmentation" for s in SEGMENTATION.values())
    assert check_engines(EngineSettings()) == []  # the defaults run out of the box
    assert check_engines(EngineSettings(registration="none", segmentation="warped-prompt")) == []
    assert build_registration("none").name == "none"


def test_serve_refuses_to_start_with_an_unknown_engine(tmp_path):
    from lesiontrack.service import LesionTrackService

    s = load_settings(
        _write(tmp_path, f"data_dir = '{tmp_path / 'data'}'\n[engines]\nsegmentation = 'nninteractive'\n")
    )
    with pytest.raises(ConfigError, match=r"engines\.segmentation"):
        LesionTrackService(s, dicom=False, http=False, jobs=False).start()
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
