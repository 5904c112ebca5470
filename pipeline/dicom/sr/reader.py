"""TID 1500 SR reader: a prior Measurement Report (ours, OHIF's, dcmqi's, highdicom's) → lesions with tracking identity.

* :func:`read_sr` walks the content tree with pydicom (robust to other writers' variants) and returns every
  measurement group: tracking identifier/UID, finding site, NUM measurements, spatial coordinates (2-D SCOORD converted
  to LPS mm through the referenced image's geometry, SCOORD3D as is), referenced SEG segment, qualitative evaluations,
  the time point, and the RECIST response container written by :mod:`pipeline.dicom.sr.writer`.
* :func:`read_sr_prompts` → one :class:`~models.segmentation.prompts.Prompt` per lesion (groups merged by Tracking
  UID): POINTS for point annotations, BOX for lines / polylines / ellipses / circles / polygons. A group whose
  Tracking Identifier is a cornerstone tool tag (OHIF: ``Cornerstone3DTools@^0.1.0:Bidirectional``) is named by its
  TEXT Comment (DCM 121106, OHIF's label; :func:`name_from_label`), e.g. an SR a radiologist saved in OHIF after
  editing the measurements of our OHIF SR (:mod:`pipeline.dicom.sr.viewer`).
* :func:`read_sr_measurements` → our own :class:`~pipeline.science.measurements.LesionMeasurement` per lesion (round
trip).

2-D coordinates need the referenced image's position/orientation/spacing: from the SR's Image Library (TID 1600),
from ``images`` (headers of the CT slices) or from ``ct.meta["SOPInstanceUIDs"]`` (a volume read by
``models.imaging.dicom_read`` whose slices match the instances). SCOORD (0, 0) is the top-left corner of the first
pixel, i.e. pixel centre (i, j) has SCOORD (i + 0.5, j + 0.5).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom import Dataset

from lesiontrack.db.status import LesionStatus
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.dicom.annotations.common import AnnotationWarning, drawing_prompt
from lesiontrack.pipeline.dicom.annotations.sr_drawings import drawing_from_shapes
from lesiontrack.pipeline.dicom.lesion_names import SEPARATOR
from lesiontrack.pipeline.dicom.seg.reader import read_seg
from lesiontrack.pipeline.science.measurements import Axis, LesionMeasurement

log = logging.getLogger(__name__)

SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.35",
}

# concept codes (value, scheme) used below
TRACKING_ID = ("112039", "DCM")
TRACKING_UID = ("112040", "DCM")
MEASUREMENT_GROUP = ("125007", "DCM")
IMAGING_MEASUREMENTS = ("126010", "DCM")
IMAGE_LIBRARY = ("111028", "DCM")
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")
FINDING_SITE = {("363698007", "SCT"), ("G-C0E3", "SRT")}
FINDING = {("121071", "DCM")}
TIME_POINT = ("C2348792", "UMLS")
COMMENT = ("121106", "DCM")  # OHIF 3.13 (@cornerstonejs/adapters LabelData) keeps a measurement's label here
# our private lesion-status codes (pipeline.dicom.sr.writer.LT, scheme 99LTRK) → status
STATUS_OF_CODE = {"LT002": LesionStatus.PRESENT, "LT003": LesionStatus.VANISHED, "LT004": LesionStatus.NEW}
SUBJECT_TIME_POINT_ID = ("126070", "DCM")
REFERENCED_SEGMENT = ("121191", "DCM")
LONG_AXIS = {("103339001", "SCT"), ("G-A185", "SRT")}
SHORT_AXIS = {("103340004", "SCT"), ("G-A186", "SRT")}
VOLUME = ("118565006", "SCT")
DIAMETER = {("81827009", "SCT"), ("LT058", "99LTRK")}  # SCT Diameter (older results), our "Maximum 3D diameter"
#: volume units → mm3 (our results say ml since issue 29; older ones and other writers mm3 or cm3)
_MM3_PER_UNIT = {"mm3": 1.0, "ml": 1000.0, "mL": 1000.0, "cm3": 1000.0, "l": 1e6, "L": 1e6}
MEAN = ("373098007", "SCT")
SD = ("386136009", "SCT")
LESION_STATUS = ("LT001", "99LTRK")
_LIB_POS = {"110901": 0, "110902": 1, "110903": 2}
_LIB_ORI = {"110904": 0, "110905": 1, "110906": 2, "110907": 3, "110908": 4, "110909": 5}


class SrReadError(ValueError):
    """The file is not a readable TID 1500 SR; the message names the file."""


@dataclass
class ImageGeometry:
    position: np.ndarray  # IPP (3)
    row_dir: np.ndarray  # IOP[0:3] (direction of increasing column index)
    col_dir: np.ndarray  # IOP[3:6]
    spacing: tuple[float, float]  # (row spacing, column spacing) = PixelSpacing

    def to_patient(self, colrow: np.ndarray) -> np.ndarray:
        """SCOORD (column, row) pairs → LPS mm."""
        cr = np.asarray(colrow, float).reshape(-1, 2) - 0.5
        return (
            self.position[None]
            + cr[:, :1] * self.spacing[1] * self.row_dir[None]
            + cr[:, 1:2] * self.spacing[0] * self.col_dir[None]
        )

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ImageGeometry:
        iop = np.array(ds.ImageOrientationPatient, float)
        ps = [float(v) for v in ds.PixelSpacing]
        return cls(np.array(ds.ImagePositionPatient, float), iop[:3], iop[3:], (ps[0], ps[1]))


@dataclass
class Shape:
    graphic_type: str
    points_mm: np.ndarray | None  # (N, 3) LPS; None when the image geometry is unknown
    pixel_points: np.ndarray | None  # (N, 2) for 2-D SCOORD
    image_uid: str | None
    purpose: tuple[str, str] | None = None  # the concept of the SCOORD (or of its parent NUM)


@dataclass
class NumItem:
    code: tuple[str, str]
    meaning: str
    value: float
    unit: str
    shapes: list[Shape] = field(default_factory=list)
    derivation: str | None = None


@dataclass
class SrGroup:
    tracking_uid: str | None
    tracking_id: str | None
    finding_site: str | None = None
    finding: str | None = None
    time_point: str | None = None
    nums: list[NumItem] = field(default_factory=list)
    shapes: list[Shape] = field(default_factory=list)
    referenced_segment: tuple[str, int] | None = None  # (SEG SOP Instance UID, segment number)
    qualitative: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # name → (value, scheme, meaning)
    comment: str | None = None  # TEXT "Comment" (DCM 121106): OHIF's label of the measurement

    def num(self, codes_: Iterable[tuple[str, str]] | tuple[str, str]) -> NumItem | None:
        wanted: set[tuple[str, str]] = (
            {(str(codes_[0]), str(codes_[1]))}
            if isinstance(codes_, tuple) and isinstance(codes_[0], str)
            else set(cast("Iterable[tuple[str, str]]", codes_))
        )
        return next((n for n in self.nums if n.code in wanted), None)


@dataclass
class SrContents:
    path: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    groups: list[SrGroup] = field(default_factory=list)
    response: dict[str, Any] = field(default_factory=dict)  # from the Qualitative Evaluations container
    predecessors: list[str] = field(default_factory=list)  # SOP Instance UIDs of earlier versions

    def tracking_uids(self) -> list[str]:
        seen: list[str] = []
        for g in self.groups:
            if g.tracking_uid and g.tracking_uid not in seen:
                seen.append(g.tracking_uid)
        return seen


def _meaning(item: Dataset, seq: str) -> str | None:
    """The code meaning of ``item``'s ``seq`` code, None when the item has none."""
    c = _code(item, seq)
    return c[2] if c is not None else None


def _xyz(p: np.ndarray) -> tuple[float, float, float]:
    return (float(p[0]), float(p[1]), float(p[2]))


def _code(item: Dataset, seq: str = "ConceptNameCodeSequence") -> tuple[str, str, str] | None:
    s = item.get(seq)
    if not s:
        return None
    c = s[0]
    value = c.get("CodeValue") or c.get("LongCodeValue") or c.get("URNCodeValue") or ""
    return (str(value), str(c.get("CodingSchemeDesignator", "")), str(c.get("CodeMeaning", "")))


def _key(item: Dataset) -> tuple[str, str]:
    c = _code(item)
    return (c[0], c[1]) if c else ("", "")


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def _find(item: Dataset, key: tuple[str, str]) -> Dataset | None:
    return next((c for c in _children(item) if _key(c) == key), None)


def _image_library(root: Dataset) -> dict[str, ImageGeometry]:
    lib = _find(root, IMAGE_LIBRARY)
    out: dict[str, ImageGeometry] = {}
    if lib is None:
        return out

    def visit(node: Dataset, inherited: dict[str, float]) -> None:
        vals = dict(inherited)
        for c in _children(node):
            if c.ValueType == "NUM" and c.get("MeasuredValueSequence"):
                vals[_key(c)[0]] = float(c.MeasuredValueSequence[0].NumericValue)
        for c in _children(node):
            if c.ValueType == "IMAGE":
                own = dict(vals)
                for cc in _children(c):
                    if cc.ValueType == "NUM" and cc.get("MeasuredValueSequence"):
                        own[_key(cc)[0]] = float(cc.MeasuredValueSequence[0].NumericValue)
                try:
                    pos = np.array([own[k] for k in ("110901", "110902", "110903")])
                    ori = np.array([own[k] for k in ("110904", "110905", "110906", "110907", "110908", "110909")])
                    geom = ImageGeometry(pos, ori[:3], ori[3:], (own["111066"], own["111026"]))
                except KeyError:
                    continue
                out[str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] = geom
            elif c.ValueType == "CONTAINER":
                visit(c, vals)

    visit(lib, {})
    return out


def _geometry_lookup(root: Dataset, images: Sequence[Dataset] | None, ct: Volume | None) -> dict[str, ImageGeometry]:
    geo = _image_library(root)
    for ds in images or []:
        if "ImagePositionPatient" in ds and "SOPInstanceUID" in ds:
            geo.setdefault(str(ds.SOPInstanceUID), ImageGeometry.from_dataset(ds))
    if ct is not None and ct.meta.get("SOPInstanceUIDs") and ct.meta.get("slices_match_instances", True):
        for k, uid in enumerate(ct.meta["SOPInstanceUIDs"]):
            if uid in geo:
                continue
            pos = ct.index_to_patient(np.array([0.0, 0.0, k]))
            geo[str(uid)] = ImageGeometry(
                pos, ct.direction[:, 0], ct.direction[:, 1], (float(ct.spacing[1]), float(ct.spacing[0]))
            )
    return geo


def _shape(item: Dataset, geo: dict[str, ImageGeometry], purpose: tuple[str, str] | None) -> Shape | None:
    gtype = str(item.get("GraphicType", ""))
    data = np.array(item.get("GraphicData", []), float)
    if item.ValueType == "SCOORD3D":
        return Shape(gtype, data.reshape(-1, 3), None, None, purpose)
    if item.ValueType != "SCOORD":
        return None
    px = data.reshape(-1, 2)
    img = next((c for c in _children(item) if c.ValueType == "IMAGE"), None)
    uid = str(img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) if img is not None else None
    g = geo.get(uid) if uid else None
    return Shape(gtype, g.to_patient(px) if g is not None else None, px, uid, purpose)


def _group(item: Dataset, geo: dict[str, ImageGeometry]) -> SrGroup:
    g = SrGroup(None, None)
    for c in _children(item):
        key, vt = _key(c), c.ValueType
        code = _code(c)
        if key == TRACKING_UID and vt == "UIDREF":
            g.tracking_uid = str(c.UID)
        elif vt == "TEXT":
            _text_item(c, key, g)
        elif vt == "CODE":
            _code_item(c, key, code, g)
        elif vt == "NUM":
            _num_item(c, key, code, geo, g)
        elif vt in ("SCOORD", "SCOORD3D"):
            s = _shape(c, geo, key)
            if s is not None:
                g.shapes.append(s)
        elif vt == "IMAGE" and key == REFERENCED_SEGMENT:
            g.referenced_segment = _segment_reference(c)
        elif vt == "CONTAINER":  # TID 1502 time point context may be nested in some writers
            for cc in _children(c):
                if _key(cc) == TIME_POINT and cc.ValueType == "TEXT":
                    g.time_point = str(cc.TextValue)
    return g


def _text_item(c: Dataset, key: tuple[str, str], g: SrGroup) -> None:
    """A TEXT item of a group: Tracking Identifier, time point or the (first) comment."""
    if key == TRACKING_ID:
        g.tracking_id = str(c.TextValue)
    elif key == TIME_POINT:
        g.time_point = str(c.TextValue)
    elif key == COMMENT and g.comment is None:
        g.comment = " ".join(str(c.TextValue).split()) or None


def _code_item(c: Dataset, key: tuple[str, str], code: tuple[str, str, str] | None, g: SrGroup) -> None:
    """A CODE item of a group: finding site, finding, or a qualitative evaluation."""
    if key in FINDING_SITE:
        g.finding_site = _meaning(c, "ConceptCodeSequence")
    elif key in FINDING:
        g.finding = _meaning(c, "ConceptCodeSequence")
    elif code is not None:
        val = _code(c, "ConceptCodeSequence")
        if val is not None:
            g.qualitative[code[2]] = val


def _num_item(
    c: Dataset, key: tuple[str, str], code: tuple[str, str, str] | None, geo: dict[str, ImageGeometry], g: SrGroup
) -> None:
    """A NUM item of a group: a measurement with the coordinates it was inferred from."""
    mv = c.get("MeasuredValueSequence")
    if not mv:  # a value-less NUM (cornerstoneTools 4's arrow "Center"): its geometry still marks the lesion
        for cc in _children(c):
            if cc.ValueType in ("SCOORD", "SCOORD3D") and (s := _shape(cc, geo, key)) is not None:
                g.shapes.append(s)
        return
    unit = _code(mv[0], "MeasurementUnitsCodeSequence")
    num = NumItem(key, code[2] if code else "", float(mv[0].NumericValue), unit[0] if unit else "")
    for cc in _children(c):
        if cc.ValueType in ("SCOORD", "SCOORD3D"):
            s = _shape(cc, geo, key)
            if s is not None:
                num.shapes.append(s)
        elif cc.ValueType == "CODE" and _key(cc) == ("121401", "DCM"):  # Derivation
            num.derivation = _meaning(cc, "ConceptCodeSequence")
    g.nums.append(num)


def _segment_reference(c: Dataset) -> tuple[str, int]:
    """(SEG SOP Instance UID, segment number) of an IMAGE item referencing a segment."""
    ref = c.ReferencedSOPSequence[0]
    nums = ref.get("ReferencedSegmentNumber")
    n = int(nums[0] if isinstance(nums, (list, pydicom.multival.MultiValue)) else nums) if nums else 1
    return str(ref.ReferencedSOPInstanceUID), n


def read_sr(path: str | Path, *, images: Sequence[Dataset] | None = None, ct: Volume | None = None) -> SrContents:
    """Parse a TID 1500 Measurement Report."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise SrReadError(f"{path}: not a readable DICOM file ({exc})") from exc
    if ds.get("SOPClassUID") not in SR_SOP_CLASSES:
        raise SrReadError(f"{path}: not a structured report (SOP class {ds.get('SOPClassUID')})")
    root_code = _code(ds)
    if root_code is None or (root_code[0], root_code[1]) != ("126000", "DCM"):
        raise SrReadError(f"{path}: root concept is {root_code}, not (126000, DCM) Imaging Measurement Report")
    geo = _geometry_lookup(ds, images, ct)
    out = SrContents(str(path), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID))
    for pred in ds.get("PredecessorDocumentsSequence", []):
        for series in pred.get("ReferencedSeriesSequence", []):
            out.predecessors += [str(x.ReferencedSOPInstanceUID) for x in series.get("ReferencedSOPSequence", [])]
    measurements = _find(ds, IMAGING_MEASUREMENTS)
    for c in _children(measurements) if measurements is not None else []:
        if _key(c) == MEASUREMENT_GROUP:
            out.groups.append(_group(c, geo))
    qual = _find(ds, QUALITATIVE_EVALUATIONS)
    if qual is not None:
        for c in _children(qual):
            code = _code(c)
            if code is None:
                continue
            if c.ValueType == "CODE":
                v = _code(c, "ConceptCodeSequence")
                out.response[code[2]] = {"code": v[0], "scheme": v[1], "meaning": v[2]} if v else None
            elif c.ValueType == "NUM" and c.get("MeasuredValueSequence"):
                out.response[code[2]] = float(c.MeasuredValueSequence[0].NumericValue)
    return out


# -- prompts ---------------------------------------------------------------------------------------------------------


def _derived_uid(*parts: str) -> str:
    h = hashlib.sha256("|".join(parts).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def _box_from_points(pts: np.ndarray, is_line: bool) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS box around planar shape points; flat axes get a thickness (lines: their length)."""
    lo, hi = pts.min(0), pts.max(0)
    ext = hi - lo
    big = float(ext.max())
    flat = ext < 1.0
    fill = big if is_line or not (~flat).any() else float(ext[~flat].mean())
    centre = (lo + hi) / 2
    half = np.where(flat, fill / 2, ext / 2)
    if is_line:  # a diameter: the lesion lies in the ball spanned by it
        half = np.full(3, big / 2)
    return centre - half, centre + half


def _find_seg_files(directory: Path) -> list[Path]:
    """SEG files next to the SR (headers only)."""
    found = []
    for f in sorted(directory.iterdir()) if directory.is_dir() else []:
        if not f.is_file():
            continue
        try:
            h = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:
            continue
        if str(h.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.66."):
            found.append(f)
    return found


def _segment_mask(ref: tuple[str, int], seg_files: Sequence[Path], ct: Volume | None) -> Volume | None:

    for f in seg_files:
        h = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        if str(h.get("SOPInstanceUID", "")) != ref[0]:
            continue
        seg = read_seg(f, ct)
        return next((s.mask for s in seg.segments if s.number == ref[1]), None)
    return None


def read_sr_prompts(
    path: str | Path,
    ct: Volume | None = None,
    *,
    images: Sequence[Dataset] | None = None,
    seg_files: Sequence[str | Path] | None = None,
    warnings: list[AnnotationWarning] | None = None,
) -> list[Prompt]:
    """One prompt per lesion (groups merged by Tracking UID); groups without any usable coordinate are skipped
    (and listed in ``warnings`` as :class:`pipeline.dicom.annotations.common.AnnotationWarning` when it is given). A
    prompt's 2-D drawing (line, bidirectional, arrow, ellipse, contour, point) travels in ``meta["drawing"]``.

    A group that only references a SEG segment (dcmqi style) becomes a MASK prompt when that SEG is among
    ``seg_files`` (default: the SEG files in the SR's folder).
    """
    contents = read_sr(path, images=images, ct=ct)
    if seg_files is None and any(g.referenced_segment for g in contents.groups):
        seg_files = _find_seg_files(Path(path).parent)
    seg_paths = [Path(f) for f in (seg_files or [])]
    prompts: list[Prompt] = []
    for les in _lesions(contents):
        prompt = _lesion_prompt(les, seg_paths, ct, warnings)
        if prompt is not None:
            prompts.append(prompt)
    log.debug("read SR %s: %d prompt(s)", contents.sop_instance_uid, len(prompts))
    return prompts


@dataclass
class _Lesion:
    """One lesion of an SR: its measurement groups merged by Tracking UID."""

    contents: SrContents
    uid: str
    n: int  # 1-based, in the order of first appearance
    groups: list[SrGroup]

    def first(self, attribute: str) -> str | None:
        """The first of its groups' values of ``attribute`` that is set."""
        return next((v for g in self.groups if (v := getattr(g, attribute))), None)


def _lesions(contents: SrContents) -> list[_Lesion]:
    """The lesions of an SR: its measurement groups merged by Tracking UID, numbered in order of appearance."""
    merged: dict[str, list[SrGroup]] = {}
    for i, g in enumerate(contents.groups):
        merged.setdefault(g.tracking_uid or _derived_uid(contents.sop_instance_uid, "group", str(i)), []).append(g)
    return [_Lesion(contents, uid, n, groups) for n, (uid, groups) in enumerate(merged.items(), start=1)]


def sr_lesion_identities(path: str | Path) -> list[LesionIdentity]:
    """The lesions an SR names, as :func:`read_sr_prompts` names them, read without a CT (no coordinates needed)."""
    return [_identity(les) for les in _lesions(read_sr(path))]


def _lesion_prompt(
    les: _Lesion, seg_paths: list[Path], ct: Volume | None, warnings: list[AnnotationWarning] | None
) -> Prompt | None:
    """The lesion's prompt: its drawing, points or box, or the SEG segment it references; None when unusable."""
    contents, groups, n = les.contents, les.groups, les.n
    shapes = [s for g in groups for s in [*g.shapes, *(x for num in g.nums for x in num.shapes)]]
    usable = [s for s in shapes if s.points_mm is not None and len(s.points_mm)]
    seg_ref = next((g.referenced_segment for g in groups if g.referenced_segment), None)
    if not usable and seg_ref is not None:
        mask = _segment_mask(seg_ref, seg_paths, ct)
        if mask is not None:
            site = les.first("finding_site")
            return Prompt(
                LesionIdentity(
                    les.uid,
                    les.first("tracking_id") or f"L{n}",
                    n,
                    site,
                    "lymph node" in (site or "").lower(),
                    description=_described(les.first("finding")),
                ),
                PromptKind.MASK,
                mask=mask,
                source=f"SR {contents.sop_instance_uid} → SEG {seg_ref[0]} segment {seg_ref[1]}",
            )
    if not usable:
        if warnings is not None:
            why = "its coordinates reference images not in the CT series" if shapes else "no coordinates"
            warnings.append(_warning(contents, groups, n, why, lesion=_identity(les)))
        if shapes:
            log.warning(
                "SR %s lesion %s: coordinates reference images of unknown geometry; skipped (pass the CT)",
                contents.sop_instance_uid,
                les.uid,
            )
        return None
    return _shape_prompt(les, usable, ct, warnings)


def _shape_prompt(
    les: _Lesion, usable: list[Shape], ct: Volume | None, warnings: list[AnnotationWarning] | None
) -> Prompt:
    """A lesion drawn with coordinates: its drawing, else its points, else the box around its shapes."""
    contents, groups, n = les.contents, les.groups, les.n
    label = les.first("comment")
    ident = _identity(les)
    text = ident.tracking_id
    source = f"SR {contents.sop_instance_uid} {text}"
    drawing, why_not = _drawing(usable, ct, f"SR {contents.sop_instance_uid} {text}")
    if drawing is not None:
        extra = {"segment_label": label} if label else {}
        return drawing_prompt(ident, drawing, source, graphic_types=sorted({s.graphic_type for s in usable}), **extra)
    if warnings is not None and why_not:
        warnings.append(_warning(contents, groups, n, f"{why_not}; its box is used"))
    if all(s.graphic_type in ("POINT", "MULTIPOINT") for s in usable):
        pts = np.concatenate([s.points_mm for s in usable if s.points_mm is not None])
        meta = {"segment_label": label} if label else {}
        return Prompt(ident, PromptKind.POINTS, points_mm=pts, source=source, meta=meta)
    pts = np.concatenate([_shape_outline(s) for s in usable if s.graphic_type not in ("POINT", "MULTIPOINT")])
    is_line = (
        all(
            s.graphic_type == "POLYLINE" and s.points_mm is not None and len(s.points_mm) == 2
            for s in usable
            if s.graphic_type not in ("POINT", "MULTIPOINT")
        )
        and len(usable) == 1
    )
    return Prompt(
        ident,
        PromptKind.BOX,
        box_mm=_box_from_points(pts, is_line),
        source=source,
        meta={
            "graphic_types": sorted({s.graphic_type for s in usable}),
            **({"segment_label": label} if label else {}),
        },
    )


def _drawing(shapes: list[Shape], ct: Volume | None, what: str) -> tuple[Drawing | None, str | None]:

    normal = np.asarray(ct.direction[:, 2], float) if ct is not None else np.array([0.0, 0.0, 1.0])
    try:
        return drawing_from_shapes(shapes, normal, what)
    except ValueError as exc:
        return None, str(exc)


def _warning(
    contents: SrContents, groups: list[SrGroup], n: int, why: str, lesion: LesionIdentity | None = None
) -> AnnotationWarning:
    name = next((g.comment or g.tracking_id for g in groups if g.comment or g.tracking_id), None) or f"group {n}"
    return AnnotationWarning(f"SR {contents.sop_instance_uid} ({Path(contents.path).name})", name, why, lesion)


def _identity(les: _Lesion) -> LesionIdentity:
    """The lesion a measurement group names (its Tracking Identifier, else its label, else ``L<n> <site>``)."""
    tracking_id = les.first("tracking_id")
    site = les.first("finding_site")
    description = _described(les.first("finding"))
    if not tracking_id or is_tool_tag(tracking_id):  # OHIF's tool tag names the tool, not the lesion
        text, said = name_from_label(les.first("comment"), f"L{les.n}" + (f" {site.lower()}" if site else ""))
        description = said or description
    else:
        text = tracking_id
    is_node = any("lymph node" in (x or "").lower() for g in les.groups for x in (g.finding_site, g.finding))
    return LesionIdentity(les.uid, text, les.n, site, is_node, description=description)


def _shape_outline(s: Shape) -> np.ndarray:
    pts = np.asarray(s.points_mm, float)
    if s.graphic_type == "CIRCLE" and len(pts) >= 2:  # centre + a point on the circumference
        r = float(np.linalg.norm(pts[1] - pts[0]))
        # circle in the image plane: use the plane's axes when known, else an axis-aligned square
        return np.array(
            [pts[0] + d for d in (np.array([r, 0, 0]), np.array([-r, 0, 0]), np.array([0, r, 0]), np.array([0, -r, 0]))]
        )
    return pts  # ELLIPSE: the 4 axis end points; polylines as is


def is_tool_tag(tracking_identifier: str) -> bool:
    """A cornerstone tool tag (``Cornerstone3DTools@^0.1.0:Length``, ``cornerstoneTools@^4.0.0:Bidirectional``): the
    Tracking Identifier OHIF writes for every measurement, whatever lesion it is."""
    head, sep, _tool = tracking_identifier.partition(":")
    return bool(sep) and head.lower().startswith("cornerstone") and "@" in head


_ID_LIKE = re.compile(r"^[A-Z]{1,2}\d+\b")


def name_from_label(label: str | None, fallback: str) -> tuple[str, str | None]:
    """(Tracking ID, description) from an OHIF measurement label: ``"L2 liver: hypodense lesion"`` (our display name,
    :mod:`pipeline.dicom.lesion_names`, back from an SR that OHIF saved) splits at the first ": "; a label that looks
    like an
    ID (``"L2 liver"``, ``"N1"``) is the ID; any other text is the radiologist's description of the lesion ``fallback``
    names."""
    if not label:
        return fallback, None
    head, sep, tail = label.partition(SEPARATOR)
    if sep and head.strip() and tail.strip():
        return head.strip(), tail.strip()
    if _ID_LIKE.match(label):
        return label, None
    return fallback, label


# -- our own measurements back ---------------------------------------------------------------------------------------


def read_sr_measurements(
    path: str | Path, *, images: Sequence[Dataset] | None = None, ct: Volume | None = None
) -> dict[str, LesionMeasurement]:
    """Measurements written by :mod:`pipeline.dicom.sr.writer`, per Tracking UID (centre comes from the SEG, not the
    SR)."""
    contents = read_sr(path, images=images, ct=ct)
    out: dict[str, LesionMeasurement] = {}
    for g in contents.groups:
        if not g.tracking_uid:
            continue
        m = out.get(g.tracking_uid)
        if m is None:
            tid = g.tracking_id or ""
            if is_tool_tag(tid):  # an OHIF-shaped group (pipeline.dicom.sr.viewer): the name is in its Comment
                tid = name_from_label(g.comment, "")[0]
            m = out[g.tracking_uid] = LesionMeasurement(
                tracking_uid=g.tracking_uid,
                tracking_id=tid,
                series_uid=None,
                anatomic_site=g.finding_site,
            )
            m.status = LesionStatus.PRESENT
        status = g.qualitative.get("Lesion status")
        if status:
            m.status = STATUS_OF_CODE.get(status[0], m.status)
        vol = g.num(VOLUME)
        if vol is not None:
            m.volume_mm3 = vol.value * _MM3_PER_UNIT.get(vol.unit, 1.0)
        diam = g.num(DIAMETER)
        if diam is not None:
            m.max_3d_diameter_mm = diam.value
        mean, sd = g.num(MEAN), g.num(SD)
        if mean is not None:
            m.hu_mean = mean.value
        if sd is not None:
            m.hu_sd = sd.value
        for codes_, attr in ((LONG_AXIS, "long_axis"), (SHORT_AXIS, "short_axis")):
            item = g.num(codes_)
            if item is None or item.value == 0:
                continue
            shapes = item.shapes or (
                [s for s in g.shapes if s.graphic_type == "POLYLINE"] if attr == "long_axis" else []
            )
            axis = Axis(item.value, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), -1)
            if shapes and shapes[0].points_mm is not None and len(shapes[0].points_mm) >= 2:
                p = shapes[0].points_mm
                axis = Axis(item.value, _xyz(p[0]), _xyz(p[-1]), -1)
            setattr(m, attr, axis)
        if g.finding_site and not m.anatomic_site:
            m.anatomic_site = g.finding_site
        m.is_node = m.is_node or "lymph node" in (g.finding_site or "").lower()
    return out


#: Finding codes that say nothing about the lesion beyond "a lesion" (not worth showing as its description)
_GENERIC_FINDINGS = {"lesion", "tumor", "tumour", "mass", "neoplasm", "finding", "measurement"}


def _described(finding: str | None) -> str | None:
    """An SR finding as the lesion's description, unless it is a generic 'Lesion'."""
    if not finding or finding.strip().lower() in _GENERIC_FINDINGS:
        return None
    return finding.strip()


def image_geometries(ct: Volume | None, images: Sequence[Dataset] | None = None) -> dict[str, ImageGeometry]:
    """SOP Instance UID → image plane of the CT's slices (from their headers or the volume's instance list): what a
    2-D annotation (SR SCOORD, GSPS) needs to reach patient coordinates."""
    return _geometry_lookup(Dataset(), images, ct)
