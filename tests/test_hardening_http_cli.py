"""Issue 19, outside DICOM: bounded HTTP integers (422, never 500), OpenAPI behind a key, URL passwords masked
without a user name, a read-only or locked database refused at start-up, and every bad input to ``track``,
``register`` and ``synth`` a one-line error naming the file with a non-zero exit (never a traceback)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from lesiontrack.config.settings import Settings
from lesiontrack.db.session import make_engine, make_session_factory, upgrade

READ = "read-key-0123456789"
OPERATOR = "operator-key-9876543210"
HUGE = "9223372036854775808"  # 2**63: one past the largest 64-bit integer


def _app(tmp: Path, **http: object):
    from fastapi.testclient import TestClient

    from lesiontrack.web import create_app

    url = f"sqlite:///{tmp / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    settings = Settings(
        data_dir=tmp,
        http={
            "api_keys": [
                {"name": "viewer", "key": READ, "role": "read"},
                {"name": "ops", "key": OPERATOR, "role": "operator"},
            ],
            **http,
        },
    )
    app = create_app(settings, sf, None)
    return app, TestClient(app)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[object, object]]:
    app, client = _app(tmp_path)
    with client:
        yield app, client


def _is_int(schema: dict) -> bool:
    return schema.get("type") == "integer" or any(_is_int(x) for x in schema.get("anyOf", []))


def test_every_integer_parameter_out_of_range_is_422_not_500(web) -> None:
    app, client = web
    spec = app.openapi()
    cases: list[tuple[str, str, dict[str, str]]] = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            params = op.get("parameters", [])
            in_path = {p["name"]: p for p in params if p["in"] == "path"}
            fill = {n: ("1" if _is_int(p["schema"]) else "x") for n, p in in_path.items()}
            for name, p in in_path.items():
                if _is_int(p["schema"]):
                    url = path
                    for n, v in {**fill, name: HUGE}.items():
                        url = url.replace("{" + n + "}", v)
                    cases.append((method, url, {}))
            base = path
            for n, v in fill.items():
                base = base.replace("{" + n + "}", v)
            for p in params:
                if p["in"] == "query" and _is_int(p["schema"]):
                    for value in ("99999999999999999999", HUGE, "-99999999999999999999"):
                        cases.append((method, base, {p["name"]: value}))
    # the dashboard's pages are not in the schema
    cases += [("get", f"/jobs/{HUGE}", {}), ("post", f"/jobs/{HUGE}/retry", {}), ("get", f"/patients/{HUGE}", {})]
    assert len({url for _, url, q in cases if not q}) >= 16  # the issue found 16 routes answering 500
    for method, url, query in cases:
        r = client.request(method.upper(), url, params=query, headers={"X-API-Key": OPERATOR})
        assert r.status_code == 422, (method, url, query, r.status_code, r.text[:200])
        assert "Traceback" not in r.text
    assert client.get("/api/jobs/9223372036854775807", headers={"X-API-Key": READ}).status_code == 404


def test_openapi_needs_a_key_unless_configured_public(tmp_path: Path) -> None:
    _, client = _app(tmp_path / "a")
    with client:
        assert client.get("/openapi.json").status_code == 401
        r = client.get("/openapi.json", headers={"X-API-Key": READ})
        assert r.status_code == 200
        assert "/api/jobs" in r.json()["paths"]
    _, client = _app(tmp_path / "b", public_openapi=True)
    with client:
        assert client.get("/openapi.json").status_code == 200


def test_config_show_masks_a_password_only_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lesiontrack.cli import app

    monkeypatch.setenv("LESIONTRACK_WORKER__BROKER_URL", "redis://:Sup3rS3cret@redis.example:6379/0")
    monkeypatch.setenv("LESIONTRACK_DATABASE_URL", "postgresql://lt:An0therS3cret@db.example/lt")
    monkeypatch.setenv("LESIONTRACK_DATA_DIR", str(tmp_path))
    for args in (["config", "show"], ["config", "show", "--json"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert "Sup3rS3cret" not in res.output
        assert "An0therS3cret" not in res.output
        assert "redis://:********@redis.example" in res.output.replace("\n", "") or "********" in res.output


# -- database at start-up ---------------------------------------------------------------------------------------


def test_a_locked_database_is_detected_with_a_clear_error(tmp_path: Path) -> None:
    from lesiontrack.dicom_node.database import DatabaseNotWritable, check_writable

    url = f"sqlite:///{tmp_path / 'lt.sqlite3'}"
    upgrade(url)
    holder = sqlite3.connect(tmp_path / "lt.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseNotWritable, match="locked by another process"):
            check_writable(make_engine(url), url, lock_wait_seconds=0.3)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    check_writable(make_engine(url), url, lock_wait_seconds=0.3)  # free again: no error


def _read_only_folder(tmp_path: Path) -> Generator[Path, None, None]:
    """A folder the process cannot write to: a read-only tmpfs where mounting works (root ignores modes)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs for the read-only database test: {r.stderr!r}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        return
    yield mnt


def _make_read_only(mnt: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
    else:
        for p in mnt.iterdir():
            p.chmod(0o444)
        mnt.chmod(0o555)


def test_serve_refuses_a_read_only_database_at_start_up(tmp_path: Path) -> None:
    from lesiontrack.cli import app

    gen = _read_only_folder(tmp_path)
    mnt = next(gen)
    try:
        url = f"sqlite:///{mnt / 'lt.sqlite3'}"
        upgrade(url)
        make_engine(url).dispose()
        _make_read_only(mnt)
        env = {
            "LESIONTRACK_DATABASE_URL": url,
            "LESIONTRACK_DATA_DIR": str(tmp_path / "data"),
            "LESIONTRACK_DICOM__PORT": "0",
            "LESIONTRACK_HTTP__ENABLED": "false",
        }
        res = CliRunner().invoke(app, ["serve"], env=env)
        assert res.exit_code == 2, res.output
        assert "read-only" in res.output
        assert "lt.sqlite3" in res.output
        assert "Traceback" not in res.output
    finally:
        if os.geteuid() != 0:
            mnt.chmod(0o755)
        gen.close()


# -- CLI bad input: one case per test ----------------------------------------------------------------------------


def _cli(*args: str) -> Result:
    from lesiontrack.cli import app

    return CliRunner().invoke(app, list(args))


def _clean_error(res: Result, *names: str) -> str:
    out = res.output
    assert res.exit_code != 0, out
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out
    flat = re.sub(r"\s+", "", out)  # Rich wraps long paths
    for n in names:
        assert re.sub(r"\s+", "", n) in flat, (n, out)
    return out


@pytest.fixture(scope="module")
def two_timepoints(tmp_path_factory: pytest.TempPathFactory) -> list:
    from tests.support.segsr import make_series

    return make_series(tmp_path_factory.mktemp("tp"), n_timepoints=2)


def _baseline_with_seg(tmp: Path, tps: list) -> tuple[Path, Path]:
    import shutil

    from lesiontrack.pipeline.dicom.seg.writer import save_new, write_seg

    base = tmp / "baseline"
    shutil.copytree(tps[0].files[0].parent, base)
    seg = write_seg(tps[0].datasets, [les for les in tps[0].lesions if les.status.value != "vanished"])
    return base, save_new(seg.dataset, base)


@pytest.mark.parametrize("keep", [0.5, 1100])
def test_track_corrupt_seg_names_the_file(tmp_path: Path, two_timepoints, keep: float) -> None:
    """Cut inside the segment frames, and (the issue's case) inside the header at byte 1100."""
    base, seg = _baseline_with_seg(tmp_path, two_timepoints)
    raw = seg.read_bytes()
    seg.write_bytes(raw[: int(len(raw) * keep) if keep < 1 else int(keep)])
    res = _cli("track", "--baseline", str(base), "--followup", str(two_timepoints[1].files[0].parent),
               "--out", str(tmp_path / "out"), "--registration", "none")  # fmt: skip
    out = _clean_error(res, str(seg))
    assert "cannot" in out


def test_track_one_slice_followup_names_the_folder(tmp_path: Path, two_timepoints) -> None:
    import shutil

    base, _ = _baseline_with_seg(tmp_path, two_timepoints)
    fu = tmp_path / "one_slice"
    fu.mkdir()
    shutil.copy(two_timepoints[1].files[0], fu / "slice.dcm")
    res = _cli("track", "--baseline", str(base), "--followup", str(fu), "--out", str(tmp_path / "out"))
    out = _clean_error(res, str(fu))
    assert "at least 2 slices" in out


def test_track_followup_with_a_corrupt_slice_names_the_folder(tmp_path: Path, two_timepoints) -> None:
    import shutil

    base, _ = _baseline_with_seg(tmp_path, two_timepoints)
    fu = tmp_path / "corrupt_fu"
    shutil.copytree(two_timepoints[1].files[0].parent, fu)
    victim = sorted(fu.iterdir())[3]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) - 3000])  # pixel data cut short
    res = _cli("track", "--baseline", str(base), "--followup", str(fu), "--out", str(tmp_path / "out"),
               "--registration", "none")  # fmt: skip
    _clean_error(res, str(fu))


def test_track_bad_prompts_json_names_the_file(tmp_path: Path, two_timepoints) -> None:
    base, _ = _baseline_with_seg(tmp_path, two_timepoints)
    pj = tmp_path / "prompts.json"
    pj.write_text("{ not json")
    res = _cli("track", "--baseline", str(base), "--followup", str(two_timepoints[1].files[0].parent),
               "--out", str(tmp_path / "out"), "--prompts", str(pj))  # fmt: skip
    _clean_error(res, str(pj))


def test_track_folder_without_ct_names_the_folder(tmp_path: Path, two_timepoints) -> None:
    base, _ = _baseline_with_seg(tmp_path, two_timepoints)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no DICOM here")
    res = _cli("track", "--baseline", str(base), "--followup", str(empty), "--out", str(tmp_path / "out"))
    _clean_error(res, str(empty))


def _nifti(path: Path, shape: tuple[int, int, int]) -> Path:
    from lesiontrack.models.imaging.volume import Volume

    Volume(np.zeros(shape, np.int16), origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)).write(str(path))
    return path


def test_register_corrupt_nifti_names_the_file(tmp_path: Path) -> None:
    good = _nifti(tmp_path / "good.nii.gz", (8, 16, 16))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:40])
    res = _cli("register", "--baseline", str(bad), "--followup", str(good), "--engine", "simpleitk")
    _clean_error(res, str(bad))


def test_register_one_slice_volume_names_the_file(tmp_path: Path) -> None:
    good = _nifti(tmp_path / "good.nii.gz", (8, 16, 16))
    flat = _nifti(tmp_path / "flat.nii.gz", (1, 16, 16))
    res = _cli("register", "--baseline", str(good), "--followup", str(flat), "--engine", "simpleitk")
    out = _clean_error(res, str(flat))
    assert "at least 2 slices" in out


def test_register_missing_points_file_names_the_file(tmp_path: Path) -> None:
    good = _nifti(tmp_path / "good.nii.gz", (8, 16, 16))
    pts = tmp_path / "missing.csv"
    res = _cli("register", "--baseline", str(good), "--followup", str(good), "--engine", "simpleitk",
               "--map-points", str(pts), "--out", str(tmp_path / "o.csv"))  # fmt: skip
    _clean_error(res, str(pts))


def test_register_dicom_folder_that_is_not_a_series_names_the_folder(tmp_path: Path) -> None:
    good = _nifti(tmp_path / "good.nii.gz", (8, 16, 16))
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"not dicom" * 30)
    res = _cli("register", "--baseline", str(folder), "--followup", str(good), "--engine", "simpleitk")
    _clean_error(res, str(folder))


def test_synth_corrupt_source_names_the_file(tmp_path: Path) -> None:
    lab = _nifti(tmp_path / "lab.nii.gz", (8, 16, 16))
    src = tmp_path / "src.nii.gz"
    src.write_bytes(b"\x1f\x8b garbage")
    res = _cli("synth", "--out", str(tmp_path / "o"), "--source", str(src), "--labels", str(lab))
    _clean_error(res, str(src))


def test_synth_label_map_of_another_shape_names_the_file(tmp_path: Path) -> None:
    from lesiontrack.models.imaging.volume import Volume

    src = _nifti(tmp_path / "src.nii.gz", (8, 16, 16))
    arr = np.zeros((8, 12, 12), np.uint8)
    arr[4, 6, 6] = 1
    lab = tmp_path / "lab.nii.gz"
    Volume(arr, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)).write(str(lab))
    res = _cli("synth", "--out", str(tmp_path / "o"), "--source", str(src), "--labels", str(lab))
    out = _clean_error(res, str(lab))
    assert "shape" in out
