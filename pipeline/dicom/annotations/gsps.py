"""Grayscale Softcopy Presentation State (PS3.3 C.10.5): the graphic annotations a PACS workstation saves → lesions.

Per graphic annotation item (its own Referenced Image Sequence, else every image the presentation state lists —
prior-annotations reference §0.2) and per image: graphic objects in PIXEL units (corner-based (column, row), §0.1)
become patient points through the image plane of that CT slice. DISPLAY units (fractions of the displayed area) and
MATRIX units are not anatomical here: a warning names them.

Graphics on one image are grouped into lesions by geometry, with the layer name as a hint (vendors differ,
reference §2.1):

* two 2-point polylines crossing each other → a bidirectional pair (the longer is the long axis);
* a 2-point polyline with an arrow head (a short 3-point polyline whose middle vertex sits on one end), or whose end
  a text object's anchor point marks, or in a layer named like "arrow" → an arrow, tip at that end (a bare line in an
  arrow layer: the end nearer the text, else the first point, and a warning that the tip is a guess);
* any other 2-point polyline → a diameter (a short tick near another line's middle is that line's decoration);
* ELLIPSE → ellipse; CIRCLE → ellipse; a closed POLYLINE / INTERPOLATED → contour; POINT → point; an open polyline of
  three or more points (an angle, a path) → a warning.

Text objects label the lesion they are anchored on (or whose bounding box they sit nearest, within 40 mm); a text that
is only a measured value ("23.4 mm") is not a label. A label names the lesion (the same label on a later study is
the same lesion); a label used twice in one object, an image that is not in the CT series, or an annotation outside
the body is a warning, never a silent drop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.pipeline.dicom.annotations.common import (
    AnnotationWarning,
    ReadResult,
    circle_as_ellipse,
    drawing_prompt,
    identity_for,
    in_body,
    inside_ct,
    normalise_label,
    patient_key,
)
from lesiontrack.pipeline.dicom.sr.reader import ImageGeometry, image_geometries

GSPS_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.11.2",  # Color
    "1.2.840.10008.5.1.4.1.1.11.3",  # Pseudo-Color
    "1.2.840.10008.5.1.4.1.1.11.4",  # Blending
}

_VALUE_ONLY = re.compile(
    r"^\s*([-+]?\d+([.,]\d+)?\s*(mm2|mm²|cm2|cm²|mm|cm|hu|ml|cc|°|%)?\s*([x×/]\s*)?)+\s*$", re.IGNORECASE
)
_VALUE_PART = re.compile(r"[-+]?\d+([.,]\d+)?\s*(mm2|mm²|cm2|cm²|mm|cm|hu|ml|cc)\b", re.IGNORECASE)


@dataclass
class _Graphic:
    index: str  # "item 1, graphic 2"
    kind: str  # GraphicType
    layer: str
    px: np.ndarray  # (N, 2) column, row
    mm: np.ndarray  # (N, 3)
    normal: np.ndarray  # of the image plane
    item: int = 0  # the graphic annotation item it came from
    used: bool = False


@dataclass
class _Text:
    text: str
    anchor_mm: np.ndarray | None
    box_mm: np.ndarray | None
    anchor_px: np.ndarray | None
    item: int = 0


@dataclass
class _Lesion:
    drawing: Drawing
    what: str
    items: set[int] = field(default_factory=set)
    texts: list[str] = field(default_factory=list)
    caveat: str | None = None


def read_gsps_prompts(path: str | Path, ct: Volume, *, images: list[Dataset] | None = None) -> ReadResult:
    """Lesion prompts (with their drawings) from a presentation state on ``ct``'s series, and the warnings."""
    path = Path(path)
    ds = pydicom.dcmread(path)
    obj = f"GSPS {ds.get('SOPInstanceUID', '?')} ({path.name})"
    result = ReadResult()
    if str(ds.get("SOPClassUID", "")) not in GSPS_SOP_CLASSES:  # unreadable or another object: an error, not empty
        raise ValueError(f"{path}: not a presentation state (SOP class {ds.get('SOPClassUID')})")
    per_image = _per_image(ds, image_geometries(ct, images), obj, result.warnings)
    lesions: list[_Lesion] = []
    for graphics, texts in per_image.values():
        lesions.extend(_group(graphics, texts, obj, result.warnings))
    seen: dict[str, str] = {}
    key = patient_key(ct) or str(ds.get("PatientID", ""))
    for les in lesions:
        pts = les.drawing.all_points
        if not inside_ct(ct, pts):
            result.warnings.append(AnnotationWarning(obj, les.what, "lies outside the CT volume"))
            continue
        if not in_body(ct, pts):
            result.warnings.append(AnnotationWarning(obj, les.what, "lies outside the body (air only)"))
            continue
        label = _label(les.texts)
        if label is not None:
            norm = normalise_label(label)
            if norm in seen:
                result.warnings.append(
                    AnnotationWarning(obj, les.what, f"label {label!r} already names {seen[norm]}; not used")
                )
                continue
            seen[norm] = les.what
        if les.caveat:
            result.warnings.append(AnnotationWarning(obj, les.what, les.caveat))
        ident = identity_for(label, len(result.prompts) + 1, key, str(ds.get("SOPInstanceUID", path.name)))
        result.prompts.append(
            drawing_prompt(
                ident,
                les.drawing,
                f"GSPS {ds.get('SOPInstanceUID', '')} {ident.tracking_id}",
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                **({"segment_label": label} if label else {}),
            )
        )
    return result


def _per_image(
    ds: Dataset, geo: dict[str, ImageGeometry], obj: str, warnings: list[AnnotationWarning]
) -> dict[str, tuple[list[_Graphic], list[_Text]]]:
    """The usable graphics and texts of each graphic annotation item, per image they lie on."""
    listed = [
        str(r.ReferencedSOPInstanceUID)
        for s in ds.get("ReferencedSeriesSequence", [])
        for r in s.get("ReferencedImageSequence", [])
    ]
    per_image: dict[str, tuple[list[_Graphic], list[_Text]]] = {}
    for a, item in enumerate(ds.get("GraphicAnnotationSequence", []), start=1):
        layer = str(item.get("GraphicLayer", ""))
        targets = [str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedImageSequence", [])] or listed
        where = f"annotation {a} (layer {layer or '-'})"
        objects = list(item.get("GraphicObjectSequence", []))
        texts = list(item.get("TextObjectSequence", []))
        if not targets:
            warnings.append(AnnotationWarning(obj, where, "references no image"))
            continue
        if len(targets) > 1 and (objects or texts):
            warnings.append(
                AnnotationWarning(obj, where, f"applies to {len(targets)} images; a lesion lies on one: not used")
            )
            continue
        uid = targets[0]
        g = geo.get(uid)
        if g is None:
            warnings.append(AnnotationWarning(obj, where, f"image {uid} is not in the CT series"))
            continue
        graphics, labels = per_image.setdefault(uid, ([], []))
        for n, go in enumerate(objects, start=1):
            kind = str(go.get("GraphicType", ""))
            name = f"{where}, graphic {n} ({kind})"
            units = str(go.get("GraphicAnnotationUnits", ""))
            if units != "PIXEL":
                warnings.append(AnnotationWarning(obj, name, f"{units} units are not anatomical; not used"))
                continue
            px = np.asarray(go.get("GraphicData", []), float).reshape(-1, 2)
            if px.size == 0:
                warnings.append(AnnotationWarning(obj, name, "no points"))
                continue
            graphics.append(_Graphic(name, kind, layer, px, g.to_patient(px), np.cross(g.row_dir, g.col_dir), a))
        labels.extend(_text(t, g, a) for t in texts)
    return per_image


def _text(t: Dataset, g: ImageGeometry, item: int) -> _Text:
    """A text object with its anchor point and bounding box in patient coordinates (when given in pixels)."""
    anchor = None
    anchor_px = None
    if "AnchorPoint" in t and str(t.get("AnchorPointAnnotationUnits", "")) == "PIXEL":
        anchor_px = np.asarray(t.AnchorPoint, float).reshape(2)
        anchor = g.to_patient(anchor_px)[0]
    box = None
    if "BoundingBoxTopLeftHandCorner" in t and str(t.get("BoundingBoxAnnotationUnits", "")) == "PIXEL":
        corners = np.array([t.BoundingBoxTopLeftHandCorner, t.BoundingBoxBottomRightHandCorner], float)
        box = g.to_patient(corners)
    return _Text(str(t.get("UnformattedTextValue", "")).strip(), anchor, box, anchor_px, item)


def _group(graphics: list[_Graphic], texts: list[_Text], obj: str, warnings: list[AnnotationWarning]) -> list[_Lesion]:
    """Lesions from the graphics and texts on one image (see the module docstring)."""
    lines = [g for g in graphics if g.kind == "POLYLINE" and len(g.px) == 2]
    heads = [g for g in graphics if g.kind == "POLYLINE" and len(g.px) == 3 and not _closed(g.px)]
    tips = _arrow_tips(heads, lines)
    _mark_ticks(lines)
    out = _bidirectional_pairs(lines, tips)
    out += _line_lesions(lines, tips, texts)
    out += _shape_lesions(graphics, lines, obj, warnings)
    for les in out:  # the annotation items each lesion's graphics came from
        les.items = {g.item for g in graphics if g.index in les.what}
    _place_labels(out, texts, obj, warnings)
    return out


def _arrow_tips(heads: list[_Graphic], lines: list[_Graphic]) -> dict[int, int]:
    """Arrow heads: a V whose middle vertex sits on a line's end (line index → the end it points with)."""
    tips: dict[int, int] = {}
    for h in heads:
        for li, line in enumerate(lines):
            for tip_end in (0, 1):
                if np.linalg.norm(h.px[1] - line.px[tip_end]) <= 1.5:
                    tips[li] = tip_end
                    h.used = True
    return tips


def _mark_ticks(lines: list[_Graphic]) -> None:
    """Decoration ticks: short lines near another line's middle (marked used)."""
    for line in lines:
        for other in lines:
            if other is line or other.used:
                continue
            near_middle = np.linalg.norm(line.mm.mean(0) - other.mm.mean(0)) < 0.2 * max(_length(other), 1e-6)
            if _length(line) < 0.3 * _length(other) and near_middle:
                line.used = True


def _bidirectional_pairs(lines: list[_Graphic], tips: dict[int, int]) -> list[_Lesion]:
    """Bidirectional pairs: two lines crossing each other."""
    out: list[_Lesion] = []
    free = [li for li, line in enumerate(lines) if not line.used and li not in tips]
    for a_i in free:
        for b_i in free:
            la, lb = lines[a_i], lines[b_i]
            if a_i >= b_i or la.used or lb.used or not _cross(la.px, lb.px):
                continue
            long_, short = (la, lb) if _length(la) >= _length(lb) else (lb, la)
            la.used = lb.used = True
            what = f"{long_.index} + {short.index} (bidirectional)"
            out.append(_Lesion(Drawing(DrawingKind.BIDIRECTIONAL, [long_.mm, short.mm], what), what))
    return out


def _line_lesions(lines: list[_Graphic], tips: dict[int, int], texts: list[_Text]) -> list[_Lesion]:
    """The other lines: an arrow when a head or an anchored text marks its tip, else a single diameter."""
    out: list[_Lesion] = []
    for li, line in enumerate(lines):
        if line.used:
            continue
        line.used = True
        anchored = [t for t in texts if t.anchor_px is not None]
        end: int | None = tips.get(li)
        caveat = None
        if end is None:
            for t in anchored:
                if t.anchor_px is None:
                    continue
                d = [float(np.linalg.norm(t.anchor_px - line.px[e])) for e in (0, 1)]
                if min(d) <= 1.5:
                    end = int(np.argmin(d))
        if end is None and "arrow" in line.layer.lower():
            end, caveat = 0, "an arrow without a marked head: the tip is taken to be its first point (check it)"
        if end is not None:
            pts = line.mm if end == 0 else line.mm[::-1]
            what = f"{line.index} (arrow)"
            out.append(_Lesion(Drawing(DrawingKind.ARROW, [pts], what), what, caveat=caveat))
        else:
            what = f"{line.index} (line)"
            out.append(_Lesion(Drawing(DrawingKind.LINE, [line.mm], what), what))
    return out


def _shape_lesions(
    graphics: list[_Graphic], lines: list[_Graphic], obj: str, warnings: list[AnnotationWarning]
) -> list[_Lesion]:
    """Ellipses, circles, closed outlines and points."""
    out: list[_Lesion] = []
    for g in graphics:
        if g.used or g in lines:
            continue
        g.used = True
        if g.kind == "ELLIPSE" and len(g.px) == 4:
            out.append(_Lesion(Drawing(DrawingKind.ELLIPSE, [g.mm], g.index), g.index))
        elif g.kind == "CIRCLE" and len(g.px) == 2:
            ellipse = circle_as_ellipse(g.mm[0], g.mm[1], g.normal)
            out.append(_Lesion(Drawing(DrawingKind.ELLIPSE, [ellipse], g.index), g.index))
        elif g.kind in ("POLYLINE", "INTERPOLATED") and len(g.px) >= 3 and (_closed(g.px) or g.kind == "INTERPOLATED"):
            pts = g.mm[:-1] if _closed(g.px) else g.mm
            if len(pts) >= 3:
                out.append(_Lesion(Drawing(DrawingKind.CONTOUR, [pts], g.index), g.index))
            else:
                warnings.append(AnnotationWarning(obj, g.index, "a closed outline of fewer than 3 points"))
        elif g.kind == "POINT":
            out.append(_Lesion(Drawing(DrawingKind.POINT, [g.mm[:1]], g.index), g.index))
        elif g.kind in ("POLYLINE", "INTERPOLATED"):
            warnings.append(
                AnnotationWarning(
                    obj, g.index, f"an open {g.kind.lower()} of {len(g.px)} points is not a lesion outline"
                )
            )
        else:
            warnings.append(AnnotationWarning(obj, g.index, f"unsupported graphic type {g.kind!r}"))
    return out


def _place_labels(out: list[_Lesion], texts: list[_Text], obj: str, warnings: list[AnnotationWarning]) -> None:
    """Labels: a text in an annotation item holding one lesion labels it (a workstation's one measurement per
    item); otherwise anchored texts label the lesion they point at, others the nearest lesion within 40 mm."""
    for t in texts:
        if not t.text:
            continue
        own = [les for les in out if t.item in les.items]
        if len(own) == 1:
            own[0].texts.append(t.text)
            continue
        where = t.anchor_mm if t.anchor_mm is not None else (t.box_mm.mean(0) if t.box_mm is not None else None)
        if where is None or not out:
            warnings.append(AnnotationWarning(obj, f"text {t.text!r}", "not placed on the image; not used as a label"))
            continue
        dist = [float(np.min(np.linalg.norm(les.drawing.all_points - where, axis=1))) for les in out]
        best = int(np.argmin(dist))
        if dist[best] <= 40.0:
            out[best].texts.append(t.text)
        elif _label([t.text]) is not None:
            warnings.append(AnnotationWarning(obj, f"text {t.text!r}", "near no graphic; not used as a label"))


def _label(texts: list[str]) -> str | None:
    """The first text that is more than a measured value (its values removed)."""
    for t in texts:
        if _VALUE_ONLY.match(t):
            continue
        rest = " ".join(_VALUE_PART.sub("", t).split()).strip(" :;,-")
        if rest:
            return rest
    return None


def _length(g: _Graphic) -> float:
    return float(np.linalg.norm(g.mm[-1] - g.mm[0]))


def _closed(px: np.ndarray) -> bool:
    return len(px) >= 4 and float(np.linalg.norm(px[0] - px[-1])) <= 1e-3


def _cross(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two 2-point segments (column, row) intersect."""

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> float:
        return float((q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0]))

    d1, d2 = orient(a[0], a[1], b[0]), orient(a[0], a[1], b[1])
    d3, d4 = orient(b[0], b[1], a[0]), orient(b[0], b[1], a[1])
    return d1 * d2 <= 0 and d3 * d4 <= 0


def gsps_labels(ds: pydicom.Dataset) -> list[str]:
    """The lesion labels a presentation state's (``ds``, already read) texts carry (values removed), in order, each
    once: read without a CT, so that the lesions an object names are known before its study's CT is here (issue 31
    C)."""
    out: dict[str, str] = {}
    for item in ds.get("GraphicAnnotationSequence", []):
        for t in item.get("TextObjectSequence", []):
            label = _label([str(t.get("UnformattedTextValue", "")).strip()])
            if label is not None:
                out.setdefault(normalise_label(label), label)
    return list(out.values())
