"""Shared pytest fixtures: ../shared data, real services on loopback, a running DICOM node (their building
blocks and the other shared helpers are in tests/support)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.tools import require_shared_data

if TYPE_CHECKING:
    from tests.support.dicom_node import Node

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


@pytest.fixture
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """A running DICOM node (the product's StorageSCP on a loopback port over its own database and folder). A module
    or test sets it up with ``pytest.mark.dicom_node(min_slices=..., **dicom settings)``; unmarked, it accepts the
    calling AE titles STORESCU, ORTHANC and PYSCU."""
    from tests.support.dicom_node import running_node  # only the DICOM-node tests pay for the SCP's imports

    marker = request.node.get_closest_marker("dicom_node")
    options = dict(marker.kwargs) if marker else {"allowed_calling_aes": ["STORESCU", "ORTHANC", "PYSCU"]}
    with running_node(tmp_path, **options) as n:
        yield n


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs a command in process (``setup_logging``) leaves a handler on the root logger writing to that
    test's captured stderr, which pytest then closes; a later test's threads logging through it print "--- Logging
    error ---" tracebacks. Handlers a test added (pytest's own aside) and the root level are undone after it."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)
