"""Real services the tests start on loopback and stop: PostgreSQL (more are added by later suites)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import require_tool


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
        return f"postgresql+psycopg://lesiontrack@127.0.0.1:{self.port}/lesiontrack"

    def _run(self, *args: str) -> None:
        res = subprocess.run([*self._as_user, *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({res.returncode}): {res.stderr.strip() or res.stdout}")

    def start(self) -> None:
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "lesiontrack", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "lesiontrack",
                  "lesiontrack")

    def stop(self) -> None:
        subprocess.run([*self._as_user, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                        "-w", "stop"], capture_output=True)
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

    def start(self) -> "RedisServer":
        self._proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.root), "--save", "", "--appendonly", "no", "--protected-mode", "yes",
             "--logfile", str(self.root / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
