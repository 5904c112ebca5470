"""Fuzz benchmark of the Storage SCP (issue 19): ≥ 10,000 inputs — mutated C-STOREs (17 operators on real CT
seeds, plus unmutated controls) and malformed PDUs before and after association — against the product SCP
running in its own process. Reports crashes, hangs, invalid datasets accepted as valid (independent oracle:
pydicom full parse + pixel decode + dcmdump; an accepted invalid one that the integrity check before analysis
flags counts as held, not as accepted-valid), refused controls, and the SCP process's RSS over the run.

    .venv/bin/python bench/fuzz.py [--cstores 8500] [--pdus 1500] [--seed 19]

Prints one JSON document. The generator and oracle are ``tests/support/fuzz_harness.py`` (the CI run uses the same).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _serve(root: str, port_queue: mp.Queue, stop: EventType) -> None:
    """The SCP process: product StorageSCP on a free loopback port; logs to root/scp.log."""
    import logging
    import threading

    from lesiontrack.config.settings import load_settings
    from lesiontrack.db.session import make_engine, make_session_factory, upgrade
    from lesiontrack.dicom_node.inbound.scp import StorageSCP

    logging.basicConfig(filename=f"{root}/scp.log", level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    # the receiver processes log to stderr (inherited): into a file of the run, read back for errors and PHI
    err = os.open(f"{root}/receivers.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(err, 2)
    threading.excepthook = lambda a: logging.getLogger("thread").error(
        "THREAD DIED %s: %s: %s", a.thread.name if a.thread else "?", a.exc_type.__name__, a.exc_value
    )
    url = f"sqlite:///{root}/lt.sqlite3"
    upgrade(url)
    settings = load_settings(
        None,
        data_dir=Path(root) / "data",
        database_url=url,
        dicom={
            "port": 0,
            "bind_address": "127.0.0.1",
            "fsync": False,
            "series_quiet_seconds": 3600,
            "allowed_calling_aes": ["FUZZER", "ECHOSCU"],
            "pdu_read_seconds": 1.5,
            "acse_timeout_seconds": 2.0,
            "network_timeout_seconds": 3.0,
        },
    )
    scp = StorageSCP(settings, make_session_factory(make_engine(url))).start()
    port_queue.put(scp.port)
    stop.wait()
    scp.stop()


def _echo(port: int) -> bool:
    import subprocess

    r = subprocess.run(
        ["echoscu", "-to", "15", "-ta", "15", "-td", "15", "-aet", "ECHOSCU", "-aec", "LESIONTRACK", "127.0.0.1",
         str(port)],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return r.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cstores", type=int, default=8500)
    ap.add_argument("--pdus", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--chunk", type=int, default=500, help="inputs between RSS samples / echo checks")
    args = ap.parse_args()

    from sqlalchemy import select

    from lesiontrack.db.models import Instance
    from lesiontrack.db.session import make_engine, make_session_factory, session_scope
    from lesiontrack.dicom_node.inbound.integrity import check_instance_file
    from tests.support.fuzz_harness import (
        FuzzReport,
        cstore_mutants,
        pdu_inputs,
        phi_in,
        rss_kib,
        run_cstores,
        run_pdus,
    )

    root = Path(tempfile.mkdtemp(prefix="lt-fuzz-"))
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(str(root), q, stop), daemon=True)
    proc.start()
    port = int(q.get(timeout=120))
    sf = make_session_factory(make_engine(f"sqlite:///{root}/lt.sqlite3"))

    def stored(uid: str) -> Path | None:
        # Success means on disk; the row follows from the SCP's background indexer (milliseconds)
        deadline = time.monotonic() + 10
        while True:
            with session_scope(sf) as s:
                p = s.scalar(select(Instance.file_path).where(Instance.sop_instance_uid == uid))
            if p or time.monotonic() > deadline:
                return Path(p) if p else None
            time.sleep(0.01)

    report = FuzzReport()
    rss: list[dict[str, int]] = [{"inputs": 0, "rss_kib": rss_kib(proc.pid)}]
    echo_failures = 0
    import itertools

    t1 = time.monotonic()
    mutants = cstore_mutants(args.cstores, args.seed)  # generated lazily, chunk by chunk
    while chunk := list(itertools.islice(mutants, args.chunk)):
        run_cstores(port, iter(chunk), root / "work", stored, check_instance_file, report)
        rss.append({"inputs": report.inputs, "rss_kib": rss_kib(proc.pid)})
        echo_failures += 0 if _echo(port) else 1
    cstore_s = time.monotonic() - t1
    t2 = time.monotonic()
    pdus = list(pdu_inputs(args.pdus, args.seed))
    for i in range(0, len(pdus), args.chunk):
        run_pdus(port, iter(pdus[i : i + args.chunk]), report, deadline_s=10.0)
        rss.append({"inputs": report.inputs, "rss_kib": rss_kib(proc.pid)})
        echo_failures += 0 if _echo(port) else 1
    pdu_s = time.monotonic() - t2
    alive = proc.is_alive()
    stop.set()
    proc.join(60)
    log = (root / "scp.log").read_text(errors="replace") if (root / "scp.log").exists() else ""
    receivers_log = (root / "receivers.log").read_text(errors="replace") if (root / "receivers.log").exists() else ""
    log_lines = log.splitlines() + [ln.split(" ", 2)[-1] for ln in receivers_log.splitlines()]
    errors = [ln for ln in log_lines if ln.startswith(("ERROR", "CRITICAL")) or " ERROR " in ln[:40]]
    base = rss[1]["rss_kib"] if len(rss) > 1 else rss[0]["rss_kib"]
    out = {
        "benchmark": "fuzz (issue 19)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "command": "bench/fuzz.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "inputs": report.inputs,
        "cstore_inputs": args.cstores,
        "pdu_inputs": len(pdus),
        "seconds": {"cstores_incl_generation_and_oracle": round(cstore_s, 1), "pdus": round(pdu_s, 1)},
        "crashes": len(report.crashes) + sum(1 for ln in errors if "THREAD DIED" in ln) + (0 if alive else 1),
        "hangs": len(report.hangs),
        "invalid_accepted_as_valid": len(report.invalid_accepted),
        "accepted_held_before_analysis": report.outcomes.get("accepted_held_before_analysis", 0),
        "phi_in_logs": phi_in(log + receivers_log),
        "controls_refused": len(report.controls_refused),
        "echo_failures_between_chunks": echo_failures,
        "scp_error_log_lines": len(errors),
        "scp_tracebacks_in_log": sum(1 for ln in log_lines if "Traceback" in ln),
        "scp_log_lines": len(log_lines),
        "outcomes": dict(report.outcomes.most_common()),
        "by_category": {k: dict(v) for k, v in sorted(report.by_category.items())},
        "rss_kib": {
            "start": rss[0]["rss_kib"],
            "after_first_chunk": base,
            "end": rss[-1]["rss_kib"],
            "max": max(r["rss_kib"] for r in rss),
            "growth_after_first_chunk_kib": rss[-1]["rss_kib"] - base,
            "samples": rss,
        },
        "examples": {
            "crashes": report.crashes[:5],
            "hangs": report.hangs[:5],
            "invalid_accepted": report.invalid_accepted[:5],
            "controls_refused": report.controls_refused[:5],
            "error_log": errors[:5],
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
