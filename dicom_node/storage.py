"""Where received DICOM bytes live on disk: structural validation, content hashing and atomic writes.

Nothing here decodes pixel data. A file is written to a temporary name in its final folder, optionally
fsync'ed, then renamed, so a reader never sees a partial file under a valid name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_TS = {"1.2.840.10008.1.2.1.99"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


class InvalidDataset(ValueError):
    """The received bytes are not a well-formed DICOM dataset."""


class StorageFull(OSError):
    """The disk refused the write (no space or quota)."""


def is_valid_uid(uid: str | None) -> bool:
    return uid is not None and 0 < len(uid) <= 64 and UID_RE.match(uid) is not None


def check_structure(data: bytes, transfer_syntax: str, collect: dict[int, bytes] | None = None) -> bool:
    """Walk the top-level elements and raise :class:`InvalidDataset` unless they end exactly at ``len(data)``.

    Catches truncated datasets and non-DICOM bytes without decoding any value. When ``collect`` maps tags to
    ``b""``, the raw values of those top-level tags are filled in on the way. Deflated data is not walked
    (returns False).
    """
    if transfer_syntax in DEFLATED_TS:
        return False
    if not data:
        raise InvalidDataset("empty dataset")
    implicit = transfer_syntax == IMPLICIT_VR_LE
    little = transfer_syntax != EXPLICIT_VR_BE
    end = _walk(data, 0, len(data), implicit, little, top_level=True, collect=collect)
    if end != len(data):
        raise InvalidDataset(f"dataset structure ends at byte {end} of {len(data)}")
    return True


def _walk(
    data: bytes,
    pos: int,
    stop: int,
    implicit: bool,
    little: bool,
    top_level: bool = False,
    until_delim: bool = False,
    collect: dict[int, bytes] | None = None,
) -> int:
    """Walk elements from ``pos``; return the position after the last one (or after an item delimiter)."""
    e = "<" if little else ">"
    last_tag = -1
    while pos < stop:
        if pos + 8 > stop:
            raise InvalidDataset(f"truncated element header at byte {pos}")
        group, elem = struct.unpack_from(e + "HH", data, pos)
        tag = (group << 16) | elem
        if tag == 0xFFFEE00D:  # item delimitation
            return pos + 8
        if group == 0xFFFE:
            raise InvalidDataset(f"unexpected item tag at byte {pos}")
        if top_level and tag <= last_tag:
            raise InvalidDataset(f"elements out of order at byte {pos} (tag {tag:08X})")
        last_tag = tag
        if implicit:
            length = struct.unpack_from(e + "I", data, pos + 4)[0]
            vr = b"SQ" if length == _UNDEFINED else b""
            pos += 8
        else:
            vr = data[pos + 4 : pos + 6]
            if not (len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise InvalidDataset(f"invalid VR at byte {pos + 4} (tag {tag:08X})")
            if vr in _LONG_VRS:
                if pos + 12 > stop:
                    raise InvalidDataset(f"truncated element header at byte {pos}")
                length = struct.unpack_from(e + "I", data, pos + 8)[0]
                pos += 12
            else:
                length = struct.unpack_from(e + "H", data, pos + 6)[0]
                pos += 8
        if length == _UNDEFINED:
            pos = _walk_sequence(data, pos, stop, implicit, little)
        else:
            if pos + length > stop:
                raise InvalidDataset(f"element ({group:04X},{elem:04X}) claims {length} bytes, only {stop - pos} left")
            if collect is not None and tag in collect:
                collect[tag] = data[pos : pos + length]
            pos += length
    if until_delim:
        raise InvalidDataset("missing item delimiter")
    return pos


def _walk_sequence(data: bytes, pos: int, stop: int, implicit: bool, little: bool) -> int:
    """Items of an undefined-length sequence (or encapsulated pixel data) up to the sequence delimiter."""
    e = "<" if little else ">"
    while pos + 8 <= stop:
        group, elem, length = struct.unpack_from(e + "HHI", data, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == 0xFFFEE0DD:
            return pos
        if tag != 0xFFFEE000:
            raise InvalidDataset(f"expected item tag at byte {pos - 8}, found {tag:08X}")
        if length == _UNDEFINED:
            pos = _walk(data, pos, stop, implicit, little, until_delim=True)
        else:
            if pos + length > stop:
                raise InvalidDataset(f"item claims {length} bytes, only {stop - pos} left")
            pos += length
    raise InvalidDataset("truncated sequence (no sequence delimiter)")


def sha256_hex(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size: int
    created: bool  # False when an identical file was already there


class InstanceStore:
    """Files under ``root/<study>/<series>/<sop>.dcm``; a different object with a known UID gets a hash suffix."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str | None = None) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise InvalidDataset(f"not a valid UID: {uid!r}")
        name = f"{sop_uid}.dcm" if sha256 is None else f"{sop_uid}.{sha256[:16]}.dcm"
        return self.root / study_uid / series_uid / name

    def write(self, path: Path, chunks: list[bytes]) -> StoredFile:
        """Write atomically; raises :class:`StorageFull` on ENOSPC/EDQUOT, other OSErrors unchanged."""
        size = sum(len(c) for c in chunks)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for c in chunks:
                    view = memoryview(c)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self.fsync:
                dfd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(exc.errno, f"disk full writing {path}") from exc
            raise
        return StoredFile(path=path, size=size, created=True)

    def remove_orphan_tmp(self) -> int:
        """Delete temporary files left by a crash; returns how many."""
        n = 0
        if self.root.exists():
            for p in self.root.rglob(".tmp-*"):
                p.unlink(missing_ok=True)
                n += 1
        return n
