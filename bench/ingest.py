"""Ingest benchmark: dcmtk ``storescu`` → dcmtk ``storescp`` (anchor) vs → the LesionTrack Storage SCP, loopback.

Four ≥300-instance CT series are generated from one real slice (new UIDs per instance).

1. **One association**: runs alternate between storescp, the LesionTrack SCP (as configured for production:
   ``dicom.receiver_processes`` = CPU cores unless ``--processes``) and pynetdicom's no-op receiver (the same
   pynetdicom SCP, in-process, with a handler that stores nothing: the library's own ceiling). Both sides get
   ``TCP_NODELAY=1``; storescp writes bit-preserving (``+B``), like our raw-bytes path.
2. **Concurrency curve**: the same 4 × N instances sent by 1, 4 and 16 concurrent ``storescu`` processes (at 16,
   each series is split over 4 associations, which the receiver processes serve independently) to
   ``storescp --fork`` and to LesionTrack; lost = sent − (files on disk ∩ rows in the database), duplicated =
   rows − distinct SOP Instance UIDs.
3. **kill -9 mid-series**: 4 pynetdicom senders (threads) send a series each; after a third of the instances
   were acknowledged one receiver process serving an open association is killed with SIGKILL; the service
   restarts it, senders whose association dropped reconnect and retry what was not acknowledged.
   Lost = acknowledged (or finally sent) instances without a file and a row; duplicated as above.

Every run starts from the same settled machine (:func:`settle`): what earlier runs wrote is moved aside and written
back, the clean page cache is dropped (as root) and the senders' inputs are read back in. The received files are
removed only when the benchmark ends (a full run keeps about 7 GB under the temporary folder until then).

Prints one JSON document (with the load average before and after).

    .venv/bin/python bench/ingest.py [--instances 320] [--repeats 3] [--fsync] [--processes N]
"""

from __future__ import annotations

import argparse
import contextlib
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
LEVELS = (1, 4, 16)


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


def set_aside(path: Path, root: Path) -> None:
    """Move a receiver's files out of the way and write them back (``sync``), so that every run starts from the
    same settled file system: nothing dirty in the page cache, no inode freed moments ago. The files are removed
    when the benchmark ends.

    Removing them between runs made each run's conditions depend on the one before: ext4 looks past inodes
    freed moments ago when it allocates new ones (``recently_deleted`` in ``ext4_create``: 12 % of a receiver
    process's samples under ``perf`` after the previous receiver's files were removed), and pages freed moments
    ago are cheaper to write into on this VM (creating 0.5 MB files: 0.13 ms each right after 1,280 were removed,
    0.31–0.36 ms otherwise). Keeping them without writing them back slowed the later runs instead: past
    ``vm.dirty_background_ratio`` the kernel's writeback of earlier runs shares the two cores.
    """
    spent = root / "spent"
    spent.mkdir(exist_ok=True)
    if path.exists():
        path.rename(spent / f"{path.name}-{time.monotonic_ns()}")
    settle(root)


def settle(root: Path) -> None:
    """Write back everything dirty and, where allowed (root), drop the clean page cache; then read what the senders
    need back into it (the series under ``root``, ``storescu`` itself), so that no sender reads from the disk
    during a run."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    files = sorted(root.glob("series*/*.dcm"))
    for p in files:
        p.read_bytes()
    if files:  # and storescu's program, libraries and data dictionary: one send to a port nobody listens on
        storescu(free_port(), files[:1], "NOBODY").communicate()


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
        set_aside(self.out, self.root)


class LesionTrackSCP:
    name = "LesionTrack SCP"
    noop = False

    def __init__(self, root: Path, fsync: bool, processes: int = 0) -> None:
        self.root, self.fsync, self.processes = root, fsync, processes

    def __enter__(self) -> LesionTrackSCP:
        from lesiontrack.config.settings import load_settings
        from lesiontrack.db.session import make_engine, make_session_factory, upgrade
        from lesiontrack.dicom_node.inbound.scp import StorageSCP

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
                "max_associations": 20,
                "max_connections_per_peer": 20,
                "receiver_processes": 1 if self.noop else self.processes,
            },
        )
        self.engine = make_engine(url)
        self.scp = StorageSCP(settings, make_session_factory(self.engine))
        if self.noop:
            self.count = 0

            def on_store(event: object) -> int:  # receive, answer Success, keep nothing
                self.count += 1
                return 0

            assert self.scp.receiver is not None
            self.scp.receiver._on_store = on_store  # type: ignore[method-assign]  # the no-op receiver
        self.scp.start()
        self.port = self.scp.port
        return self

    def rows(self) -> tuple[int, int]:
        """(instance rows, distinct SOP Instance UIDs)."""
        from sqlalchemy import distinct, func, select

        from lesiontrack.db.models import Instance

        with self.engine.connect() as c:
            n = int(c.execute(select(func.count()).select_from(Instance)).scalar() or 0)
            d = int(c.execute(select(func.count(distinct(Instance.sop_instance_uid)))).scalar() or 0)
        return n, d

    def received(self, expected: int | None = None) -> int:
        if self.noop:
            return self.count
        # Success means on disk; the rows follow from the indexers: wait (bounded) until they stop growing
        deadline, last = time.monotonic() + 60, -1
        while time.monotonic() < deadline:
            rows = self.rows()[0]
            if rows == expected or (expected is None and rows == last):
                break
            last = rows
            time.sleep(0.2)
        files = sum(1 for p in (self.dir / "data" / "dicom").rglob("*.dcm"))
        return min(self.rows()[1], files)

    def duplicated(self) -> int:
        n, d = self.rows()
        return n - d

    def __exit__(self, *exc: object) -> None:
        self.scp.stop()
        self.engine.dispose()
        set_aside(self.dir, self.root)


class PynetdicomFloor(LesionTrackSCP):
    """The same SCP and network path with a handler that stores nothing: pynetdicom's own ceiling."""

    name = "pynetdicom no-op floor"
    noop = True


def kill9_run(tmp: Path, series: list[list[Path]], fsync: bool, processes: int) -> dict[str, object]:
    """Senders (pynetdicom, one thread per series) retry what was not acknowledged after a receiver is killed."""
    import signal
    import threading

    from pydicom import dcmread
    from pynetdicom import AE, _config
    from sqlalchemy import select

    from lesiontrack.db.models import OpenTransfer

    _config.STORE_SEND_CHUNKED_DATASET = True
    total = sum(len(s) for s in series)
    acked: set[str] = set()
    lock = threading.Lock()
    retries = [0]
    sop_of = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for s in series for p in s}

    def sender(files: list[Path]) -> None:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        todo = list(files)
        for _attempt in range(20):
            assoc = ae.associate("127.0.0.1", recv.port, ae_title="LESIONTRACK")
            if not assoc.is_established:
                time.sleep(0.2)
                continue
            while todo and assoc.is_established:
                try:
                    rsp = assoc.send_c_store(todo[0])
                except Exception:
                    break
                if "Status" in rsp and int(rsp.Status) == 0:
                    with lock:
                        acked.add(sop_of[todo[0]])
                    todo.pop(0)
                else:
                    break
            if assoc.is_established:
                assoc.release()
            if not todo:
                return
            with lock:
                retries[0] += 1

    with LesionTrackSCP(tmp, fsync, processes) as recv:
        threads = [threading.Thread(target=sender, args=(s,)) for s in series]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        while len(acked) < total // 3:
            time.sleep(0.01)
        with recv.engine.connect() as c:
            pids = sorted(set(c.scalars(select(OpenTransfer.pid))))
        victim = pids[0] if pids else recv.scp.receiver_pids()[0]
        os.kill(victim, signal.SIGKILL)
        acked_at_kill = len(acked)
        for t in threads:
            t.join()
        secs = time.perf_counter() - t0
        got = recv.received(total)
        dup = recv.duplicated()
        return {
            "sent": total,
            "killed_pid": victim,
            "acknowledged_before_kill": acked_at_kill,
            "acknowledged": len(acked),
            "sender_retries": retries[0],
            "received": got,
            "lost": total - got,
            "duplicated": dup,
            "seconds": round(secs, 3),
            "receiver_processes_after": len(recv.scp.receiver_pids()),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=320, help="instances per series (4 series)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fsync", action="store_true", help="LesionTrack fsyncs every file (storescp never does)")
    ap.add_argument("--processes", type=int, default=0, help="dicom.receiver_processes (0 = CPU cores)")
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--single-only", action="store_true", help="only part 1 (one association), no curve, no kill")
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not installed (apt-get install dcmtk)")
    from lesiontrack.dicom_node.inbound.scp import receiver_processes

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="lt-bench-ingest-"))
    try:
        series = [make_series(tmp / f"series{k}", args.instances, args.source) for k in range(4)]
        mb = sum(p.stat().st_size for p in series[0]) / 1e6
        settle(tmp)  # the generated series on disk before the first run (see set_aside)
        single: dict[str, list[dict]] = {Storescp.name: [], LesionTrackSCP.name: [], PynetdicomFloor.name: []}
        for _ in range(args.repeats):
            for recv in (
                Storescp(tmp, fork=False),
                LesionTrackSCP(tmp, args.fsync, args.processes),
                PynetdicomFloor(tmp, False),
            ):
                with recv:
                    aec = "LESIONTRACK" if isinstance(recv, LesionTrackSCP) else "STORESCP"
                    secs, rcs = run_senders(recv.port, [series[0]], aec)
                    got = recv.received(args.instances) if isinstance(recv, LesionTrackSCP) else recv.received()
                single[recv.name].append(
                    {
                        "seconds": round(secs, 3),
                        "received": got,
                        "exit_codes": rcs,
                        "instances_per_s": round(args.instances / secs, 1),
                        "mb_per_s": round(mb / secs, 1),
                    }
                )
        all_files = [p for s in series for p in s]
        total = len(all_files)
        curve: dict[str, dict[str, dict]] = {Storescp.name + " --fork": {}, LesionTrackSCP.name: {}}
        for level in () if args.single_only else LEVELS:
            # every series split into level/4 associations (or, at 1, all four series over one association)
            batches = [all_files] if level == 1 else [b for s in series for b in _split(s, level // 4)]
            for recv in (Storescp(tmp, fork=True), LesionTrackSCP(tmp, args.fsync, args.processes)):
                with recv:
                    aec = "LESIONTRACK" if isinstance(recv, LesionTrackSCP) else "STORESCP"
                    secs, rcs = run_senders(recv.port, batches, aec)
                    if isinstance(recv, LesionTrackSCP):
                        got, dup = recv.received(total), recv.duplicated()
                    else:
                        got, dup = recv.received(), 0
                key = Storescp.name + " --fork" if isinstance(recv, Storescp) else LesionTrackSCP.name
                curve[key][str(level)] = {
                    "seconds": round(secs, 3),
                    "sent": total,
                    "received": got,
                    "lost": total - got,
                    "duplicated": dup,
                    "exit_codes": sorted(set(rcs)),
                    "instances_per_s": round(total / secs, 1),
                    "mb_per_s": round(mb * 4 / secs, 1),
                }
        kill = None if args.skip_kill or args.single_only else kill9_run(tmp, series, args.fsync, args.processes)

        def median(name: str, key: str) -> float:
            vals = sorted(r[key] for r in single[name])
            return vals[len(vals) // 2]

        lt1 = median(LesionTrackSCP.name, "instances_per_s")
        ratio_floor = lt1 / median(PynetdicomFloor.name, "instances_per_s")
        lt_curve = curve[LesionTrackSCP.name]
        scale4 = lt_curve["4"]["instances_per_s"] / lt_curve["1"]["instances_per_s"] if lt_curve else float("nan")
        c16 = lt_curve.get("16", {"lost": None, "duplicated": None})
        result = {
            "benchmark": "ingest",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "load_average": {
                "before": [round(x, 2) for x in load_before],
                "after": [round(x, 2) for x in os.getloadavg()],
            },
            "series": {
                "instances": args.instances,
                "series": 4,
                "megabytes_per_series": round(mb, 1),
                "source": str(args.source.name),
                "transfer_syntax": "Explicit VR Little Endian",
            },
            "settled_before_each_run": {
                "sync": True,
                "page_cache_dropped": os.access("/proc/sys/vm/drop_caches", os.W_OK),
                "received_files_removed": "at the end",
            },
            "lesiontrack_fsync": args.fsync,
            "lesiontrack_receiver_processes": receiver_processes(args.processes),
            "single_association": {
                "runs": single,
                "median_instances_per_s": {n: median(n, "instances_per_s") for n in single},
                "median_mb_per_s": {n: median(n, "mb_per_s") for n in single},
                "ratio_lesiontrack_over_pynetdicom_floor": round(ratio_floor, 3),
                "ratio_lesiontrack_over_storescp": round(lt1 / median(Storescp.name, "instances_per_s"), 3),
            },
            "concurrency_curve": curve,
            "lesiontrack_scaling_4_over_1": round(scale4, 3),
            "kill9_mid_series": kill,
            "targets": {
                "single_over_floor_min": 0.9,
                "scaling_4_over_1_min": 1.7,
                "single_met": ratio_floor >= 0.9,
                "scaling_met": scale4 >= 1.7 if lt_curve else None,
                "c16_lost_duplicated": [c16["lost"], c16["duplicated"]],
                "kill9_lost_duplicated": None if kill is None else [kill["lost"], kill["duplicated"]],
            },
        }
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _split(files: list[Path], parts: int) -> list[list[Path]]:
    k = -(-len(files) // parts)
    return [files[i : i + k] for i in range(0, len(files), k)]


if __name__ == "__main__":
    main()
