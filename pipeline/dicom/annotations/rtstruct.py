"""RT Structure Set (PS3.3 C.8.8.5/C.8.8.6): each lesion ROI's contours → a lesion, named by its ROI name.

* CLOSED_PLANAR contours on two or more slices become a mask prompt on the CT grid (each contour filled at the voxel
  centres inside it; several contours on one slice by even-odd rule, so a contour inside another is a hole —
  nesting decides, not order); contours on one slice only become a drawn contour, whose 3-D extent comes from the
  image (:mod:`models.segmentation.from_drawing`). A contour is placed on its slice through its Contour Image
  Sequence when present, else by its position along the slice normal (within half a slice).
* A POINT ROI becomes a point drawing.
* ROIs whose RT ROI Interpreted Type says they are not a lesion (EXTERNAL, ORGAN, PTV, CTV, AVOIDANCE, ISOCENTER,
  MARKER, BOLUS, …) are listed as warnings, as are contours off the CT series, a frame of reference other than the
  CT's, open or non-planar contours, an ROI name used twice and an ROI without contours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from skimage.draw import polygon

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.dicom.annotations.common import (
    AnnotationWarning,
    ReadResult,
    drawing_prompt,
    identity_for,
    normalise_label,
    patient_key,
)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
LESION_TYPES = {"", "GTV"}


def roi_kinds(ds: Dataset) -> dict[int, str]:
    """Each ROI's interpreted type (upper case, "" when not given), by ROI number."""
    return {
        int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "").upper()
        for o in ds.get("RTROIObservationsSequence", [])
    }


def lesion_roi_names(ds: Dataset) -> list[str]:
    """The names of the structure set's ROIs of a lesion type (:data:`LESION_TYPES`), in order ("ROI n" unnamed)."""
    kinds = roi_kinds(ds)
    return [
        str(r.get("ROIName", "")) or f"ROI {r.ROINumber}"
        for r in ds.get("StructureSetROISequence", [])
        if kinds.get(int(r.ROINumber), "") in LESION_TYPES
    ]


def read_rtstruct_prompts(path: str | Path, ct: Volume) -> ReadResult:
    """Lesion prompts from a structure set on ``ct``'s frame of reference, and the warnings."""
    path = Path(path)
    ds = pydicom.dcmread(path, force=True)
    obj = f"RTSTRUCT {ds.get('SOPInstanceUID', '?')} ({path.name})"
    result = ReadResult()
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:  # unreadable or another object: an error, not empty
        raise ValueError(f"{path}: not an RT Structure Set (SOP class {ds.get('SOPClassUID')})")
    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])}
    frames = {
        int(r.ROINumber): str(r.get("ReferencedFrameOfReferenceUID", "")) for r in ds.get("StructureSetROISequence", [])
    }
    kinds = roi_kinds(ds)
    ct_frame = str(ct.meta.get("FrameOfReferenceUID", "") or "")
    slice_of_sop = {str(u): k for k, u in enumerate(ct.meta.get("SOPInstanceUIDs") or [])}
    key = patient_key(ct) or str(ds.get("PatientID", ""))
    seen: dict[str, str] = {}
    for rc in ds.get("ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        name = names.get(number, "") or f"ROI {number}"
        what = f"ROI {number} {name!r}"
        kind = kinds.get(number, "")
        if kind not in LESION_TYPES:
            result.warnings.append(AnnotationWarning(obj, what, f"interpreted type {kind}: not a lesion"))
            continue
        if ct_frame and frames.get(number) and frames[number] != ct_frame:
            result.warnings.append(AnnotationWarning(obj, what, "another frame of reference than the CT's"))
            continue
        norm = normalise_label(name)
        if norm in seen:
            result.warnings.append(AnnotationWarning(obj, what, f"ROI name already used by {seen[norm]}; not used"))
            continue
        contours = list(rc.get("ContourSequence", []))
        if not contours:
            result.warnings.append(AnnotationWarning(obj, what, "has no contours"))
            continue
        polys, points = _contours(contours, what, ct, slice_of_sop, obj, result.warnings)
        ident = identity_for(name, len(result.prompts) + 1, key, str(ds.get("SOPInstanceUID", path.name)))
        source = f"RTSTRUCT {ds.get('SOPInstanceUID', '')} {name}"
        meta = {"segment_label": name, "sop_instance_uid": str(ds.get("SOPInstanceUID", ""))}
        prompt, warning = _roi_prompt(ct, polys, points, ident, source, meta, what)
        if warning is not None:
            result.warnings.append(AnnotationWarning(obj, what, warning))
        if prompt is None:
            continue
        result.prompts.append(prompt)
        seen[norm] = what
    return result


def _contours(
    contours: list[Dataset],
    what: str,
    ct: Volume,
    slice_of_sop: dict[str, int],
    obj: str,
    warnings: list[AnnotationWarning],
) -> tuple[dict[int, list[np.ndarray]], list[np.ndarray]]:
    """An ROI's closed planar contours per CT slice, and its points."""
    polys: dict[int, list[np.ndarray]] = {}
    points: list[np.ndarray] = []
    for c_i, c in enumerate(contours, start=1):
        xyz = np.asarray(c.get("ContourData", []), float).reshape(-1, 3)
        gtype = str(c.get("ContourGeometricType", ""))
        cwhat = f"{what} contour {c_i} ({gtype})"
        if gtype == "POINT" and len(xyz):
            points.append(xyz[:1])
            continue
        if gtype != "CLOSED_PLANAR" or len(xyz) < 3:
            warnings.append(AnnotationWarning(obj, cwhat, "not a closed planar contour; not used"))
            continue
        k = _slice_of(c, xyz, ct, slice_of_sop)
        if k is None:
            warnings.append(AnnotationWarning(obj, cwhat, "not on a slice of the CT series; not used"))
            continue
        polys.setdefault(k, []).append(xyz)
    return polys, points


def _roi_prompt(
    ct: Volume,
    polys: dict[int, list[np.ndarray]],
    points: list[np.ndarray],
    ident: LesionIdentity,
    source: str,
    meta: dict[str, str],
    what: str,
) -> tuple[Prompt | None, str | None]:
    """The ROI's prompt (a mask from contours on several slices, one outline, or a point; None: nothing usable) and
    what to warn about."""
    if len(polys) >= 2:
        mask = _fill(ct, polys)
        if not mask.any():
            return None, "its contours enclose no voxel centre"
        prompt = Prompt(
            ident,
            PromptKind.MASK,
            mask=ct.with_array(mask.astype(np.uint8)),
            source=source,
            meta={**meta, "prompt_origin": "contours"},
        )
        return prompt, None
    if len(polys) == 1:
        (only,) = polys.values()
        warning = "several contours on one slice: the largest used" if len(only) > 1 else None
        largest = max(only, key=lambda p: float(np.ptp(p, axis=0).prod() + np.ptp(p, axis=0).sum()))
        drawing = Drawing(DrawingKind.CONTOUR, [largest], f"{what} (one slice)")
        return drawing_prompt(ident, drawing, source, **meta), warning
    if points:
        drawing = Drawing(DrawingKind.POINT, [points[0]], f"{what} (point)")
        return drawing_prompt(ident, drawing, source, **meta), None
    return None, None


def _slice_of(c: object, xyz: np.ndarray, ct: Volume, slice_of_sop: dict[str, int]) -> int | None:
    for ref in getattr(c, "ContourImageSequence", None) or []:
        k = slice_of_sop.get(str(ref.ReferencedSOPInstanceUID))
        if k is not None:
            return k
    kk = ct.patient_to_index(xyz)[:, 2]
    k = int(np.rint(float(kk.mean())))
    if float(np.ptp(kk)) > 0.5 or abs(float(kk.mean()) - k) > 0.5 or not 0 <= k < ct.shape[0]:
        return None
    return k


def _fill(ct: Volume, polys: dict[int, list[np.ndarray]]) -> np.ndarray:

    out = np.zeros(ct.shape, bool)
    for k, items in polys.items():
        plane = np.zeros(ct.shape[1:], bool)
        for xyz in items:
            ijk = ct.patient_to_index(xyz)
            rows, cols = polygon(ijk[:, 1], ijk[:, 0], shape=plane.shape)
            part = np.zeros_like(plane)
            part[rows, cols] = True
            plane ^= part  # even-odd: a contour inside another is a hole
        out[k] = plane
    return out
