"""The door's content check of one C-STORE, after the structure walk
(:func:`dicom_node.inbound.storage.check_structure`):
the attributes the SOP class's IOD requires at the level the analysis depends on, and pixel data that matches its
description. Works on the raw top-level values the walk collected (no pydicom decode on the hot path).

* **Image pixel module** (any object with Pixel Data, and every image SOP class below): Rows, Columns,
  BitsAllocated, BitsStored, HighBit, PixelRepresentation, SamplesPerPixel (US, one value each, in range) and
  PhotometricInterpretation present; NumberOfFrames (IS) an integer when present. Under a native transfer
  syntax Pixel Data is exactly Rows x Columns x SamplesPerPixel x BitsAllocated/8 x NumberOfFrames bytes (one pad
  byte allowed). Compressed pixel data is encapsulated (the walk checks its fragments) and the first frame's
  codestream header agrees with Rows, Columns and SamplesPerPixel (JPEG / JPEG-LS SOF, JPEG 2000 SIZ; RLE:
  its segment count); decoding it takes ~10-100x the whole C-STORE budget (bench/door_validation.py), so it is
  decoded before analysis instead (:mod:`dicom_node.inbound.integrity`): an instance that does not decode holds its
  series (never analysed) until it is re-sent.
* **CT Image**: Pixel Data present; ImagePositionPatient (3), ImageOrientationPatient (6), PixelSpacing (2) are
  numbers; RescaleSlope/RescaleIntercept/SliceThickness numbers when present; FrameOfReferenceUID present.
* **Segmentation**: Pixel Data, SegmentSequence, SegmentationType, SharedFunctionalGroupsSequence,
  PerFrameFunctionalGroupsSequence, NumberOfFrames.
* **SR** (every structured report class): ValueType, ConceptNameCodeSequence, ContinuityOfContent.
* **Grayscale Softcopy Presentation State**: ReferencedSeriesSequence, ContentLabel.
* **RT Structure Set**: StructureSetLabel, StructureSetROISequence, ROIContourSequence.

A refusal carries the DIMSE status (0xA900 "dataset does not match SOP class") and a reason naming the attribute,
never its value (values may be PHI).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import isfinite

from lesiontrack.dicom_node.inbound.storage import FIRST_FRAGMENT

DATASET_MISMATCH = 0xA900

UNDEFINED = 0xFFFFFFFF

# tags the checks read (their raw top-level values are collected during the structure walk)
ROWS, COLUMNS = 0x00280010, 0x00280011
SAMPLES, PHOTOMETRIC, PLANAR = 0x00280002, 0x00280004, 0x00280006
FRAMES = 0x00280008
BITS_ALLOCATED, BITS_STORED, HIGH_BIT, PIXEL_REPRESENTATION = 0x00280100, 0x00280101, 0x00280102, 0x00280103
PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA = 0x7FE00010, 0x7FE00008, 0x7FE00009
POSITION, ORIENTATION, PIXEL_SPACING = 0x00200032, 0x00200037, 0x00280030
SLICE_THICKNESS, RESCALE_INTERCEPT, RESCALE_SLOPE = 0x00180050, 0x00281052, 0x00281053
FRAME_OF_REFERENCE = 0x00200052

#: raw values the structure walk must collect for :func:`check_content`
CONTENT_TAGS = (
    FIRST_FRAGMENT, ROWS, COLUMNS, SAMPLES, PHOTOMETRIC, PLANAR, FRAMES, BITS_ALLOCATED, BITS_STORED, HIGH_BIT,
    PIXEL_REPRESENTATION, POSITION, ORIENTATION, PIXEL_SPACING, SLICE_THICKNESS, RESCALE_INTERCEPT, RESCALE_SLOPE,
)  # fmt: skip

_NAMES = {
    ROWS: "Rows", COLUMNS: "Columns", SAMPLES: "SamplesPerPixel", PHOTOMETRIC: "PhotometricInterpretation",
    PLANAR: "PlanarConfiguration", FRAMES: "NumberOfFrames", BITS_ALLOCATED: "BitsAllocated",
    BITS_STORED: "BitsStored", HIGH_BIT: "HighBit", PIXEL_REPRESENTATION: "PixelRepresentation",
    POSITION: "ImagePositionPatient", ORIENTATION: "ImageOrientationPatient", PIXEL_SPACING: "PixelSpacing",
    SLICE_THICKNESS: "SliceThickness", RESCALE_INTERCEPT: "RescaleIntercept", RESCALE_SLOPE: "RescaleSlope",
    FRAME_OF_REFERENCE: "FrameOfReferenceUID", PIXEL_DATA: "PixelData",
}  # fmt: skip

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
#: SR classes that are not documents with a content tree root (none today; keeps the prefix rule honest)
_SR_EXCEPTIONS: frozenset[str] = frozenset()

#: required top-level attributes (present, non-empty) per SOP class, as (tag, name)
_REQUIRED: dict[str, tuple[tuple[int, str], ...]] = {
    CT_IMAGE: ((PIXEL_DATA, "PixelData"), (FRAME_OF_REFERENCE, "FrameOfReferenceUID"), (POSITION,
               "ImagePositionPatient"), (ORIENTATION, "ImageOrientationPatient"), (PIXEL_SPACING, "PixelSpacing")),
    SEGMENTATION: ((PIXEL_DATA, "PixelData"), (0x00620002, "SegmentSequence"), (0x00620001, "SegmentationType"),
                   (0x52009229, "SharedFunctionalGroupsSequence"), (0x52009230, "PerFrameFunctionalGroupsSequence"),
                   (FRAMES, "NumberOfFrames")),
    GSPS: ((0x00081115, "ReferencedSeriesSequence"), (0x00700080, "ContentLabel")),
    RT_STRUCTURE_SET: ((0x30060002, "StructureSetLabel"), (0x30060020, "StructureSetROISequence"),
                       (0x30060039, "ROIContourSequence")),
}  # fmt: skip
_SR_REQUIRED = ((0x0040A040, "ValueType"), (0x0040A043, "ConceptNameCodeSequence"), (0x0040A050, "ContinuityOfContent"))

#: a sequence of undefined length whose first bytes are its delimiter is empty: the walk records its length as
#: undefined, so an empty undefined-length sequence passes as present (its items are checked by the analysis)
_BITS_ALLOCATED_OK = frozenset({1, 8, 16, 32, 64})
_PHOTOMETRIC_OK = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
    "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK", "YBR_PARTIAL_422", "XYB",
})  # fmt: skip


@dataclass(frozen=True)
class Refusal:
    """Why the door refuses an instance: DIMSE status and a reason without any value from the dataset."""

    status: int
    reason: str


class _Bad(Exception):
    pass


_ABSENT = (b"", 0)
_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}


def _us(raw: dict[int, bytes], present: dict[int, tuple[bytes, int]], tag: int, little: bool) -> int:
    """One US value (VR US, or unchecked under implicit VR), or _Bad naming the attribute."""
    v = raw.get(tag, b"")
    vr = present.get(tag, _ABSENT)[0]
    if len(v) != 2 or vr not in (b"US", b""):
        raise _Bad(f"{_NAMES[tag]} is not one US value")
    return int(_U16[little].unpack(v)[0])


def _text(raw: dict[int, bytes], tag: int) -> str:
    try:
        return raw.get(tag, b"").decode("ascii").strip(" \x00")
    except UnicodeDecodeError:
        raise _Bad(f"{_NAMES[tag]} is not ASCII") from None


def _numbers(raw: dict[int, bytes], present: dict[int, tuple[bytes, int]], tag: int, count: int | None) -> None:
    """A DS (or IS) value of ``count`` numbers (any count when None); _Bad when one does not parse."""
    vr = present.get(tag, _ABSENT)[0]
    if vr not in (b"DS", b"IS", b""):
        raise _Bad(f"{_NAMES[tag]} has VR {vr.decode('ascii', 'replace')}, not DS")
    parts = _text(raw, tag).split("\\")
    if count is not None and len(parts) != count:
        raise _Bad(f"{_NAMES[tag]} has {len(parts)} values, {count} needed")
    for p in parts:
        try:
            x = float(p)
        except ValueError:
            raise _Bad(f"{_NAMES[tag]} holds a value that is not a number") from None
        if not isfinite(x):  # NaN or infinite
            raise _Bad(f"{_NAMES[tag]} holds a value that is not a finite number")


def _frames(raw: dict[int, bytes], present: dict[int, tuple[bytes, int]]) -> int:
    if FRAMES not in present or not raw.get(FRAMES):
        return 1
    vr = present[FRAMES][0]
    if vr not in (b"IS", b""):
        raise _Bad("NumberOfFrames is not IS")
    try:
        n = int(_text(raw, FRAMES) or "1")
    except ValueError:
        raise _Bad("NumberOfFrames is not an integer") from None
    if n < 1:
        raise _Bad("NumberOfFrames is below 1")
    return n


def _pixel_module(
    raw: dict[int, bytes], present: dict[int, tuple[bytes, int]], little: bool, native: bool, transfer_syntax: str
) -> None:
    for tag in (ROWS, COLUMNS, SAMPLES, BITS_ALLOCATED, BITS_STORED, HIGH_BIT, PIXEL_REPRESENTATION, PHOTOMETRIC):
        if tag not in present or not present[tag][1]:
            raise _Bad(f"{_NAMES[tag]} missing (Image Pixel module)")
    rows, cols = _us(raw, present, ROWS, little), _us(raw, present, COLUMNS, little)
    spp, bits = _us(raw, present, SAMPLES, little), _us(raw, present, BITS_ALLOCATED, little)
    stored, high = _us(raw, present, BITS_STORED, little), _us(raw, present, HIGH_BIT, little)
    representation = _us(raw, present, PIXEL_REPRESENTATION, little)
    if rows < 1 or cols < 1:
        raise _Bad("Rows or Columns is 0")
    if spp not in (1, 3, 4):
        raise _Bad("SamplesPerPixel is not 1, 3 or 4")
    if bits not in _BITS_ALLOCATED_OK:
        raise _Bad("BitsAllocated is not 1, 8, 16, 32 or 64")
    if not 1 <= stored <= bits or high >= bits:
        raise _Bad("BitsStored or HighBit does not fit BitsAllocated")
    if representation not in (0, 1):
        raise _Bad("PixelRepresentation is not 0 or 1")
    if _text(raw, PHOTOMETRIC) not in _PHOTOMETRIC_OK:
        raise _Bad("PhotometricInterpretation is not a defined term")
    if spp > 1 and (PLANAR not in present or _us(raw, present, PLANAR, little) not in (0, 1)):
        raise _Bad("PlanarConfiguration missing or not 0/1 with SamplesPerPixel > 1")
    frames = _frames(raw, present)
    pixel_tag = next((t for t in (PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA) if t in present), None)
    if pixel_tag is None:
        return
    if not native:
        _encapsulated(transfer_syntax, raw.get(FIRST_FRAGMENT, b""), rows, cols, spp, bits)
        return
    length = present[pixel_tag][1]
    expected = (rows * cols * spp * bits * frames + 7) // 8
    if length not in (expected, expected + 1):
        raise _Bad(
            f"Pixel Data is {length} bytes; Rows x Columns x SamplesPerPixel x BitsAllocated/8 x NumberOfFrames "
            f"= {expected}"
        )


_JPEG_TS = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
})  # fmt: skip
_J2K_TS = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
})  # fmt: skip
_RLE_TS = "1.2.840.10008.1.2.5"
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})


def _frame_header(ts: str, frag: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the first frame's codestream header, or None when not found there."""
    if ts in _J2K_TS:
        at = frag.find(b"\xff\x4f\xff\x51")  # SOC, SIZ (also inside a JP2 wrapper's codestream box)
        if at < 0 or at + 42 > len(frag):
            return None
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", frag, at + 8)
        return ysiz - yo, xsiz - xo, struct.unpack_from(">H", frag, at + 40)[0]
    if ts in _JPEG_TS:
        pos = 2 if frag[:2] == b"\xff\xd8" else -1
        while pos >= 0 and pos + 4 <= len(frag):
            if frag[pos] != 0xFF:
                return None
            marker = frag[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            seg = struct.unpack_from(">H", frag, pos + 2)[0]
            if marker in _SOF:
                if pos + 10 > len(frag):
                    return None
                y, x = struct.unpack_from(">HH", frag, pos + 5)
                return (y if y else -1), x, frag[pos + 9]
            pos += 2 + seg
        return None
    return None


def _encapsulated(ts: str, frag: bytes, rows: int, cols: int, spp: int, bits: int) -> None:
    if ts == _RLE_TS:
        if len(frag) >= 4:
            segments = struct.unpack_from("<I", frag, 0)[0]
            if segments != spp * max(1, bits // 8):
                raise _Bad("RLE frame has another segment count than SamplesPerPixel x BitsAllocated/8")
        return
    header = _frame_header(ts, frag) if frag else None
    if header is None:
        return
    h_rows, h_cols, comps = header
    if (h_rows not in (-1, rows)) or h_cols != cols:
        raise _Bad("compressed frame size differs from Rows/Columns")
    if comps != spp:
        raise _Bad("compressed frame components differ from SamplesPerPixel")


def check_content(
    sop_class: str,
    raw: dict[int, bytes],
    present: dict[int, tuple[bytes, int]],
    little: bool,
    native: bool,
    transfer_syntax: str = "",
) -> Refusal | None:
    """The door's content check (see the module docstring); None when the instance may be stored.

    ``raw``: top-level values of :data:`CONTENT_TAGS` (b"" when absent); ``present``: every top-level tag with
    its (VR, value length) as the walk saw them (VR b"" under implicit VR); ``little``: little-endian transfer
    syntax; ``native``: uncompressed pixel data; ``raw[FIRST_FRAGMENT]``: the first bytes of the first frame
    of encapsulated pixel data."""
    try:
        required = _REQUIRED.get(sop_class)
        if required is None and sop_class.startswith(SR_PREFIX) and sop_class not in _SR_EXCEPTIONS:
            required = _SR_REQUIRED
        for tag, name in required or ():
            if tag not in present or present[tag][1] == 0:
                raise _Bad(f"{name} missing (required by the SOP class)")
        if any(t in present for t in (PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA)):
            _pixel_module(raw, present, little, native, transfer_syntax)
        if sop_class == CT_IMAGE:
            _numbers(raw, present, POSITION, 3)
            _numbers(raw, present, ORIENTATION, 6)
            _numbers(raw, present, PIXEL_SPACING, 2)
            for tag in (SLICE_THICKNESS, RESCALE_INTERCEPT, RESCALE_SLOPE):
                if raw.get(tag, b"").strip(b" \x00"):
                    _numbers(raw, present, tag, 1)
    except _Bad as exc:
        return Refusal(DATASET_MISMATCH, str(exc))
    return None
