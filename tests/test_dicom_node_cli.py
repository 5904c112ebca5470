"""The DICOM commands end to end: `lesiontrack serve` as a process, `echo`, `find-priors`, `complete-series`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from lesiontrack.cli import app
from tests.support.dicom_node import Node, echoscu, ge_files, storescu
from tests.support.orthanc_node import prior_files
from tests.support.services import OrthancServer, free_port, wait_for_port

LESIONTRACK = Path(sys.executable).with_name("lesiontrack")


def write_config(path: Path, node_root: Path, port: int, extra: str = "") -> Path:
    path.write_text(
        f'data_dir = "{node_root / "data"}"\ndatabase_url = "sqlite:///{node_root / "lt.sqlite3"}"\n'
        f'[dicom]\nport = {port}\nbind_address = "127.0.0.1"\nseries_quiet_seconds = 3600\n'
        f"fsync = false\n{extra}"
    )
    return path


def test_serve_process_receives_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "lt.toml", tmp_path, port, extra="[http]\nenabled = false\n")
    proc = subprocess.Popen(
        [str(LESIONTRACK), "--config", str(cfg), "serve", "--upgrade-db"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("LesionTrack SCP"):  # printed once every part is up and signals are handled
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(120), "".join(lines)
        wait_for_port(port, timeout=10)
        assert echoscu(port) == 0
        storescu(port, ge_files()[:5])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "listening" in out
    n = Node.__new__(Node)  # read the database the process wrote
    from lesiontrack.db.session import make_engine, make_session_factory

    n.engine = make_engine(f"sqlite:///{tmp_path / 'lt.sqlite3'}")
    n.sf = make_session_factory(n.engine)
    assert n.count() == 5
    n.engine.dispose()


def test_serve_refuses_unmigrated_database(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "lt.toml", tmp_path, free_port())
    for args in (
        ["serve"],
        ["find-priors", "--patient", "P1", "--local-only"],
        ["send", "--list"],
        ["complete-series", "1.2.3"],
    ):
        r = CliRunner().invoke(app, ["--config", str(cfg), *args])
        assert r.exit_code == 2, (args, r.output)
        assert "db upgrade" in r.output, (args, r.output)


def test_echo_command(tmp_path: Path) -> None:
    dead = free_port()
    with OrthancServer(tmp_path / "orthanc") as o:
        cfg = write_config(
            tmp_path / "lt.toml",
            tmp_path,
            free_port(),
            extra=(
                f'\n[[pacs]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {o.dicom_port}\n'
                f'\n[[pacs]]\nname = "down"\nae_title = "NOBODY"\nhost = "127.0.0.1"\nport = {dead}\n'
            ),
        )
        r = CliRunner().invoke(app, ["--config", str(cfg), "echo", "pacs"])
        assert r.exit_code == 0
        assert "OK" in r.output
        r = CliRunner().invoke(app, ["--config", str(cfg), "echo", "down"])
        assert r.exit_code == 1
        r = CliRunner().invoke(app, ["--config", str(cfg), "echo", "nosuchpeer"])
        assert r.exit_code == 2
        assert "no PACS peer" in r.output


def _issuer_copy(files: list[Path], dest: Path, issuer: str | None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        ds = dcmread(f)
        if issuer:
            ds.IssuerOfPatientID = issuer
        p = dest / f.name
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def test_find_priors_and_complete_series_commands(tmp_path: Path) -> None:
    n = Node(tmp_path, series_quiet_seconds=3600)
    ct, seg = prior_files()
    files = _issuer_copy([*ct, seg], tmp_path / "prior", "HOSPITAL-A")
    with n.scp:
        storescu(n.port, files, "STORESCU", "-R")  # -R: propose the files' own SOP classes (SEG included)
    cfg = write_config(tmp_path / "lt.toml", tmp_path, free_port())
    run = CliRunner().invoke
    r = run(app, ["--config", str(cfg), "find-priors", "--patient", "99000", "--local-only", "--json"])
    assert r.exit_code == 0, r.output
    import json

    rows = json.loads(r.output)
    ct_series = str(dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
    assert [(x["ct_series_uid"], x["source"], [a["modality"] for a in x["annotations"]]) for x in rows] == [
        (ct_series, "local", ["SEG"])
    ]
    # the issuer decides only when both sides have one
    for issuer, expected in (("HOSPITAL-A", 1), ("HOSPITAL-B", 0)):
        r = run(
            app,
            ["--config", str(cfg), "find-priors", "--patient", "99000", "--issuer", issuer, "--local-only", "--json"],
        )
        assert r.exit_code == 0
        assert len(json.loads(r.output)) == expected
    # earlier than a date before the prior: nothing
    r = run(
        app,
        [
            "--config",
            str(cfg),
            "find-priors",
            "--patient",
            "99000",
            "--before",
            "20000101",
            "--local-only",
            "--retrieve",
        ],
    )
    assert r.exit_code == 0
    assert "no prior timepoints" in r.output
    r = run(app, ["--config", str(cfg), "find-priors", "--patient", "99000", "--local-only", "--retrieve", "--json"])
    assert json.loads(r.output)[0]["ct_files"] == 3

    r = run(app, ["--config", str(cfg), "complete-series", ct_series])
    assert r.exit_code == 0, r.output
    assert "complete: skip" in r.output
    assert "min_slices" in r.output
    r = run(app, ["--config", str(cfg), "complete-series", "1.2.3.4"])
    assert r.exit_code == 1


@pytest.mark.skipif(os.environ.get("LESIONTRACK_SKIP_SEND_CLI") == "1", reason="opt-out")
def test_send_command_errors_are_clear(tmp_path: Path) -> None:
    n = Node(tmp_path)
    del n
    cfg = write_config(tmp_path / "lt.toml", tmp_path, free_port())
    r = CliRunner().invoke(app, ["--config", str(cfg), "send", str(tmp_path / "missing.dcm")])
    assert r.exit_code == 2
    assert "not a file" in r.output
    r = CliRunner().invoke(app, ["--config", str(cfg), "send", "--retry", "42"])
    assert r.exit_code == 1
    assert "nothing to retry" in r.output
