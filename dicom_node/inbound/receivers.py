"""Several receiver processes behind one DICOM port (``dicom.receiver_processes`` > 1; issue 18).

One process serves all of an SCP's associations under one GIL, so concurrent senders queue behind one core.
The service process opens the listening socket and starts N receiver processes
(``python -m lesiontrack.dicom_node.inbound.receiver_process``) that inherit it and all accept on it (a pre-forked
listener: a connection waits in the one accept queue until some receiver takes it, so a receiver that dies loses no
queued connection). Each runs a :class:`dicom_node.inbound.scp.Receiver`: a pynetdicom SCP with the association guard,
door validation and the durable write; what it stored goes to its index journal, which the service process reads and
commits (one writer to the database, :mod:`dicom_node.inbound.journal`). What must be shared lives outside any one of
them:

* series completion state: in the database (:class:`db.models.OpenTransfer`, ``series.last_received_at``),
  completed by the service process (:class:`dicom_node.inbound.completion.SeriesCompletion`);
* ``dicom.max_associations`` and ``dicom.max_connections_per_peer``: :class:`SharedSlots`, one counter per
  receiver (and per peer address) in a small file, changed under an ``flock`` (released by the kernel when a
  process dies; the service resets a dead receiver's counters).

The pool restarts a receiver that dies; before, the service indexes what that receiver acknowledged but had not
committed (its journal, see :mod:`dicom_node.inbound.journal`) and ends its open transfers as dropped.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lesiontrack.config.logging import JsonFormatter

if TYPE_CHECKING:
    from lesiontrack.config.settings import Settings

log = logging.getLogger(__name__)

# the folder that holds the lesiontrack package (site-packages, or the checkout: not resolved, the layer folders
# are linked into lesiontrack/)
_REPO = Path(__file__).parents[3]


def run_dir(settings: Settings) -> Path:
    """Where receiver processes keep their index journals and the shared association counter."""
    return Path(settings.data_dir) / "run"


class SharedSlots:
    """Association slots counted across processes: ``n`` little-endian int32 counters, one per receiver; then a
    table of :data:`PEER_ENTRIES` peers (16-byte address + ``n`` counters) for ``dicom.max_connections_per_peer``.
    Every change happens under one ``flock`` on the file."""

    def __init__(self, path: Path, n: int, index: int = -1) -> None:
        self.path, self.n, self.index = Path(path), n, index
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self._entry = struct.Struct(f"<16s{n}i")
        self._table_full_logged = False

    @classmethod
    def create(cls, path: Path, n: int) -> SharedSlots:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * (4 * n + PEER_ENTRIES * (16 + 4 * n)))
        return cls(path, n)

    def _counts(self) -> list[int]:
        raw = os.pread(self._fd, 4 * self.n, 0).ljust(4 * self.n, b"\0")
        return list(struct.unpack(f"<{self.n}i", raw))

    def _set(self, index: int, value: int) -> None:
        os.pwrite(self._fd, struct.pack("<i", max(0, value)), 4 * index)

    def _locked(self) -> _FileLock:
        return _FileLock(self._lock, self._fd)

    def acquire(self, limit: int) -> bool:
        with self._locked():
            counts = self._counts()
            if sum(counts) >= limit:
                return False
            self._set(self.index, counts[self.index] + 1)
            return True

    def release(self) -> None:
        with self._locked():
            self._set(self.index, self._counts()[self.index] - 1)

    # -- per peer ----------------------------------------------------------------------------------------------
    def _peers(self) -> list[tuple[bytes, list[int]]]:
        size = self._entry.size
        raw = os.pread(self._fd, PEER_ENTRIES * size, 4 * self.n).ljust(PEER_ENTRIES * size, b"\0")
        return [(e[0], list(e[1:])) for e in self._entry.iter_unpack(raw)]

    def _put_peer(self, slot: int, address: bytes, counts: list[int]) -> None:
        data = self._entry.pack(address, *[max(0, c) for c in counts])
        os.pwrite(self._fd, data, 4 * self.n + slot * self._entry.size)

    def acquire_peer(self, ip: str, limit: int) -> bool:
        """One more connection from ``ip`` unless all receivers together hold ``limit`` (0 = unlimited)."""
        key = _address_key(ip)
        with self._locked():
            peers = self._peers()
            slot = next((k for k, (a, c) in enumerate(peers) if a == key and any(c)), None)
            if slot is None:
                slot = next((k for k, (_a, c) in enumerate(peers) if not any(c)), None)
                if slot is None:  # more peers connected at once than the table holds: counted per process only
                    if not self._table_full_logged:
                        log.warning(
                            "more than %d peers connected at once: per-peer limit counted per process", PEER_ENTRIES
                        )
                        self._table_full_logged = True
                    return True
                counts = [0] * self.n
            else:
                counts = peers[slot][1]
                if limit and sum(counts) >= limit:
                    return False
            counts[self.index] += 1
            self._put_peer(slot, key, counts)
            return True

    def release_peer(self, ip: str) -> None:
        key = _address_key(ip)
        with self._locked():
            for k, (a, c) in enumerate(self._peers()):
                if a == key and c[self.index] > 0:
                    c[self.index] -= 1
                    self._put_peer(k, a, c)
                    return

    def peer_total(self, ip: str) -> int:
        key = _address_key(ip)
        with self._locked():
            return sum(sum(c) for a, c in self._peers() if a == key)

    def reset(self, index: int) -> None:
        """A receiver died: the slots and peer connections it held are free again."""
        with self._locked():
            self._set(index, 0)
            for k, (a, c) in enumerate(self._peers()):
                if c[index]:
                    c[index] = 0
                    self._put_peer(k, a, c)

    def total(self) -> int:
        return sum(self._counts())

    def close(self) -> None:
        os.close(self._fd)


#: how many peer addresses the shared per-peer table holds at once
PEER_ENTRIES = 64


def _address_key(ip: str) -> bytes:
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip.encode()[:16].ljust(16, b"\0")
    if isinstance(addr, ipaddress.IPv4Address):
        addr = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
    return addr.packed


class _FileLock:
    """The thread lock, then ``flock`` on the file (released by the kernel if the process dies)."""

    def __init__(self, lock: threading.Lock, fd: int) -> None:
        self._lock, self._fd = lock, fd

    def __enter__(self) -> None:
        self._lock.acquire()
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._lock.release()


class ReceiverPool:
    """The listening socket and the receiver processes on it; restarts one that dies."""

    def __init__(self, settings: Settings, n: int, on_death: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.n = n
        self.on_death = on_death
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.slots: SharedSlots

    @property
    def port(self) -> int:
        return 0 if self.sock is None else int(self.sock.getsockname()[1])

    def start(self) -> ReceiverPool:
        cfg = self.settings.dicom
        self.sock = socket.create_server((cfg.bind_address, cfg.port), backlog=max(128, 4 * cfg.max_associations))
        self.sock.set_inheritable(True)
        self.slots = SharedSlots.create(run_dir(self.settings) / f"association-slots-{os.getpid()}", self.n)
        try:
            for i in range(self.n):
                self._spawn(i)
            for i in range(self.n):
                self._wait_ready(i)
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="receiver-pool", daemon=True)
        self._monitor.start()
        return self

    def _spawn(self, index: int) -> None:
        if self.sock is None:
            raise RuntimeError("the pool has no listening socket")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_REPO), *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.Popen(
            [sys.executable, "-m", "lesiontrack.dicom_node.inbound.receiver_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self.sock.fileno(),),
            env=env,
        )
        root = logging.getLogger()
        job = _ChildJob(self.settings, self.sock.fileno(), index, self.n, self.slots.path, root.level)
        job.json_logs = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
        job.library_level = logging.getLogger("pynetdicom").level or logging.WARNING
        if proc.stdin is None:
            raise RuntimeError("subprocess gave no stdin pipe")
        self._procs[index] = proc
        try:
            proc.stdin.write(pickle.dumps(job))
            proc.stdin.close()
        except BrokenPipeError:
            raise RuntimeError(
                f"receiver process {index} exited before it read its settings (exit code {proc.poll()})"
            ) from None

    def _wait_ready(self, index: int, timeout: float = 60.0) -> None:
        proc = self._procs[index]
        if proc is None or proc.stdout is None:
            raise RuntimeError(f"receiver {index} was not started")
        line = proc.stdout.readline()  # the child prints "ready <pid>" once it accepts
        if not line.startswith(b"ready"):
            proc.wait(timeout)
            raise RuntimeError(f"receiver process {index} did not start (exit code {proc.returncode})")

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            for i, proc in enumerate(self._procs):
                if proc is None or proc.poll() is None or self._stopping.is_set():
                    continue
                log.warning("receiver process %d ended (exit code %s); restarting it", proc.pid, proc.returncode)
                self.slots.reset(i)
                if self.on_death is not None:
                    try:
                        self.on_death(proc.pid)
                    except Exception:
                        log.exception("recovering after receiver process %d failed", proc.pid)
                with self._lock:
                    try:
                        self._spawn(i)
                        self._wait_ready(i)
                    except Exception:
                        log.exception("restarting receiver %d failed; will retry", i)
                        self._stopping.wait(2.0)

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
            self._monitor = None
        procs = [p for p in self._procs if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p.stdout is not None:
                p.stdout.close()
        self._procs = [None] * self.n
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if hasattr(self, "slots"):
            self.slots.close()
            self.slots.path.unlink(missing_ok=True)


class _ChildJob:
    """What a receiver process needs, sent pickled on its stdin (settings may hold secrets: never argv/env)."""

    def __init__(self, settings: Settings, fd: int, index: int, n: int, slots: Path, log_level: int) -> None:
        self.settings, self.fd, self.index, self.n, self.slots = settings, fd, index, n, slots
        self.log_level = log_level
        self.json_logs = False
        self.library_level = logging.WARNING
