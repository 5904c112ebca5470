"""Where received DICOM bytes live on disk: structural validation, content hashing and atomic writes.

Nothing here decodes pixel data. A file is written to a temporary name in its final folder, optionally
fsync'ed, then hard-linked under its final name (never replacing a file there), so a reader never sees a partial
file under a valid name and two receivers of the same SOP Instance UID cannot overwrite each other.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import dictionary_VR

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: one match instead of a split per component (the hot path checks nine UIDs per C-STORE)
_STRICT_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\Z")

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_TS = {"1.2.840.10008.1.2.1.99"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
#: every VR of PS3.5 6.2; anything else is refused (pydicom and dcmdump cannot read it)
KNOWN_VRS = _LONG_VRS | {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
    b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
}  # fmt: skip
_UNDEFINED = 0xFFFFFFFF
#: deepest sequence nesting accepted (real CT/SEG/SR objects stay under 10; 200-deep mutants crash readers)
MAX_NESTING = 24
#: transfer syntaxes whose pixel data is native (defined length); every other one must be encapsulated
NATIVE_TS = {EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE, *DEFLATED_TS}
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float / Double Float Pixel Data
_MAX_INFLATED = 4 << 30
#: key under which ``collect`` receives the first bytes of the first pixel data fragment (encapsulated data)
FIRST_FRAGMENT = -1
_FIRST_FRAGMENT_BYTES = 4096
#: VRs whose values are fixed-size binary numbers: a value length that is not a multiple of the size does not
#: parse (pydicom raises when the value is read; PS3.5 6.2)
_VALUE_SIZE = {
    b"US": 2, b"SS": 2, b"OW": 2, b"UL": 4, b"SL": 4, b"FL": 4, b"AT": 4, b"OF": 4, b"OL": 4,
    b"FD": 8, b"SV": 8, b"UV": 8, b"OD": 8, b"OV": 8,
}  # fmt: skip
#: per byte order: (tag, VR, short length) of an explicit VR header, (tag, length) of an implicit VR header or an
#: item, the 4-byte length after a long VR's reserved bytes
_HEADERS = {
    little: (struct.Struct(f"{e}HH2sH"), struct.Struct(f"{e}HHI"), struct.Struct(f"{e}I"))
    for little, e in ((True, "<"), (False, ">"))
}
#: the dictionary VR of a standard tag as the walker needs it (implicit VR): b"" when unknown, private or ambiguous
_DICT_VR: dict[int, bytes] = {}


class InvalidDataset(ValueError):
    """The received bytes are not a well-formed DICOM dataset."""


class StorageFull(OSError):
    """The disk refused the write (no space or quota)."""


def is_valid_uid(uid: str | None) -> bool:
    """PS3.5 9.1: at most 64 characters, digits and dots, no empty or (multi-digit) zero-led component."""
    if not uid or len(uid) > 64:
        return False
    return _STRICT_UID_RE.match(uid) is not None


def uid_problem(name: str, uid: str | None) -> str | None:
    """Why ``uid`` is not a valid UID (for DIMSE error comments and audit rows), or None."""
    if not uid:
        return f"{name} missing"
    if len(uid) > 64:
        return f"{name} has {len(uid)} characters (max 64)"
    if not is_valid_uid(uid):
        return f"{name} has characters or components a UID may not have"
    return None


def inflate(data: bytes) -> bytes:
    """The dataset of a Deflated Explicit VR Little Endian transfer (raw deflate, RFC 1951), bounded."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(data, _MAX_INFLATED)
    except zlib.error as exc:
        raise InvalidDataset(f"corrupt deflate stream: {exc}") from None
    if d.unconsumed_tail:
        raise InvalidDataset("deflated dataset inflates beyond the size limit")
    if not d.eof:
        raise InvalidDataset("truncated deflate stream")
    return out


def check_structure(
    data: bytes,
    transfer_syntax: str,
    collect: dict[int, bytes] | None = None,
    present: dict[int, tuple[bytes, int]] | None = None,
) -> bool:
    """Walk every element and raise :class:`InvalidDataset` unless the top level ends exactly at ``len(data)``.

    Catches truncated datasets, non-DICOM bytes, unknown VRs, values of binary VRs (US, UL, FD, AT, OW, ...)
    whose length is not a multiple of the value size (at every nesting level, the VR from the data dictionary
    under implicit VR), sequences nested deeper than :data:`MAX_NESTING`, corrupt content inside defined-length
    sequences and pixel data whose encoding (native or encapsulated) does not match the transfer syntax, without
    decoding any value. When ``collect`` maps tags to ``b""``, the raw values of those top-level tags are filled
    in on the way; ``present`` receives every top-level tag with its VR (under implicit VR the dictionary's, b""
    when not checked) and value length (0xFFFFFFFF: undefined).
    Deflated data is inflated first (bounded).
    """
    if not data:
        raise InvalidDataset("empty dataset")
    if transfer_syntax in DEFLATED_TS:
        data = inflate(data)
        if not data:
            raise InvalidDataset("empty dataset")
    implicit = transfer_syntax == IMPLICIT_VR_LE
    little = transfer_syntax != EXPLICIT_VR_BE
    native = transfer_syntax in NATIVE_TS
    end = _walk(data, 0, len(data), implicit, little, top_level=True, collect=collect, native=native, present=present)
    if end != len(data):
        raise InvalidDataset(f"dataset structure ends at byte {end} of {len(data)}")
    return True


# the door's measured hot path (run per element of every received instance): one function on purpose
def _walk(  # noqa: C901, PLR0912, PLR0913, PLR0917
    data: bytes,
    pos: int,
    stop: int,
    implicit: bool,
    little: bool,
    top_level: bool = False,
    until_delim: bool = False,
    collect: dict[int, bytes] | None = None,
    native: bool = True,
    depth: int = 0,
    present: dict[int, tuple[bytes, int]] | None = None,
) -> int:
    """Walk elements from ``pos``; return the position after the last one (or after an item delimiter)."""
    if depth > MAX_NESTING:
        raise InvalidDataset(f"sequences nested deeper than {MAX_NESTING} levels")
    tag_vr_length, tag_length, long_length = _HEADERS[little]  # compiled once: no format parsing per element
    last_tag = -1
    while pos < stop:
        if pos + 8 > stop:
            raise InvalidDataset(f"truncated element header at byte {pos}")
        if implicit:
            group, elem, length = tag_length.unpack_from(data, pos)
        else:
            group, elem, vr, length = tag_vr_length.unpack_from(data, pos)
        tag = (group << 16) | elem
        if tag == 0xFFFEE00D:  # item delimitation
            return pos + 8
        if group == 0xFFFE:
            raise InvalidDataset(f"unexpected item tag at byte {pos}")
        if top_level and tag <= last_tag:
            raise InvalidDataset(f"elements out of order at byte {pos} (tag {tag:08X})")
        last_tag = tag
        if implicit:
            vr = b"SQ" if length == _UNDEFINED else _implicit_vr(tag, length)
            pos += 8
        else:
            if vr not in KNOWN_VRS:
                raise InvalidDataset(f"invalid VR {bytes(vr)!r} at byte {pos + 4} (tag {tag:08X})")
            if vr in _LONG_VRS:
                if pos + 12 > stop:
                    raise InvalidDataset(f"truncated element header at byte {pos}")
                length = long_length.unpack_from(data, pos + 8)[0]
                pos += 12
            else:
                pos += 8
        size = _VALUE_SIZE.get(vr)
        if size is not None and length % size and length != _UNDEFINED:
            raise InvalidDataset(
                f"element ({group:04X},{elem:04X}) {vr.decode('ascii', 'replace')} value of {length} bytes "
                f"(a multiple of {size} needed)"
            )
        if present is not None:
            present[tag] = (vr, length)
        if top_level and tag == 0x7FE00010 and (length == _UNDEFINED) == native:
            raise InvalidDataset(
                "encapsulated pixel data under a native transfer syntax"
                if native
                else "native pixel data under a compressed (encapsulated) transfer syntax"
            )
        if length == _UNDEFINED:
            if tag == 0x7FE00010:
                first = [0, 0]
                pos = _walk_fragments(data, pos, stop, little, first)
                if collect is not None and FIRST_FRAGMENT in collect and first[1]:
                    collect[FIRST_FRAGMENT] = data[first[0] : first[0] + min(first[1], _FIRST_FRAGMENT_BYTES)]
            else:
                pos = _walk_sequence(data, pos, stop, implicit, little, depth)
        else:
            if pos + length > stop:
                raise InvalidDataset(f"element ({group:04X},{elem:04X}) claims {length} bytes, only {stop - pos} left")
            if collect is not None and tag in collect:
                collect[tag] = data[pos : pos + length]
            if vr == b"SQ" and length:
                _walk_defined_sequence(data, pos, pos + length, implicit, little, depth)
            pos += length
    if until_delim:
        raise InvalidDataset("missing item delimiter")
    return pos


def _implicit_vr(tag: int, length: int) -> bytes:
    """In implicit VR only the data dictionary says what a defined-length element is (a sequence to walk into,
    a binary number whose length must fit); b"" for what is not checked (empty, private, pixel data, unknown)."""
    if length == 0 or (tag >> 16) & 1 or tag in _PIXEL_TAGS:
        return b""
    vr = _DICT_VR.get(tag)
    if vr is None:
        try:
            name = dictionary_VR(tag)
        except KeyError:
            name = ""
        # an ambiguous VR ("US or SS", "OB or OW") is checked only where every choice has the same value size
        choices = {c.strip().encode("ascii") for c in name.split(" or ")} if name else set()
        sizes = {_VALUE_SIZE.get(c) for c in choices}
        vr = choices.pop() if len(choices) == 1 else next(iter(choices)) if len(sizes) == 1 and sizes != {None} else b""
        if len(_DICT_VR) < 20000:
            _DICT_VR[tag] = vr
    return vr


def _walk_items(data: bytes, pos: int, stop: int, implicit: bool, little: bool, depth: int, delimited: bool) -> int:
    """Items of a sequence from ``pos``: each item's dataset walked (one level deeper)."""
    item_header = _HEADERS[little][1]
    while pos + 8 <= stop:
        group, elem, length = item_header.unpack_from(data, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == 0xFFFEE0DD:
            if not delimited:
                raise InvalidDataset(f"sequence delimiter inside a defined-length sequence at byte {pos - 8}")
            return pos
        if tag != 0xFFFEE000:
            raise InvalidDataset(f"expected item tag at byte {pos - 8}, found {tag:08X}")
        if length == _UNDEFINED:
            pos = _walk(data, pos, stop, implicit, little, until_delim=True, depth=depth + 1)
        else:
            if pos + length > stop:
                raise InvalidDataset(f"item claims {length} bytes, only {stop - pos} left")
            end = _walk(data, pos, pos + length, implicit, little, depth=depth + 1)
            if end != pos + length:
                raise InvalidDataset(f"item content ends at byte {end}, item at {pos + length}")
            pos += length
    if delimited:
        raise InvalidDataset("truncated sequence (no sequence delimiter)")
    if pos != stop:
        raise InvalidDataset(f"truncated item header at byte {pos}")
    return pos


def _walk_sequence(data: bytes, pos: int, stop: int, implicit: bool, little: bool, depth: int = 0) -> int:
    """Items of an undefined-length sequence up to the sequence delimiter."""
    return _walk_items(data, pos, stop, implicit, little, depth, delimited=True)


def _walk_defined_sequence(data: bytes, pos: int, stop: int, implicit: bool, little: bool, depth: int) -> None:
    _walk_items(data, pos, stop, implicit, little, depth, delimited=False)


def _walk_fragments(data: bytes, pos: int, stop: int, little: bool, first: list[int] | None = None) -> int:
    """Encapsulated pixel data: an offset table item and fragments (defined-length items), then the delimiter;
    ``first`` receives [offset, length] of the first fragment after the offset table."""
    item_header = _HEADERS[little][1]
    items = 0
    while pos + 8 <= stop:
        group, elem, length = item_header.unpack_from(data, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == 0xFFFEE0DD:
            return pos
        if tag != 0xFFFEE000 or length == _UNDEFINED:
            raise InvalidDataset(f"invalid pixel data fragment at byte {pos - 8}")
        if pos + length > stop:
            raise InvalidDataset(f"fragment claims {length} bytes, only {stop - pos} left")
        if items == 1 and first is not None:
            first[0], first[1] = pos, length
        items += 1
        pos += length
    raise InvalidDataset("truncated encapsulated pixel data (no sequence delimiter)")


def sha256_hex(*chunks: bytes | memoryview) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def dataset_offset(raw: bytes | memoryview) -> int:
    """Where the dataset starts in a Part 10 file: after preamble, "DICM" and the file meta group, whose group
    length (0002,0000) is its first element (always written by :func:`dicom_node.inbound.ingest.encode_meta`)."""
    if len(raw) >= 144 and bytes(raw[128:132]) == b"DICM" and bytes(raw[132:136]) == b"\x02\x00\x00\x00":
        return 144 + int(struct.unpack_from("<I", raw, 140)[0])
    raise InvalidDataset("not a Part 10 file with a file meta group length")


class _Tmp:
    """A written, not yet named file (a temporary name; closed before it is linked)."""

    def __init__(self, fd: int, name: Path) -> None:
        self.fd, self.name = fd, name
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            os.close(self.fd)

    def link(self, dest: Path) -> None:
        """Hard-link under ``dest``; FileExistsError when that name exists (never replaced)."""
        self.close()
        os.link(self.name, dest)

    def discard(self) -> None:
        self.close()
        self.name.unlink(missing_ok=True)


@dataclass(frozen=True)
class PutResult:
    """Where :meth:`InstanceStore.put` left the instance."""

    path: Path
    created: bool  # False: identical dataset bytes were already stored there (an idempotent re-send)
    conflict: bool = False  # another object with this SOP Instance UID is stored: this one got a hash suffix


class InstanceStore:
    """Files under ``root/<study>/<series>/<sop>.dcm``; a different object with a known UID gets a hash suffix."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._dirs: set[Path] = set()  # series folders known to exist
        self._counter = itertools.count(1)  # next() is atomic under the GIL: unique per process

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str | None = None) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise InvalidDataset(f"not a valid UID: {uid!r}")
        name = f"{sop_uid}.dcm" if sha256 is None else f"{sop_uid}.{sha256[:16]}.dcm"
        return self.root / study_uid / series_uid / name

    def put(self, study_uid: str, series_uid: str, sop_uid: str, meta: bytes, data: bytes) -> PutResult:
        """Durably store one received instance without ever replacing another file (issue 18).

        Written to a temporary file (fsync'ed when configured), then hard-linked under its final name: a link
        fails when the name exists, so two receivers (threads or processes) storing the same SOP Instance UID at
        once cannot overwrite each other. An existing file with the same dataset bytes makes this an idempotent
        re-send; different bytes are kept beside it under ``<sop>.<sha256[:16]>.dcm``. Raises
        :class:`StorageFull` on ENOSPC/EDQUOT (the caller answers Out of Resources before Success).
        """
        path = self.path_for(study_uid, series_uid, sop_uid)
        try:
            tmp = self._write_tmp(path, [meta, data])
        except FileNotFoundError:  # the series folder was removed since it was cached: create it again
            self._dirs.discard(path.parent)
            tmp = self._write_tmp(path, [meta, data])
        try:
            if self._link(tmp, path):
                return PutResult(path, created=True)
            if _same_dataset(path, data):
                return PutResult(path, created=False)
            alt = self.path_for(study_uid, series_uid, sop_uid, sha256_hex(data))
            if self._link(tmp, alt):
                return PutResult(alt, created=True, conflict=True)
            return PutResult(alt, created=False, conflict=True)  # this very object, stored before
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(exc.errno, f"disk full writing {path}") from exc
            raise
        finally:
            tmp.discard()

    def _write_tmp(self, path: Path, chunks: list[bytes]) -> _Tmp:
        """The bytes in ``.tmp-<pid>-<n>`` beside the target (a name without a random number: no getrandom call
        per instance). (O_TMPFILE + linkat would save the name but is refused (EXDEV) on this VM's file system.)"""
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            if len(self._dirs) > 10000:
                self._dirs.clear()
            self._dirs.add(path.parent)
        tmp: _Tmp | None = None
        try:
            name = path.parent / f".tmp-{os.getpid()}-{next(self._counter)}"
            tmp = _Tmp(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), name)
            views = [memoryview(c) for c in chunks]
            while views:  # one writev for meta + dataset; loops only on a short write
                n = os.writev(tmp.fd, views)
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]
            if self.fsync:
                os.fsync(tmp.fd)
        except OSError as exc:
            if tmp is not None:
                tmp.discard()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(exc.errno, f"disk full writing {path}") from exc
            raise
        return tmp

    def _link(self, tmp: _Tmp, path: Path) -> bool:
        """Give ``tmp`` the name ``path`` unless that name exists (then False); the folder is fsync'ed."""
        try:
            tmp.link(path)
        except FileExistsError:
            return False
        if self.fsync:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return True

    def remove_orphan_tmp(self, min_age: float = 0.0) -> int:
        """Delete temporary files left by a crash (older than ``min_age`` seconds); returns how many."""
        n = 0
        now = time.time()
        if self.root.exists():
            for p in self.root.rglob(".tmp-*"):
                try:
                    if min_age and now - p.stat().st_mtime < min_age:
                        continue
                except FileNotFoundError:
                    continue
                p.unlink(missing_ok=True)
                n += 1
        return n


def _same_dataset(path: Path, data: bytes) -> bool:
    """Whether the stored file at ``path`` holds exactly ``data`` as its dataset (file meta may differ)."""
    try:
        raw = path.read_bytes()
        return memoryview(raw)[dataset_offset(raw) :] == data
    except (OSError, InvalidDataset):
        return False
