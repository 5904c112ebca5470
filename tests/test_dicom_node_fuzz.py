"""A bounded fuzz run in CI (issues 19, 32): a few hundred mutated C-STOREs and malformed PDUs from a fixed seed
against a real Storage SCP. Nothing crashes or hangs, no invalid dataset is stored (each accepted one passes the
independent oracle; none needs the integrity check before analysis to hold it), every unmutated control is
accepted, the node still answers a C-ECHO, pynetdicom logs no traceback, and the identifiers planted in the
seeds appear in no log line at any level. The long run (≥ 10,000 inputs) with figures is ``bench/fuzz.py``
(docs/benchmarks.md)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from lesiontrack.db.models import Instance
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.integrity import check_instance_file
from tests.support.dicom_node import Node
from tests.support.fuzz_harness import FuzzReport, cstore_mutants, pdu_inputs, phi_in, run_cstores, run_pdus
from tests.support.pdu import echo
from tests.support.tools import require_tool

N_CSTORE = 360
N_PDU = 144


def test_bounded_fuzz_no_crash_no_hang_no_invalid_accepted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_tool("dcmdump")
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    caplog.set_level(logging.DEBUG, logger="pydicom")
    caplog.set_level(logging.WARNING)
    n = Node(
        tmp_path,
        allowed_calling_aes=["FUZZER", "STORESCU"],
        series_quiet_seconds=3600,  # completion is not under test here
        pdu_read_seconds=1.5,
        acse_timeout_seconds=2.0,
        network_timeout_seconds=3.0,
    )
    report = FuzzReport()
    thread_errors: list[str] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda a: thread_errors.append(
        f"{a.thread.name if a.thread else '?'}: {a.exc_type.__name__}: {a.exc_value}"
    )

    def stored(uid: str) -> Path | None:
        n.scp.settle()  # Success means on disk; the row follows from the background indexer
        with session_scope(n.sf) as s:
            p = s.scalar(select(Instance.file_path).where(Instance.sop_instance_uid == uid))
        return Path(p) if p else None

    try:
        with n.scp:
            run_cstores(n.port, cstore_mutants(N_CSTORE), tmp_path / "work", stored, check_instance_file, report)
            run_pdus(n.port, pdu_inputs(N_PDU), report, deadline_s=10.0)
            assert echo(n.port) == 0
    finally:
        threading.excepthook = previous_hook
        n.engine.dispose()
    assert thread_errors == []  # no association or DUL thread died of an exception
    assert report.inputs == N_CSTORE + N_PDU
    assert report.crashes == []
    assert report.hangs == []
    assert report.invalid_accepted == []
    assert report.controls_refused == []
    assert report.by_category["control"]["accepted_valid"] == report.by_category["control"].total()
    refused = sum(v for k, v in report.outcomes.items() if k.startswith("refused_"))
    assert refused > N_CSTORE // 2  # the mutants mostly are invalid, and the door refuses them
    noisy = [
        r for r in caplog.records if r.name.startswith("pynetdicom") and (r.exc_info or r.levelno >= logging.ERROR)
    ]
    assert noisy == []
    ours = [r for r in caplog.records if r.name.startswith("lesiontrack.dicom_node") and r.levelno >= logging.ERROR]
    assert ours == []
    # issue 32: nothing invalid stored, not even held for the check before analysis; no identifier in any log line
    assert report.outcomes["accepted_held_before_analysis"] == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert phi_in(logged) == []
