"""Per-association bookkeeping of the Storage SCP and its one INFO summary line when the association ends:
peer AE/address, instances stored (and refused), bytes, series touched, seconds and how it ended.
Per-instance detail stays at DEBUG (``dicom_node.inbound.ingest``)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("lesiontrack.dicom_node.inbound.scp")


@dataclass
class _Assoc:
    calling_ae: str
    address: str
    started: float
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    echoes: int = 0
    nbytes: int = 0
    series: set[str] = field(default_factory=set)
    result: str = "closed"


class AssociationLog:
    """Thread-safe: the SCP's event handlers call these from pynetdicom's per-association threads."""

    def __init__(self) -> None:
        self._open: dict[int, _Assoc] = {}
        self._lock = threading.Lock()

    def accepted(self, key: int, calling_ae: str, address: str) -> None:
        with self._lock:
            self._open[key] = _Assoc(calling_ae, address, time.monotonic())

    def store(self, key: int, nbytes: int, ok: bool, duplicate: bool = False, series_uid: str | None = None) -> None:
        with self._lock:
            a = self._open.get(key)
            if a is None:
                return
            if not ok:
                a.refused += 1
            elif duplicate:
                a.duplicates += 1
            else:
                a.stored += 1
            a.nbytes += nbytes
            if series_uid:
                a.series.add(series_uid)

    def echo(self, key: int) -> None:
        with self._lock:
            if key in self._open:
                self._open[key].echoes += 1

    def ended(self, key: int, result: str) -> None:
        with self._lock:
            if key in self._open:
                self._open[key].result = result

    def closed(self, key: int) -> None:
        with self._lock:
            a = self._open.pop(key, None)
        if a is None:  # rejected before acceptance: already logged as a warning
            return
        seconds = time.monotonic() - a.started
        what = f"{a.stored} instances stored"
        if a.duplicates:
            what += f", {a.duplicates} duplicates"
        if a.refused:
            what += f", {a.refused} REFUSED"
        if a.echoes and not (a.stored or a.duplicates or a.refused):
            what = "C-ECHO"
        mb = a.nbytes / 1e6
        rate = f", {mb / seconds:.1f} MB/s" if seconds > 0 and a.nbytes else ""
        level = logging.WARNING if a.refused or a.result == "aborted" else logging.INFO
        log.log(
            level,
            "association from %s (%s): %s, %.1f MB in %.2f s%s, %d series, %s",
            a.calling_ae,
            a.address,
            what,
            mb,
            seconds,
            rate,
            len(a.series),
            a.result,
        )


def filter_pynetdicom_loggers(log_filter: logging.Filter) -> None:
    """Attach ``log_filter`` to pynetdicom's logger and every module logger under it (a filter on a parent logger does
    not see records its children emit, so each one gets it)."""
    import pynetdicom  # noqa: F401  (its module loggers exist once it is imported)

    names = {"pynetdicom"} | {n for n in logging.root.manager.loggerDict if n.startswith("pynetdicom.")}
    for name in sorted(names):
        logging.getLogger(name).addFilter(log_filter)
