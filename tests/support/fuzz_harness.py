"""Fuzzing the Storage SCP from a seed: mutated C-STOREs and malformed PDUs, with an independent oracle.

Used by ``tests/test_dicom_node_fuzz.py`` (≥ 10,000 inputs in CI, most in process) and ``bench/fuzz.py`` (≥ 10,000,
all over the wire).

* :func:`cstore_mutants` — seeds are real CT slices (GE native explicit VR, re-encoded implicit VR and deflated,
  Siemens JPEG 2000), cropped small so thousands fit on a disk; 17 mutation operators (truncation, byte flips,
  VR / length corruption, deep nesting, bad UIDs, SOP Class and transfer-syntax mismatches, corrupt deflate,
  corrupt defined-length sequences, Rows/Columns vs pixel length, garbage insertion, element swaps, empty)
  plus unmutated controls, each with a fresh SOP Instance UID (so no mutant is a duplicate of another).
* :func:`pdu_inputs` — malformed PDU-level byte strings before association (unknown types, huge declared
  lengths, truncated and bit-flipped A-ASSOCIATE-RQs, even context IDs, P-DATA before association) and after a
  valid association (garbage P-DATA, bad PDV headers, wrong-length release).
* :func:`oracle` — is a stored file really valid? pydicom full parse + every value + pixel decode, and dcmdump
  (:func:`oracle_many`: dcmdump once per hundred files).
* :func:`run_cstores` / :func:`run_pdus` send them over real associations, :func:`receive_in_process` hands
  C-STOREs to the door as the SCP's C-STORE handler does; each outcome is classified: refused, accepted-valid,
  accepted-invalid-but-held (the integrity check before analysis flags it), **invalid accepted as valid**,
  **crash** (status 0xA700 "internal error"), **hang** (no answer within the timeouts).
"""

from __future__ import annotations

import copy
import itertools
import random
import socket
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import UID

from lesiontrack.dicom_node.inbound.ingest import IngestResult, RequestMeta
from tests.support import pdu

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "interop"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data/interop")

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"
J2K, RLE, JPEG_BASELINE = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50"
TRANSFER_SYNTAXES = [EXPLICIT, IMPLICIT, DEFLATED, J2K, RLE, JPEG_BASELINE]
#: planted in every seed: no log line may ever carry them (values from the wire may be PHI)
PHI_CANARIES = {"PatientName": "Canaryphi^Zoltanq", "PatientID": "PHICANARY0042", "PatientBirthDate": "19510203"}
CATEGORIES = [
    "control", "truncate", "byte_flip", "vr_corrupt", "length_corrupt", "deep_nesting", "uid_too_long",
    "uid_charset", "uid_missing", "sop_class_mismatch", "native_under_compressed", "encapsulated_under_native",
    "deflate_corrupt", "defined_seq_corrupt", "pixel_length_mismatch", "garbage_insert", "element_swap", "empty",
]  # fmt: skip


@dataclass
class Seed:
    name: str
    ts: str
    ds: Dataset  # the dataset (SOP Instance UID replaced per mutant)


@dataclass
class Mutant:
    category: str
    seed: str
    ts: str  # the transfer syntax the request claims
    sop_class: str  # the SOP Class the request claims
    sop_uid: str  # the SOP Instance UID the request claims
    body: bytes


def encode(ds: Dataset, ts: str) -> bytes:
    """``ds`` encoded in ``ts`` without file meta (deflated: raw deflate of explicit VR little endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, ts == IMPLICIT
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if ts == DEFLATED:
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(raw) + c.flush()
    return raw


def part10(m: Mutant) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(m.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(m.sop_uid)
    meta.TransferSyntaxUID = UID(m.ts)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + m.body


def _crop(ds: Dataset, size: int) -> Dataset:
    import numpy as np

    arr = ds.pixel_array[:size, :size]
    ds = copy.deepcopy(ds)
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def _plant_phi(ds: Dataset) -> Dataset:
    for name, value in PHI_CANARIES.items():
        setattr(ds, name, value)
    return ds


def phi_in(text: str) -> list[str]:
    """The planted identifiers (or their parts) found in ``text``."""
    parts = {p for v in PHI_CANARIES.values() for p in v.split("^") if len(p) >= 4}
    return sorted(p for p in parts if p in text)


def load_seeds() -> list[Seed]:
    ge = sorted((SHARED / "ct_gantry_tilt_ge").glob("*.dcm"))[:2]
    j2k = sorted(p for p in (SHARED / "ct_siemens_j2k").iterdir() if p.is_file())[:1]
    seeds: list[Seed] = []
    for i, p in enumerate(ge):
        small = _plant_phi(_crop(dcmread(p), 96))
        small.file_meta = FileMetaDataset()
        seeds.append(Seed(f"ge{i}-explicit", EXPLICIT, small))
        seeds.append(Seed(f"ge{i}-implicit", IMPLICIT, small))
        seeds.append(Seed(f"ge{i}-deflated", DEFLATED, small))
    for p in j2k:
        ds = dcmread(p)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        for n, tag in enumerate(("StudyInstanceUID", "SeriesInstanceUID")):
            if not ds.get(tag):
                setattr(ds, tag, f"2.25.{19190000 + n}")
        _plant_phi(ds)
        ds.file_meta = FileMetaDataset()
        seeds.append(Seed("siemens-j2k", J2K, ds))
    return seeds


def _insert_nested(body: bytes, implicit: bool, depth: int) -> bytes:
    """``body`` with a (0008,1115) sequence nested ``depth`` levels deep (undefined lengths) in tag order."""
    tag = struct.pack("<HH", 0x0008, 0x1115)
    head = tag + (b"" if implicit else b"SQ\x00\x00") + b"\xff\xff\xff\xff"
    item, item_end, seq_end = (
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff",
        b"\xfe\xff\x0d\xe0" + bytes(4),
        b"\xfe\xff\xdd\xe0" + bytes(4),
    )
    blob = (head + item) * depth + (item_end + seq_end) * depth
    at = next((pos for pos, _, _ in _element_offsets(body, implicit)
               if struct.unpack_from("<HH", body, pos) > (0x0008, 0x1115)), len(body))  # fmt: skip
    return body[:at] + blob + body[at:]


def _element_offsets(body: bytes, implicit: bool) -> list[tuple[int, int, int]]:
    """(offset, header length, value length) of the top-level elements (best effort, for the mutators)."""
    out, pos = [], 0
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
    while pos + 8 <= len(body):
        if implicit:
            hl, ln = 8, struct.unpack_from("<I", body, pos + 4)[0]
        elif body[pos + 4 : pos + 6] in long_vrs:
            hl, ln = 12, struct.unpack_from("<I", body, pos + 8)[0]
        else:
            hl, ln = 8, struct.unpack_from("<H", body, pos + 6)[0]
        if ln == 0xFFFFFFFF:
            out.append((pos, hl, -1))
            break
        out.append((pos, hl, ln))
        pos += hl + ln
    return out


def cstore_mutants(n: int, seed: int = 19) -> Iterator[Mutant]:
    """``n`` mutants (about 1 in 18 an unmutated control), deterministic for a given ``seed``."""
    rng = random.Random(seed)
    seeds = load_seeds()
    for i in range(n):
        s = seeds[i % len(seeds)] if i < len(seeds) else rng.choice(seeds)
        cat = CATEGORIES[i % len(CATEGORIES)] if i < 4 * len(CATEGORIES) else rng.choice(CATEGORIES)
        yield _mutate(rng, s, cat)


_ENCODED: dict[tuple[str, bool], tuple[bytes, bytes]] = {}


def _with_sop_uid(s: Seed, implicit: bool, uid: str) -> bytes:
    """``s.ds`` with SOP Instance UID ``uid``, encoded (implicit or explicit VR little endian) byte for byte as
    :func:`encode` would: the seed is encoded once, its (0008,0018) element cut out and written anew per mutant."""
    key = (s.name, implicit)
    if key not in _ENCODED:
        ds = copy.deepcopy(s.ds)
        ds.SOPInstanceUID = "2.25.1"
        body = encode(ds, IMPLICIT if implicit else EXPLICIT)
        pos, hl, ln = next(e for e in _element_offsets(body, implicit) if body[e[0] : e[0] + 4] == b"\x08\x00\x18\x00")
        _ENCODED[key] = (body[:pos], body[pos + hl + ln :])
    head, tail = _ENCODED[key]
    value = uid.encode("ascii") + (b"\x00" if len(uid) % 2 else b"")
    tag = b"\x08\x00\x18\x00"
    element = tag + struct.pack("<I", len(value)) if implicit else tag + b"UI" + struct.pack("<H", len(value))
    return head + element + value + tail


#: the operators that change the dataset before it is encoded
_DATASET_OPERATORS = frozenset({"uid_too_long", "uid_charset", "uid_missing", "pixel_length_mismatch",
                                "defined_seq_corrupt"})  # fmt: skip


def _mutate(rng: random.Random, s: Seed, cat: str) -> Mutant:
    uid = f"2.25.{rng.getrandbits(96)}"  # from the seed: a run is reproducible byte for byte
    ts, sop_class = s.ts, str(s.ds.SOPClassUID)
    plain_ts = EXPLICIT if ts == DEFLATED else ts  # byte-level mutators work on plain (inflated) bytes
    if cat == "sop_class_mismatch":
        sop_class = MR
    ts, plain_ts = _mutate_transfer_syntax(rng, cat, ts, plain_ts)
    implicit = plain_ts == IMPLICIT
    # a dataset operator's copy is encoded anew; otherwise only the SOP Instance UID differs from the seed: spliced
    # into the seed's encoding (same bytes, 1/10 the time)
    body = (
        encode(_mutate_dataset(rng, s.ds, cat, uid), plain_ts)
        if cat in _DATASET_OPERATORS
        else _with_sop_uid(s, implicit, uid)
    )
    body = _mutate_encoded(rng, cat, body, implicit)
    if ts == DEFLATED:
        body = _deflate(rng, cat, body)
    elif cat == "deflate_corrupt":  # not a deflate seed: claim deflate for plain bytes
        ts = DEFLATED
    return Mutant(cat, s.name, ts, sop_class, uid, body)


def _mutate_transfer_syntax(rng: random.Random, cat: str, ts: str, plain_ts: str) -> tuple[str, str]:
    """The claimed and the plain transfer syntax after a native/encapsulated mismatch (unchanged otherwise)."""
    native = ts in (EXPLICIT, IMPLICIT, DEFLATED)
    if cat == "native_under_compressed" and native:
        ts = plain_ts = rng.choice([J2K, RLE, JPEG_BASELINE])
    elif cat == "encapsulated_under_native" and not native:
        ts = plain_ts = rng.choice([EXPLICIT, IMPLICIT])
    return ts, plain_ts


def _mutate_dataset(rng: random.Random, seed_ds: Dataset, cat: str, uid: str) -> Dataset:
    """A copy of the seed's dataset with SOP Instance UID ``uid`` and the dataset-level mutation ``cat``."""
    ds = copy.deepcopy(seed_ds)  # Dataset.copy() is shallow: a mutation would leak into the seed
    ds.SOPInstanceUID = uid
    if cat == "uid_too_long":
        setattr(ds, rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]),
                "1.2.826.0.1.3680043.8.498." + "7" * rng.randint(39, 80))  # fmt: skip
    elif cat == "uid_charset":
        setattr(ds, rng.choice(["StudyInstanceUID", "SeriesInstanceUID"]),
                rng.choice(["1.2.abc.4", "1.2..3", "1.02.3", "1.2.3 ", "1.2.3.", "1.\xe9.3", "1.2;3"]))  # fmt: skip
    elif cat == "uid_missing":
        delattr(ds, rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]))
    elif cat == "pixel_length_mismatch":
        if rng.random() < 0.5:
            ds.Rows = int(ds.Rows) + rng.choice([-3, 1, 7, 100])
        else:
            ds.Columns = int(ds.Columns) + rng.choice([-2, 5, 64])
    elif cat == "defined_seq_corrupt":
        item = Dataset()
        item.ReferencedSOPClassUID = CT
        item.ReferencedSOPInstanceUID = "1.2.3.4"
        item.is_undefined_length_sequence_item = False
        ds.ReferencedImageSequence = Sequence([item])
        ds["ReferencedImageSequence"].is_undefined_length = False
    return ds


def _mutate_encoded(rng: random.Random, cat: str, body: bytes, implicit: bool) -> bytes:
    """The byte-level mutation ``cat`` applied to the plain (not deflated) encoding."""
    if cat == "deep_nesting":  # raw bytes: pydicom's own writer recurses itself to death at these depths
        return _insert_nested(body, implicit, rng.choice([25, 40, 200, 600, 1000, 5000]))
    if cat == "defined_seq_corrupt":
        b = bytearray(body)
        at = b.find(b"\x08\x00\x55\x11")
        if at >= 0:
            off = at + (4 if implicit else 6)
            width = 4 if implicit else 2
            b[off : off + width] = rng.randint(60, 5000).to_bytes(width, "little")
        return bytes(b)
    if cat in ("truncate", "byte_flip", "vr_corrupt", "length_corrupt", "garbage_insert", "element_swap"):
        return _byte_mutation(rng, cat, body, implicit)
    if cat == "empty":
        return rng.choice([b"", b"\x00" * rng.randint(1, 64), b"\xff" * 16])
    return body


def _deflate(rng: random.Random, cat: str, body: bytes) -> bytes:
    """``body`` as raw deflate, the stream cut short or bit-flipped for ``deflate_corrupt``."""
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    if cat != "deflate_corrupt":
        return c.compress(body) + c.flush()
    d = bytearray(c.compress(body) + c.flush())
    if rng.random() < 0.5:
        d = d[: rng.randint(1, max(1, len(d) - 1))]
    else:
        for _ in range(rng.randint(1, 20)):
            d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
    return bytes(d)


def _byte_mutation(rng: random.Random, cat: str, body: bytes, implicit: bool) -> bytes:
    b = bytearray(body)
    elems = _element_offsets(body, implicit) or [(0, 8, 0)]
    # most mutations land in the header (where the structure is), a few anywhere
    head = [e for e in elems if e[0] < 4096] or elems
    if cat == "truncate":
        return bytes(b[: rng.randint(0, max(0, len(b) - 1))])
    if cat == "byte_flip":
        span = len(b) if rng.random() < 0.3 else min(len(b), 4096)
        for _ in range(rng.randint(1, 12)):
            b[rng.randrange(max(1, span))] ^= 1 << rng.randrange(8)
        return bytes(b)
    pos, hl, ln = rng.choice(head)
    if cat == "vr_corrupt" and not implicit:
        b[pos + 4 : pos + 6] = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ?\x00\xff") for _ in range(2))
        return bytes(b)
    if cat in ("length_corrupt", "vr_corrupt"):
        width = 4 if hl in (8, 12) and (implicit or hl == 12) else 2
        off = pos + hl - width
        value = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, ln + rng.randint(1, 64), max(0, ln - 1), rng.getrandbits(31)])
        b[off : off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        return bytes(b)
    if cat == "garbage_insert":
        at = rng.choice([pos, pos + hl, rng.randrange(len(b) + 1)])
        return bytes(b[:at]) + rng.randbytes(rng.randint(1, 40)) + bytes(b[at:])
    if cat == "element_swap" and len(head) > 2:
        (p1, h1, l1), (p2, h2, l2) = sorted(rng.sample(head[:-1], 2))
        if l1 >= 0 and l2 >= 0:
            e1, e2 = b[p1 : p1 + h1 + l1], b[p2 : p2 + h2 + l2]
            return bytes(b[:p1] + e2 + b[p1 + h1 + l1 : p2] + e1 + b[p2 + h2 + l2 :])
    return bytes(b)


# -- PDU-level inputs -----------------------------------------------------------------------------------------


def associate_rq(context_id: int = 1) -> bytes:
    """An A-ASSOCIATE-RQ from the fuzzer (calling AE FUZZER), built as the guard tests build theirs."""
    return pdu.associate_rq(calling="FUZZER", context_id=context_id)


@dataclass
class PduInput:
    kind: str
    payload: bytes
    after_association: bool = False
    keep_open: bool = False  # do not half-close after sending (exercises the server's deadlines)


def pdu_inputs(n: int, seed: int = 19) -> Iterator[PduInput]:
    rng = random.Random(seed)
    rq = associate_rq()
    kinds = ["unknown_type", "huge_length", "truncated_rq", "flipped_rq", "even_context", "pdata_before",
             "random_bytes", "small_pdu_wrong_length", "after_garbage_pdata", "after_bad_pdv",
             "after_release_wrong_length", "after_random"]  # fmt: skip
    for i in range(n):
        kind = kinds[i % len(kinds)] if i < 3 * len(kinds) else rng.choice(kinds)
        keep = rng.random() < 0.15
        if kind == "unknown_type":
            t = rng.choice([0x00, 0x08, 0x09, 0x47, 0x7F, 0xFF])
            yield PduInput(kind, bytes([t, 0]) + struct.pack(">I", rng.randint(0, 64)) + rng.randbytes(16), False, keep)
        elif kind == "huge_length":
            t = rng.choice([1, 2, 3, 4, 5, 6, 7])
            yield PduInput(kind, bytes([t, 0]) + struct.pack(">I", rng.choice([1 << 31, 0xFFFFFFFF, 1 << 26])) +
                           rng.randbytes(rng.randint(0, 100)), False, keep)  # fmt: skip
        elif kind == "truncated_rq":
            yield PduInput(kind, rq[: rng.randint(1, len(rq) - 1)], False, keep)
        elif kind == "flipped_rq":
            b = bytearray(rq)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(6, len(b))] ^= 1 << rng.randrange(8)
            yield PduInput(kind, bytes(b), False, keep)
        elif kind == "even_context":
            yield PduInput(kind, associate_rq(context_id=rng.choice([0, 2, 4, 128, 254])), False, keep)
        elif kind == "pdata_before":
            pdv = rng.randbytes(rng.randint(0, 40))
            yield PduInput(kind, b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv, False, keep)
        elif kind == "random_bytes":
            yield PduInput(kind, rng.randbytes(rng.randint(1, 300)), False, keep)
        elif kind == "small_pdu_wrong_length":
            t = rng.choice([5, 6, 7])
            body = rng.randbytes(rng.randint(0, 20))
            yield PduInput(kind, bytes([t, 0]) + struct.pack(">I", len(body)) + body, False, keep)
        elif kind == "after_garbage_pdata":
            pdv = rng.randbytes(rng.randint(0, 200))
            yield PduInput(kind, b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv, True, keep)
        elif kind == "after_bad_pdv":
            # a PDV item claiming more than the PDU holds, or context id 0 / unknown, command garbage
            frag = rng.randbytes(rng.randint(0, 60))
            item_len = rng.choice([len(frag) + 2, len(frag) + 200, 0, 1])
            ctx, hdr = rng.choice([0, 1, 3, 255]), rng.choice([0x00, 0x01, 0x02, 0x03, 0xFF])
            item = struct.pack(">IBB", item_len, ctx, hdr) + frag
            yield PduInput(kind, b"\x04\x00" + struct.pack(">I", len(item)) + item, True, keep)
        elif kind == "after_release_wrong_length":
            body = rng.randbytes(rng.choice([0, 2, 8, 50]))
            yield PduInput(kind, b"\x05\x00" + struct.pack(">I", len(body)) + body, True, keep)
        else:
            yield PduInput(kind, rng.randbytes(rng.randint(1, 400)), True, keep)


# -- the oracle -------------------------------------------------------------------------------------------------


def oracle(path: Path, dcmdump: bool = True) -> str | None:
    """Independent verdict on a stored file: None when pydicom reads every value and decodes the pixels and
    dcmdump reads it; else the problem."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path)
            for elem in ds.iterall():
                _ = elem.value
            if "PixelData" in ds:
                _ = ds.pixel_array
    except RecursionError:
        return "pydicom: recursion"
    except Exception as exc:
        return f"pydicom: {type(exc).__name__}: {str(exc)[:100]}"
    if dcmdump:
        r = subprocess.run(["dcmdump", "-q", "+E", str(path)], capture_output=True, timeout=60)
        if r.returncode != 0:
            return f"dcmdump exit {r.returncode}: {r.stderr[:100]!r}"
    return None


def oracle_many(paths: list[Path], dcmdump: bool = True, batch: int = 100) -> dict[Path, str | None]:
    """:func:`oracle` for many files: pydicom file by file, dcmdump once per ``batch`` files (a batch that fails
    is read again file by file, to name the ones dcmdump refuses)."""
    verdicts = {p: oracle(p, dcmdump=False) for p in paths}
    if dcmdump:
        ok = [p for p, v in verdicts.items() if v is None]
        for i in range(0, len(ok), batch):
            part = ok[i : i + batch]
            r = subprocess.run(["dcmdump", "-q", "+E", *map(str, part)], capture_output=True, timeout=600)
            if r.returncode != 0:
                for p in part:
                    verdicts[p] = oracle(p, dcmdump=True)
    return verdicts


# -- running ----------------------------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    by_category: dict[str, Counter[str]] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    invalid_accepted: list[str] = field(default_factory=list)
    controls_refused: list[str] = field(default_factory=list)

    def add(self, category: str, outcome: str) -> None:
        self.inputs += 1
        self.outcomes[outcome] += 1
        self.by_category.setdefault(category, Counter())[outcome] += 1


def _judge(
    m: Mutant,
    status: int,
    comment: str,
    stored: Path | None,
    verdict: str | None,
    held: Callable[[Path], str | None],
    report: FuzzReport,
) -> None:
    """Classify one answered C-STORE into ``report`` (``verdict``: the oracle's, for a stored file)."""
    if status == 0xA700 and "internal error" in comment:
        report.crashes.append(f"{m.category}/{m.seed}: {comment}")
        report.add(m.category, "crash")
        return
    if status != 0:
        if m.category == "control":
            report.controls_refused.append(f"{m.seed}: 0x{status:04X} {comment}")
        report.add(m.category, f"refused_0x{status:04X}")
        return
    if stored is None:
        report.crashes.append(f"{m.category}/{m.seed}: Success but nothing stored")
        report.add(m.category, "crash")
        return
    if verdict is None:
        report.add(m.category, "accepted_valid")
    elif held(stored):
        report.add(m.category, "accepted_held_before_analysis")
    else:
        report.invalid_accepted.append(f"{m.category}/{m.seed}: {verdict}")
        report.add(m.category, "invalid_accepted_as_valid")


def run_cstores(
    port: int,
    mutants: Iterator[Mutant],
    work: Path,
    stored_file: Callable[[str], Path | None],
    held: Callable[[Path], str | None],
    report: FuzzReport,
    per_association: int = 50,
    dcmdump: bool = True,
) -> None:
    """Send every mutant over real associations (``per_association`` per association); classify each outcome
    into ``report`` once the associations are over."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="FUZZER")
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 30
    for sop in (CT, MR):
        for ts in TRANSFER_SYNTAXES:
            ae.add_requested_context(sop, ts)
    work.mkdir(parents=True, exist_ok=True)
    assoc = None
    sent = 0
    answers: list[tuple[Mutant, int, str]] = []
    for m in mutants:
        if assoc is None or not assoc.is_established or sent % per_association == 0:
            if assoc is not None and assoc.is_established:
                assoc.release()
            assoc = ae.associate("127.0.0.1", port, ae_title="LESIONTRACK")
            if not assoc.is_established:
                report.hangs.append(f"association refused before mutant {sent} ({m.category})")
                report.add(m.category, "hang")
                sent += 1
                assoc = None
                continue
        path = work / "mutant.dcm"
        path.write_bytes(part10(m))
        sent += 1
        try:
            rsp = assoc.send_c_store(path)
        except Exception as exc:  # the sender itself could not encode the request: not our node's doing
            report.add(m.category, "not_sendable")
            report.outcomes[f"not_sendable:{type(exc).__name__}"] += 0
            continue
        if "Status" not in rsp:
            report.hangs.append(f"{m.category}/{m.seed}: no C-STORE response")
            report.add(m.category, "hang")
            assoc = None
            continue
        answers.append((_light(m), int(rsp.Status), str(rsp.get("ErrorComment", ""))))
    if assoc is not None and assoc.is_established:
        assoc.release()
    # judged once the associations are over: an oracle run between two C-STOREs (a JPEG 2000 decode on a busy
    # machine) could keep an association idle past the node's network timeout, which then rightly aborts it
    for m, status, comment in answers:
        stored = stored_file(m.sop_uid) if status == 0 else None
        verdict = oracle(stored, dcmdump=dcmdump) if stored is not None else None
        _judge(m, status, comment, stored, verdict, held, report)


class Receives(Protocol):
    """What the Storage SCP's C-STORE handler calls (:meth:`dicom_node.inbound.ingest.Ingestor.receive`)."""

    def receive(
        self,
        meta: RequestMeta,
        dataset_bytes: bytes,
        calling_ae: str | None = None,
        peer: str | None = None,
        association: str | None = None,
    ) -> IngestResult: ...


@dataclass(frozen=True)
class InProcessPace:
    """How :func:`receive_in_process` hands mutants over and judges them."""

    chunk: int = 500  # mutants received before the indexer settles and the chunk is judged
    per_association: int = 50  # C-STOREs per (simulated) association
    dcmdump: bool = True  # the oracle also runs dcmdump over the stored files


def receive_in_process(
    ingestor: Receives,
    mutants: Iterator[Mutant],
    settle: Callable[[], object],
    stored_files: Callable[[list[str]], dict[str, Path]],
    held: Callable[[Path], str | None],
    report: FuzzReport,
    pace: InProcessPace | None = None,
) -> None:
    """Hand every mutant to the door as the SCP's C-STORE handler does, without the network in between.

    ``Receiver._on_store`` (:mod:`dicom_node.inbound.scp`) builds a :class:`RequestMeta` from the request's Affected SOP
    Class / Instance UIDs and the presentation context's transfer syntax and passes the dataset bytes exactly as
    the peer sent them (pynetdicom hands them over undecoded) to ``Ingestor.receive``; here the same call gets the
    same three strings and bytes that :func:`part10` would put in the file that :func:`run_cstores` sends. What
    the network adds (PDU framing, DIMSE, presentation contexts) is fuzzed over real associations by
    :func:`run_cstores` and :func:`run_pdus`. Outcomes are judged as there, in chunks: after each chunk the
    indexer settles, the rows are looked up at once and the stored files go through :func:`oracle_many`."""
    pace = pace or InProcessPace()
    association = str(uuid.uuid4())
    done = 0
    while batch := list(itertools.islice(mutants, pace.chunk)):
        answers: list[tuple[Mutant, int, str]] = []
        for m in batch:
            if done % pace.per_association == 0:
                association = str(uuid.uuid4())
            done += 1
            r = ingestor.receive(
                RequestMeta(m.sop_class, m.sop_uid, m.ts),
                m.body,
                calling_ae="FUZZER",
                peer="127.0.0.1",
                association=association,
            )
            answers.append((_light(m), r.status, r.comment))
        del batch
        settle()
        stored = stored_files([m.sop_uid for m, status, _ in answers if status == 0])
        verdicts = oracle_many(list(stored.values()), dcmdump=pace.dcmdump)
        for m, status, comment in answers:
            path = stored.get(m.sop_uid) if status == 0 else None
            _judge(m, status, comment, path, verdicts.get(path) if path else None, held, report)


def _light(m: Mutant) -> Mutant:
    """The mutant without its bytes (a chunk's answers are kept until it is judged)."""
    return Mutant(m.category, m.seed, m.ts, m.sop_class, m.sop_uid, b"")


def _exchange(port: int, inp: PduInput, source: str, deadline_s: float) -> str:
    """Send one PDU input; 'reply:0xNN', 'closed' or 'hang' (nothing within ``deadline_s``)."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(deadline_s)
    try:
        s.connect(("127.0.0.1", port))
        if inp.after_association:
            s.sendall(associate_rq())
            ac = s.recv(6)
            if not ac or ac[0] != 0x02:
                return f"association_refused:{ac[:1].hex()}"
            length = struct.unpack(">I", ac[2:6])[0]
            while length > 0:
                chunk = s.recv(min(length, 65536))
                if not chunk:
                    return "closed"
                length -= len(chunk)
        s.sendall(inp.payload)
        if not inp.keep_open:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the node closed the connection already (ENOTCONN): that is its answer
                return "closed"
        t0 = time.monotonic()
        first: bytes | None = None
        while time.monotonic() - t0 < deadline_s:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                return "closed" if first is None else f"reply:0x{first[0]:02X}"
            if not data:
                return "closed" if first is None else f"reply:0x{first[0]:02X}"
            if first is None:
                first = data
        return "hang"
    except TimeoutError:
        return "hang"
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    finally:
        s.close()


def run_pdus(port: int, inputs: Iterator[PduInput], report: FuzzReport, deadline_s: float, workers: int = 6) -> None:
    """Send PDU inputs from ``workers`` threads (each its own 127.0.0.x source); classify each outcome."""
    lock = threading.Lock()
    items = list(inputs)

    def work(k: int) -> None:
        source = f"127.0.0.{10 + k}"
        for i in range(k, len(items), workers):
            inp = items[i]
            outcome = _exchange(port, inp, source, deadline_s)
            with lock:
                cat = f"pdu:{inp.kind}"
                if outcome == "hang":
                    report.hangs.append(f"{cat} ({len(inp.payload)} bytes, keep_open={inp.keep_open})")
                report.add(cat, outcome)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
