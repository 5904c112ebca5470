"""Shared pytest fixtures: ../shared data, real services on loopback, a running DICOM node (their building
blocks and the other shared helpers are in tests/support)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.tools import require_shared_data

# tests receive in-process unless a test asks for several receiver processes (dicom.receiver_processes)
os.environ.setdefault("LESIONTRACK_DICOM__RECEIVER_PROCESSES", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server on a free loopback port, in a temporary directory, for the session."""
    from tests.support.services import PostgresServer

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
