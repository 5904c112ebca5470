"""Where the Ingestor hands what it stored: an :class:`IndexSink` (issue 18).

Two implementations, chosen where the node is put together: the service process's
:class:`dicom_node.inbound.indexer.Indexer` (commits the rows itself, and can wait for them) and a receiver process's
:class:`dicom_node.inbound.journal.JournalWriter` (appends lines the service process commits; it cannot wait for rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lesiontrack.dicom_node.inbound.indexer import IndexItem


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
