"""CPU seconds per instance of the receiving side of one association (issue 32): what the wall-clock ingest benchmark
(``bench/ingest.py``) cannot show on a shared machine.

dcmtk ``storescu`` sends one 320-instance CT series (``--source`` with new UIDs per instance) over one association
to the Storage SCP, set up as ``bench/ingest.py`` sets it up (this process is the service; ``receiver_processes``
= CPU cores unless ``--processes``, ``fsync`` off). Counted: user + system CPU of the service process (getrusage)
and of every receiver process (``/proc/<pid>/stat``), from just before the send until every instance has its row;
the receivers' start-up is not counted. CPU time barely depends on what else the machine runs, so two trees can be
compared on a busy machine by alternating them (the lead's idle wall-clock run stays the figure of record).
``--floor`` adds pynetdicom's no-op receiver (one process, a handler that stores nothing) as in ``bench/ingest.py``.

Works on this tree (``lesiontrack.<layer>`` imports) and, with ``LESIONTRACK_BARE_LAYERS=1`` and ``PYTHONPATH`` at
an export of a commit before the namespace (issue 33), on older code: e.g. 628cdd6, the code before issue 32's door.

    .venv/bin/python bench/ingest_cpu.py [--instances 320] [--repeats 3] [--floor] [--processes N]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("LESIONTRACK_BARE_LAYERS"):
    sys.path.insert(0, str(REPO))
PREFIX = "" if os.environ.get("LESIONTRACK_BARE_LAYERS") else "lesiontrack."
SOURCE = REPO.parent / "shared" / "data" / "interop" / "ct_gantry_tilt_ge" / "01.dcm"
if not SOURCE.exists():
    SOURCE = Path("/work/shared/data/interop/ct_gantry_tilt_ge/01.dcm")
TICK = os.sysconf("SC_CLK_TCK")


def _module(name: str) -> Any:
    return importlib.import_module(PREFIX + name)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_series(dest: Path, n: int, source: Path) -> list[Path]:
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    dest.mkdir(parents=True, exist_ok=True)
    ds = dcmread(source)
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        p = dest / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def one_run(root: Path, files: list[Path], noop: bool, processes: int) -> dict[str, float]:
    """One association of ``files``; CPU milliseconds per instance of the service and the receivers."""
    from sqlalchemy import func, select

    settings_mod, sess, scp_mod, models = (
        _module("config.settings"), _module("db.session"), _module("dicom_node.inbound.scp"), _module("db.models")
    )  # fmt: skip
    d = Path(tempfile.mkdtemp(dir=root))
    url = f"sqlite:///{d / 'lt.sqlite3'}"
    sess.upgrade(url)
    settings = settings_mod.load_settings(
        None,
        data_dir=d / "data",
        database_url=url,
        dicom={
            "port": 0, "bind_address": "127.0.0.1", "fsync": False, "series_quiet_seconds": 3600,
            "max_associations": 20, "max_connections_per_peer": 20, "receiver_processes": 1 if noop else processes,
        },
    )  # fmt: skip
    engine = sess.make_engine(url)
    scp = scp_mod.StorageSCP(settings, sess.make_session_factory(engine))
    count = [0]
    if noop:

        def on_store(event: object) -> int:  # receive, answer Success, keep nothing
            count[0] += 1
            return 0

        scp.receiver._on_store = on_store
    scp.start()
    try:
        time.sleep(3)  # the receivers have imported everything and accept
        pids = [p for p in scp.receiver_pids() if p != os.getpid()]
        c0, s0 = {p: proc_cpu(p) for p in pids}, self_cpu()
        t0 = time.perf_counter()
        r = subprocess.run(
            ["storescu", "-aet", "BENCH", "-aec", "LESIONTRACK", "127.0.0.1", str(scp.port), *map(str, files)],
            env=dict(os.environ, TCP_NODELAY="1"),
            capture_output=True,
        )
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(r.stderr.decode(errors="replace")[-500:])
        n = len(files)
        deadline, got = time.monotonic() + 120, 0
        while not noop and got < n and time.monotonic() < deadline:
            with engine.connect() as c:
                got = int(c.execute(select(func.count()).select_from(models.Instance)).scalar() or 0)
            time.sleep(0.05)
        if (count[0] if noop else got) != n:
            raise RuntimeError(f"{count[0] if noop else got} of {n} instances received")
        receivers = sum(proc_cpu(p) - c0[p] for p in pids)
        service = self_cpu() - s0
    finally:
        scp.stop()
        engine.dispose()
    return {
        "wall_s": round(wall, 3),
        "service_cpu_ms_per_instance": round(1000 * service / n, 3),
        "receivers_cpu_ms_per_instance": round(1000 * receivers / n, 3),
        "total_cpu_ms_per_instance": round(1000 * (service + receivers) / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", type=int, default=0, help="receiver processes (0: one per CPU core)")
    ap.add_argument("--floor", action="store_true", help="also pynetdicom's no-op receiver")
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lt-ingest-cpu-"))
    files = make_series(root / "series", args.instances, args.source)
    runs: dict[str, list[dict[str, float]]] = {"lesiontrack": []}
    if args.floor:
        runs["pynetdicom_noop_floor"] = []
    for _ in range(args.repeats):
        if args.floor:
            runs["pynetdicom_noop_floor"].append(one_run(root, files, True, args.processes))
        runs["lesiontrack"].append(one_run(root, files, False, args.processes))
    out: dict[str, object] = {
        "benchmark": "ingest CPU per instance, one association (issue 32)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "load_average": os.getloadavg(),
        "code": str(Path(_module("dicom_node.inbound.scp").__file__).resolve().parents[1]),
        "command": "bench/ingest_cpu.py " + " ".join(sys.argv[1:]),
        "instances": args.instances,
        "runs": runs,
    }
    for name, rs in runs.items():
        for key in ("service_cpu_ms_per_instance", "receivers_cpu_ms_per_instance", "total_cpu_ms_per_instance"):
            values = sorted(r[key] for r in rs)
            out[f"{name}_median_{key}"] = values[len(values) // 2]
    subprocess.run(["rm", "-rf", str(root)], check=False)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
