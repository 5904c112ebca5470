"""The recovery scan: index every stored file that has no database row (issue 18).

Such a file was acknowledged by a process that died before its commit; :func:`recover` reads its header back
(:func:`dicom_node.inbound.ingest.item_from_file`) and hands it to the :class:`~dicom_node.inbound.indexer.Indexer`
(at start-up, after a receiver process died, and periodically).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sqlalchemy import select

from lesiontrack.db.models import Instance, Series
from lesiontrack.dicom_node.inbound.indexer import BATCH, RECOVER_MIN_AGE_S, Indexer
from lesiontrack.dicom_node.inbound.ingest import item_from_file
from lesiontrack.dicom_node.inbound.sink import IndexItem

log = logging.getLogger(__name__)

_WATERMARK = ".index-scan"


def recover(
    indexer: Indexer, min_age: float = RECOVER_MIN_AGE_S, full: bool = False, state_dir: Path | None = None
) -> int:
    """Index every stored file without a row (older than ``min_age`` seconds); returns how many. The time of
    the last complete scan is kept in ``state_dir`` (default: the store's root).

    Only series folders modified since the last complete scan (minus a margin) are listed, unless ``full``:
    adding a file to a folder changes the folder's mtime.
    """
    root = indexer.store.root
    if not root.is_dir():
        return 0
    started = time.time()
    mark = (state_dir or root) / _WATERMARK
    since = 0.0 if full else _last_scan(mark, min_age)
    found = 0
    for study in _dirs(root):
        for series in _dirs(study):
            items = _unindexed(indexer, series, since, started, min_age)
            for k in range(0, len(items), BATCH):
                indexer.index(items[k : k + BATCH])
            found += len(items)
    if found:
        log.warning("indexed %d stored instances that had no database row (acknowledged before a crash)", found)
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        tmp = mark.parent / f"{_WATERMARK}.tmp"
        tmp.write_text(f"{started}\n")
        os.replace(tmp, mark)
    except OSError as exc:
        log.warning("cannot record the index scan time in %s: %s", mark, exc)
    return found


def _last_scan(mark: Path, min_age: float) -> float:
    """The time from which series folders are listed: the last complete scan minus a margin (0: all)."""
    try:
        return float(mark.read_text().strip()) - max(300.0, 2 * min_age)
    except (OSError, ValueError):
        return 0.0


def _unindexed(indexer: Indexer, series: Path, since: float, started: float, min_age: float) -> list[IndexItem]:
    """The files of one series folder (modified since ``since``) that have no row and are older than
    ``min_age`` seconds at ``started``, read back for the indexer."""
    try:
        if series.stat().st_mtime < since:
            return []
    except FileNotFoundError:
        return []
    files = [p for p in series.iterdir() if p.suffix == ".dcm" and not p.name.startswith(".")]
    if not files:
        return []
    with indexer.engine.connect() as c:
        indexed = set(
            c.scalars(
                select(Instance.file_path)
                .join(Series, Series.id == Instance.series_pk)
                .where(Series.series_instance_uid == series.name)
            )
        )
    items = []
    for p in files:
        if str(p) in indexed:
            continue
        try:
            if started - p.stat().st_mtime < min_age:
                continue
            items.append(item_from_file(p))
        except FileNotFoundError:
            continue
        except Exception as exc:
            log.warning("stored file %s cannot be indexed: %s", p, exc)
    return items


def _dirs(p: Path) -> list[Path]:
    try:
        return [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except FileNotFoundError:
        return []
