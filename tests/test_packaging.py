"""The image's contract, checked without a container runtime: the wheel built from the Docker build context, installed
into a fresh virtual environment outside the source tree, runs what the image runs — ``lesiontrack --version``,
``config check``, the Dockerfile's ENTRYPOINT + CMD until its health check is green, a C-ECHO, one small analysis
from C-STORE to SEG/SR, ``demo`` — with the working directory outside the tree and no PYTHONPATH.

Offline and fast: the fresh environment gets the wheel itself (``pip install --no-deps --no-index``) and reaches the
third-party dependencies through a ``.pth`` line naming the test interpreter's site-packages. Python adds a ``.pth``
line's directory to ``sys.path`` without processing the ``.pth`` files inside it, so the source tree's editable
install (a finder installed by ``__editable__*.pth``) stays inactive there: every LesionTrack module comes from the
wheel, which the test checks by where they are imported from.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pydicom
import pytest
import requests

from tests.support.services import free_port, wait_for
from tests.support.tools import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.services]

REPO = Path(__file__).resolve().parents[1]
# What `pip install` of the wheel puts at the top of site-packages (besides its .dist-info)
EXPECTED_TOP_LEVEL = {"lesiontrack"}
LAYERS = ("config", "db", "dicom_node", "models", "pipeline", "synthetic", "web")
MODULES = ["lesiontrack", *(f"lesiontrack.{layer}" for layer in LAYERS)]


def _docker_context(dest: Path) -> Path:
    """The tree as the Dockerfile's wheel stage sees it: everything but what .dockerignore drops."""
    patterns = [
        ln.strip().rstrip("/")
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(REPO)
        out = set()
        for name in names:
            path = (rel / name).as_posix()
            if any(
                fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p.removeprefix("**/")) or path.startswith(p + "/")
                for p in patterns
            ):
                out.add(name)
        return out

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


@dataclass
class Installed:
    venv: Path
    wheel: Path
    home: Path  # a working directory outside the source tree

    @property
    def exe(self) -> Path:
        return self.venv / "bin" / "lesiontrack"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("LESIONTRACK_")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["HOME"] = str(self.home)
        return env | extra

    def run(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.exe), *args],
            cwd=self.home,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    assert not root.resolve().is_relative_to(REPO)
    context = _docker_context(root / "context")
    # the Dockerfile's `pip wheel --no-deps`, without build isolation (offline: this environment's setuptools)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), "."],
        cwd=context,
        check=True,
        timeout=600,
    )
    (wheel,) = root.glob("lesiontrack-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=600,
    )
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_lesiontrack_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    home = root / "home"
    home.mkdir()
    return Installed(venv, wheel, home)


def test_wheel_top_level_names(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == EXPECTED_TOP_LEVEL, sorted(top)
    # every package of the tree is in the wheel, under lesiontrack/
    for layer in LAYERS:
        for init in (REPO / layer).rglob("__init__.py"):
            assert f"lesiontrack/{init.relative_to(REPO).as_posix()}" in names, init
    # package data the service needs at run time travels in the wheel
    tree = {p.name for p in (REPO / "db" / "migrations" / "versions").glob("*.py")}
    assert tree, "Alembic revisions"
    assert tree <= {Path(n).name for n in names if "migrations/versions/" in n}, "Alembic revisions"
    for needed in ("migrations/env.py", "migrations/script.py.mako", "lesiontrack.example.toml", ".html", ".css"):
        assert any(n.endswith(needed) for n in names), needed


def test_modules_come_from_the_wheel_not_the_tree(installed: Installed) -> None:
    code = (
        "import importlib, json, sys; "
        f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {MODULES!r}}}))"
    )
    out = subprocess.run(
        [str(installed.python), "-c", code],
        cwd=installed.home,
        env=installed.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    for module, file in json.loads(out.stdout).items():
        assert Path(file).resolve().is_relative_to(installed.venv.resolve()), (module, file)


def test_version_and_config_check(installed: Installed) -> None:
    r = installed.run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == version("lesiontrack"), r.stderr
    r = installed.run("config", "check", LESIONTRACK_DATA_DIR=str(installed.home / "data"))
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout, r.stderr


def _dockerfile() -> tuple[list[str], dict[str, str], str]:
    """The image's command (ENTRYPOINT + CMD), its LESIONTRACK_* environment and its health check command."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    command: list[str] = []
    for instruction in ("ENTRYPOINT", "CMD"):
        m = re.search(rf"^{instruction}\s+(\[.*\])\s*$", text, re.M)
        assert m, instruction
        command += json.loads(m.group(1))
    env = dict(re.findall(r"(LESIONTRACK_[A-Z_]+)=(\S+)", " ".join(re.findall(r"^ENV\s+(.*)$", text, re.M))))
    health = re.search(r"^HEALTHCHECK\s.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
    assert health
    return command, env, json.loads(health.group(1))


@dataclass
class Served:
    installed: Installed
    proc: subprocess.Popen[str]
    data: Path
    dicom_port: int
    http_port: int
    env: dict[str, str]


@pytest.fixture(scope="module")
def served(installed: Installed) -> Iterator[Served]:
    command, image_env, _ = _dockerfile()
    assert command[0] == "lesiontrack"
    data = installed.home / "served-data"
    dicom_port, http_port = free_port(), free_port()
    env = image_env | {
        # the image's settings, with the data folder and ports of this test and loopback instead of 0.0.0.0
        "LESIONTRACK_DATA_DIR": str(data),
        "LESIONTRACK_HTTP__BIND_ADDRESS": "127.0.0.1",
        "LESIONTRACK_HTTP__PORT": str(http_port),
        "LESIONTRACK_DICOM__BIND_ADDRESS": "127.0.0.1",
        "LESIONTRACK_DICOM__PORT": str(dicom_port),
        "LESIONTRACK_DICOM__SERIES_QUIET_SECONDS": "1.5",
        "LESIONTRACK_DICOM__FSYNC": "false",
        "LESIONTRACK_DICOM__RECEIVER_PROCESSES": "1",
        "LESIONTRACK_ENGINES__WORKING_SPACING_MM": "3.0",
    }
    log = (installed.home / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(installed.venv / "bin" / command[0]), *command[1:]],
        cwd=installed.home,
        env=installed.env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield Served(installed, proc, data, dicom_port, http_port, env)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _serve_log(served: Served) -> str:
    return (served.installed.home / "serve.log").read_text()[-4000:]


def test_serve_health_check_goes_green(served: Served) -> None:
    _, _, health = _dockerfile()
    require_tool(health[0] if health[0] != "sh" else "curl")

    def healthy() -> bool:
        assert served.proc.poll() is None, f"serve exited {served.proc.returncode}:\n{_serve_log(served)}"
        r = subprocess.run(health, env=served.installed.env(**served.env), capture_output=True, timeout=30)
        return r.returncode == 0

    wait_for(healthy, timeout=180, what="the Dockerfile's HEALTHCHECK command to succeed")
    assert requests.get(f"http://127.0.0.1:{served.http_port}/health", timeout=10).ok


def test_c_echo(served: Served) -> None:
    require_tool("echoscu")
    wait_for(lambda: requests.get(f"http://127.0.0.1:{served.http_port}/health", timeout=10).ok, timeout=180)
    r = subprocess.run(
        ["echoscu", "-aet", "MODALITY", "-aec", "LESIONTRACK", "127.0.0.1", str(served.dicom_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_one_job_from_c_store_to_seg_and_sr(served: Served, tmp_path: Path) -> None:
    """A baseline CT with its SEG, then a follow-up, sent with dcmtk's storescu: the served package analyses the
    follow-up and writes a SEG and an SR carrying its version."""
    require_tool("storescu")
    from lesiontrack.db.session import make_engine, make_session_factory
    from lesiontrack.demo_data import make_patient
    from lesiontrack.pipeline.jobs.store import JobStore, JobView

    patient = make_patient(tmp_path, shape=(40, 96, 96), spacing=(3.0, 3.0, 3.0), n_lesions=2, n_followups=1)
    wait_for(lambda: requests.get(f"http://127.0.0.1:{served.http_port}/health", timeout=10).ok, timeout=180)

    def storescu(files: list[Path]) -> None:
        r = subprocess.run(
            ["storescu", "--required", "-aet", "MODALITY", "-aec", "LESIONTRACK", "127.0.0.1", str(served.dicom_port)]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr

    storescu([*patient.baseline.files, patient.seg_file])
    storescu(patient.followups[0].files)

    engine = make_engine(f"sqlite:///{served.data / 'lesiontrack.sqlite3'}")
    try:
        store = JobStore(make_session_factory(engine))
        uid = patient.followups[0].series_uid

        def finished() -> JobView | None:
            assert served.proc.poll() is None, f"serve exited:\n{_serve_log(served)}"
            view = store.latest_for_series(uid)
            return view if view is not None and view.finished else None

        view = wait_for(finished, timeout=900, what="the follow-up's analysis")
    finally:
        engine.dispose()
    assert view.state.value == "done", (view.error, _serve_log(served))
    # the installed CLI reads the same job back
    r = served.installed.run("jobs", "show", str(view.id), **served.env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "done", r.stderr
    written = [pydicom.dcmread(p, stop_before_pixels=True) for p in (served.data / "results").rglob("*") if p.is_file()]
    assert {"SEG", "SR"} <= {ds.Modality for ds in written}, [ds.Modality for ds in written]
    assert all(ds.SoftwareVersions == version("lesiontrack") for ds in written)


def test_demo(installed: Installed) -> None:
    r = installed.run(
        "demo",
        "--workdir",
        str(installed.home / "demo"),
        "--size",
        "40x96x96",
        "--spacing-mm",
        "3",
        "--lesions",
        "2",
        "--followups",
        "1",
        "--no-keep-running",
        timeout=1200,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])


_WALK_SETTINGS = """
import sys
from pydantic import BaseModel
from lesiontrack.config.settings import ENV_PREFIX, Settings
for name in sys.argv[1:]:
    model = Settings
    parts = name.removeprefix(ENV_PREFIX).lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        assert field is not None, name
        if i < len(parts) - 1:
            assert isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel), name
            model = field.annotation
print("ok")
"""


def test_compose_commands_and_settings_exist_in_the_installed_package(installed: Installed) -> None:
    """deploy/compose.yaml runs the installed package: its commands, its variables and their values."""
    from tests.support.deploy import lesiontrack_services, named_settings

    r = subprocess.run(
        [str(installed.python), "-c", _WALK_SETTINGS, *sorted(named_settings())],
        cwd=installed.home,
        env=installed.env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
    for service in lesiontrack_services():
        r = installed.run(*service.command, "--help")
        assert r.returncode == 0, (service.name, r.stderr)
        env = service.environment | {"LESIONTRACK_DATA_DIR": str(installed.home / "compose-data")}
        r = installed.run("config", "check", **env)
        assert r.returncode == 0, (service.name, r.stderr)
        assert "configuration OK" in r.stdout, (service.name, r.stderr)
