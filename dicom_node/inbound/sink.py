"""Where the Ingestor hands what it stored: an :class:`IndexItem` to an :class:`IndexSink` (issue 18).

Two implementations, chosen where the node is put together: the service process's
:class:`dicom_node.inbound.indexer.Indexer` (commits the rows itself, and can wait for them) and a receiver process's
:class:`dicom_node.inbound.journal.JournalWriter` (appends lines the service process commits; it cannot wait for rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass
class IndexItem:
    """One stored file waiting for its row: what the network thread already read from the header."""

    path: Path
    header: dict[str, str]  # the ingest header values (see dicom_node.inbound.ingest._TAGS), as text
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    received_at: datetime
    association_uid: str | None = None
    calling_ae: str | None = None
    peer: str | None = None
    recovered: bool = False  # found by the recovery scan: its association's end is not known
    #: read again from a journal at start-up: its row may exist already (committed before a crash), and then the
    #: item is dropped, so that a replay neither re-opens a completed series nor opens a transfer again
    maybe_committed: bool = False
    receiver_pid: int | None = None  # the receiver process that stored it, when not this one (its journal)
    data: bytes | None = None  # the dataset bytes, while the queue is short (saves reading the file back)
    error: str | None = None  # set when the item could not be indexed (the file stays; the scan retries)

    @property
    def sop_uid(self) -> str:
        return self.header["SOPInstanceUID"]

    @property
    def series_uid(self) -> str:
        return self.header["SeriesInstanceUID"]

    def s(self, name: str, maxlen: int) -> str | None:
        v = self.header.get(name)
        return v[:maxlen] if v else None

    def i(self, name: str) -> int | None:
        v = self.header.get(name)
        try:
            return int(v) if v else None
        except ValueError:
            return None


class IndexSink(Protocol):
    """Takes stored instances and association ends, in the order they happened; thread-safe."""

    def submit(self, item: IndexItem) -> None:
        """Queue the row of an instance that is already durably stored (never touches the database)."""

    def association_ended(self, association_uid: str, released: bool) -> None:
        """An association ended (``released`` False: abort or dropped connection); recorded after the instances
        it delivered."""

    def close(self) -> None:
        """Stop taking items (what was submitted is committed, or left for the service process)."""


@runtime_checkable
class WaitingIndexSink(IndexSink, Protocol):
    """A sink that commits the rows in this process, so a caller can wait for them."""

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything submitted so far is committed (or failed); False on timeout."""
