"""Ingest benchmark: dcmtk ``storescu`` → dcmtk ``storescp`` (anchor) vs → the LesionTrack Storage SCP, loopback.

A ≥300-instance CT series is generated from one real slice (new UIDs per instance). Runs alternate between the
receivers (plus a no-op pynetdicom handler, to show the library's own ceiling); both sides get ``TCP_NODELAY=1``
(dcmtk reads it from the environment; our SCP sets it on accepted sockets) and storescp writes bit-preserving
(``+B``), like our raw-bytes path. Then 4 concurrent
``storescu`` processes (one series each) go to each receiver (storescp ``--fork``); lost instances are counted
from what each receiver has on disk (and, for LesionTrack, in its database). Prints one JSON document.

    .venv/bin/python bench/ingest.py [--instances 320] [--repeats 3] [--fsync]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCE = REPO.parent / "shared" / "data" / "interop" / "ct_gantry_tilt_ge" / "01.dcm"
ENV = dict(os.environ, TCP_NODELAY="1")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


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


def storescu(port: int, files: list[Path], aec: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def run_senders(port: int, batches: list[list[Path]], aec: str) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    procs = [storescu(port, b, aec) for b in batches]
    rcs = []
    for p in procs:
        _, err = p.communicate()
        rcs.append(p.returncode)
        if p.returncode != 0:
            print(err.decode(errors="replace")[-500:], file=sys.stderr)
    return time.perf_counter() - t0, rcs


class Storescp:
    name = "dcmtk storescp"

    def __init__(self, root: Path, fork: bool) -> None:
        self.root, self.fork = root, fork

    def __enter__(self) -> Storescp:
        self.out = self.root / "storescp"
        self.out.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["storescp", *(["--fork"] if self.fork else []), "+B", "-od", str(self.out), str(self.port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def received(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.out, ignore_errors=True)


class LesionTrackSCP:
    name = "LesionTrack SCP"
    noop = False

    def __init__(self, root: Path, fsync: bool) -> None:
        self.root, self.fsync = root, fsync

    def __enter__(self) -> LesionTrackSCP:
        from config.settings import load_settings
        from db.session import make_engine, make_session_factory, upgrade
        from dicom_node.scp import StorageSCP

        self.dir = self.root / "lesiontrack"
        url = f"sqlite:///{self.dir / 'lt.sqlite3'}"
        upgrade(url)
        settings = load_settings(
            None,
            data_dir=self.dir / "data",
            database_url=url,
            dicom={
                "port": 0,
                "bind_address": "127.0.0.1",
                "fsync": self.fsync,
                "series_quiet_seconds": 3600,
                "max_associations": 10,
            },
        )
        self.engine = make_engine(url)
        self.scp = StorageSCP(settings, make_session_factory(self.engine))
        if self.noop:
            self.count = 0

            def on_store(event: object) -> int:  # receive, answer Success, keep nothing
                self.count += 1
                return 0

            self.scp._on_store = on_store  # type: ignore[method-assign]  # the no-op receiver replaces the handler
        self.scp.start()
        self.port = self.scp.port
        return self

    def received(self) -> int:
        if self.noop:
            return self.count
        from sqlalchemy import func, select

        from db.models import Instance

        with self.engine.connect() as c:
            rows = int(c.execute(select(func.count()).select_from(Instance)).scalar() or 0)
        files = sum(1 for p in (self.dir / "data" / "dicom").rglob("*.dcm"))
        return min(rows, files)

    def __exit__(self, *exc: object) -> None:
        self.scp.stop()
        self.engine.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)


class PynetdicomFloor(LesionTrackSCP):
    """The same SCP and network path with a handler that stores nothing: pynetdicom's own ceiling."""

    name = "pynetdicom no-op floor"
    noop = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--fsync", action="store_true", help="LesionTrack fsyncs every file (storescp never does)")
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not installed (apt-get install dcmtk)")
    tmp = Path(tempfile.mkdtemp(prefix="lt-bench-ingest-"))
    try:
        series = [make_series(tmp / f"series{k}", args.instances, args.source) for k in range(args.concurrent)]
        mb = sum(p.stat().st_size for p in series[0]) / 1e6
        single: dict[str, list[dict]] = {Storescp.name: [], LesionTrackSCP.name: [], PynetdicomFloor.name: []}
        for _ in range(args.repeats):
            for recv in (Storescp(tmp, fork=False), LesionTrackSCP(tmp, args.fsync), PynetdicomFloor(tmp, False)):
                with recv:
                    aec = "LESIONTRACK" if isinstance(recv, LesionTrackSCP) else "STORESCP"
                    secs, rcs = run_senders(recv.port, [series[0]], aec)
                    got = recv.received()
                single[recv.name].append(
                    {
                        "seconds": round(secs, 3),
                        "received": got,
                        "exit_codes": rcs,
                        "instances_per_s": round(args.instances / secs, 1),
                        "mb_per_s": round(mb / secs, 1),
                    }
                )
        concurrent = {}
        for recv in (Storescp(tmp, fork=True), LesionTrackSCP(tmp, args.fsync)):
            with recv:
                aec = "LESIONTRACK" if isinstance(recv, LesionTrackSCP) else "STORESCP"
                secs, rcs = run_senders(recv.port, series, aec)
                got = recv.received()
            total = args.instances * args.concurrent
            concurrent[recv.name] = {
                "seconds": round(secs, 3),
                "sent": total,
                "received": got,
                "lost": total - got,
                "exit_codes": rcs,
                "instances_per_s": round(total / secs, 1),
                "mb_per_s": round(mb * args.concurrent / secs, 1),
            }

        def best(name: str) -> dict:
            return min(single[name], key=lambda r: r["seconds"])

        def median(name: str, key: str) -> float:
            vals = sorted(r[key] for r in single[name])
            return vals[len(vals) // 2]

        ratio = median(LesionTrackSCP.name, "instances_per_s") / median(Storescp.name, "instances_per_s")
        result = {
            "benchmark": "ingest",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "series": {
                "instances": args.instances,
                "megabytes": round(mb, 1),
                "source": str(args.source.name),
                "transfer_syntax": "Explicit VR Little Endian",
            },
            "lesiontrack_fsync": args.fsync,
            "single_association": {
                "runs": single,
                "median_instances_per_s": {n: median(n, "instances_per_s") for n in single},
                "median_mb_per_s": {n: median(n, "mb_per_s") for n in single},
                "best": {n: best(n) for n in single},
                "ratio_lesiontrack_over_storescp": round(ratio, 3),
                "ratio_pynetdicom_floor_over_storescp": round(
                    median(PynetdicomFloor.name, "instances_per_s") / median(Storescp.name, "instances_per_s"), 3
                ),
            },
            "concurrent_associations": {
                "senders": args.concurrent,
                **concurrent,
                "ratio_lesiontrack_over_storescp": round(
                    concurrent[LesionTrackSCP.name]["instances_per_s"] / concurrent[Storescp.name]["instances_per_s"], 3
                ),
            },
            "targets": {
                "ratio_single_min": 0.5,
                "lost_concurrent": 0,
                "met": ratio >= 0.5 and concurrent[LesionTrackSCP.name]["lost"] == 0,
            },
        }
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
