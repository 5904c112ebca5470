"""Shared pytest fixtures: paths to ../shared data, tool requirements, and real services on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LESIONTRACK_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# tests receive in-process unless a test asks for several receiver processes (dicom.receiver_processes)
os.environ.setdefault("LESIONTRACK_DICOM__RECEIVER_PROCESSES", "1")


def unavailable(reason: str) -> None:
    """Skip on a developer machine that lacks something the test needs — but fail in CI, which provides it."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def require_tool(*names: str) -> None:
    """Skip when a command-line tool is missing — but fail in CI, which installs them all."""
    missing = [n for n in names if shutil.which(n) is None and not Path(n).exists()]
    if missing:
        unavailable(f"required tool(s) not installed: {', '.join(missing)} (.ci/run installs them)")


def require_shared_data(*relative: str) -> Path:
    """Path inside ../shared/data; skip outside CI if absent, fail in CI."""
    path = SHARED_DATA.joinpath(*relative)
    if not path.exists():
        unavailable(f"test data missing: {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server on a free loopback port, in a temporary directory, for the session."""
    from tests.services import PostgresServer

    server = PostgresServer(tmp_path_factory.mktemp("pg"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


_pg_databases = iter(range(1, 1_000_000))


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """URL of a fresh, empty database on the session's PostgreSQL server (one per test)."""
    return postgres_server.create_database(f"lt_test_{next(_pg_databases)}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lt.sqlite3'}"
