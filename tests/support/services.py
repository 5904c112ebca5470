"""Real services the tests start on loopback and stop (PostgreSQL, Orthanc, Redis), and polling helpers."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.support.tools import require_tool

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
    """Poll until something accepts connections on host:port (a readiness check, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy (a readiness check on observable state, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# The console command run as a child process with this interpreter (no reliance on PATH).
LESIONTRACK = [sys.executable, "-c", "from lesiontrack.cli import main; main()"]


def _pg_bin() -> Path:
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / "initdb").exists():
            return base
    require_tool("initdb")
    return Path(shutil.which("initdb") or "").parent


class PostgresServer:
    """initdb + pg_ctl in a temporary directory, run as the 'postgres' user when we are root."""

    def __init__(self, root: Path | None = None) -> None:
        # pytest's tmp dirs are private to root; the postgres user needs a directory it can reach.
        self.root = Path(tempfile.mkdtemp(prefix="lt-pg-", dir=root if root and os.geteuid() != 0 else None))
        self.port = free_port()
        self.bin = _pg_bin()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = "postgres"
            pwd.getpwnam(user)
            shutil.chown(self.root, user, user)
            os.chmod(self.root, 0o700)
            self._as_user = ["runuser", "-u", user, "--"]

    @property
    def url(self) -> str:
        return self.database_url("lesiontrack")

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://lesiontrack@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """A new empty database on this server; returns its URL."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "lesiontrack", name)
        return self.database_url(name)

    def _run(self, *args: str) -> None:
        res = subprocess.run([*self._as_user, *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({res.returncode}): {res.stderr.strip() or res.stdout}")

    def start(self) -> None:
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "lesiontrack", "--auth=trust", "-E", "UTF8")
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        self._run(
            str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "lesiontrack", "lesiontrack"
        )

    def stop(self) -> None:
        subprocess.run(
            [*self._as_user, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """Debian ``redis-server`` on a free loopback port with a temporary working directory, no persistence."""

    def __init__(self, root: Path | None = None) -> None:
        require_tool("redis-server")
        self.root = Path(tempfile.mkdtemp(prefix="lt-redis-", dir=root))
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.root),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--logfile",
                str(self.root / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            self._proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OrthancServer:
    """Debian's Orthanc (/usr/sbin/Orthanc) on free loopback ports, with a temporary storage folder.

    ``modalities`` maps a symbolic name to ``(AET, host, port)`` (written to ``DicomModalities``, every DIMSE
    permission allowed). ``enable_dicomweb`` loads the DICOMweb plugin from /usr/share/orthanc/plugins and
    serves it at ``/dicom-web/``. HTTP authentication is off; everything listens on 127.0.0.1 only.
    """

    BINARY = "/usr/sbin/Orthanc"
    PLUGINS = Path("/usr/share/orthanc/plugins")

    def __init__(
        self,
        root: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        enable_dicomweb: bool = False,
        extra_config: dict | None = None,
    ) -> None:
        require_tool(self.BINARY)
        self.root = Path(root)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.enable_dicomweb = enable_dicomweb
        self.extra_config = dict(extra_config or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        cfg: dict = {
            "Name": f"lesiontrack-test-{self.aet}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomScuTimeout": 30,
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "StorageCompression": False,
            "DicomModalities": {
                name: {
                    "AET": aet,
                    "Host": host,
                    "Port": port,
                    "AllowEcho": True,
                    "AllowFind": True,
                    "AllowMove": True,
                    "AllowGet": True,
                    "AllowStore": True,
                }
                for name, (aet, host, port) in self.modalities.items()
            },
            "Plugins": [],
        }
        if self.enable_dicomweb:
            plugin = self.PLUGINS / "libOrthancDicomWeb.so"
            if not plugin.exists():
                require_tool(str(plugin))
            cfg["Plugins"] = [str(plugin)]
            cfg["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            }
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout: float = 60.0) -> OrthancServer:
        import json
        import urllib.request

        (self.root / "storage").mkdir(parents=True, exist_ok=True)
        cfg_path = self.root / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        # the child keeps its own copy of the log's descriptor: ours closes once it is started
        with open(self.root / "orthanc.log", "wb") as log:
            self._proc = subprocess.Popen(
                [self.BINARY, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode}: "
                    f"{(self.root / 'orthanc.log').read_text(errors='replace')[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=1) as r:
                    if r.status == 200:
                        wait_for_port(self.dicom_port, timeout=max(1.0, deadline - time.monotonic()))
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc not ready on {self.url} after {timeout}s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            self._proc = None

    # small REST helpers shared by the tests --------------------------------------------------------------
    def get_json(self, path: str) -> Any:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes | str | dict[str, Any]) -> Any:
        import json
        import urllib.request

        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip() else None

    def upload(self, path: Path) -> str:
        """Upload one DICOM file over REST; returns its Orthanc instance id."""
        return str(self.post("/instances", Path(path).read_bytes())["ID"])

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
