"""Annotation objects as a PACS workstation or a planning system writes them, for tests, the demo and benchmarks:

* :func:`write_gsps` — a Grayscale Softcopy Presentation State (highdicom ``hd.pr``) holding, per lesion, the
  graphics a workstation saves: a long-axis line, a bidirectional pair, an arrow (shaft + head, with the label as a
  text object anchored at the tip), an ellipse, a circle, a point or a closed outline, in PIXEL units (corner-based
  column, row), on the CT image they are drawn on, with a text object labelling each lesion;
* :func:`write_rtstruct` — an RT Structure Set (pydicom, with the Structure Set, ROI Contour, RT ROI Observations,
  General Equipment and SOP Common modules) with one ROI per lesion: CLOSED_PLANAR contours per slice (each with its
  Contour Image Sequence) or a POINT.

Drawings come in patient mm (:class:`models.segmentation.drawing.Drawing`) and are mapped onto the image they lie
on; both writers take the CT headers (sorted or not).
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass
class Mark:
    """One lesion's annotation for :func:`write_gsps`: a drawing and the label written beside it."""

    drawing: Drawing
    label: str | None = None
    circle: bool = False  # write an ELLIPSE drawing as a CIRCLE (centre, rim point)


def _plane(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    iop = np.asarray(ds.ImageOrientationPatient, float)
    ps = [float(v) for v in ds.PixelSpacing]
    return np.asarray(ds.ImagePositionPatient, float), iop[:3], iop[3:], (ps[0], ps[1])


def _image_of(points: np.ndarray, headers: Sequence[Dataset]) -> Dataset:
    """The CT image the points lie on (nearest along the slice normal)."""
    _pos, r, c, _ = _plane(headers[0])
    n = np.cross(r, c)
    z = float(np.mean(points @ n))
    return min(headers, key=lambda h: abs(float(np.asarray(h.ImagePositionPatient, float) @ n) - z))


def to_pixels(points: np.ndarray, ds: Dataset) -> np.ndarray:
    """LPS mm on image ``ds`` → corner-based (column, row) (the inverse of the reference's image_to_patient)."""
    pos, r, c, (d_row, d_col) = _plane(ds)
    v = np.asarray(points, float).reshape(-1, 3) - pos
    return np.stack([v @ r / d_col + 0.5, v @ c / d_row + 0.5], -1)


def _graphic_objects(m: Mark, px_parts: list[np.ndarray]) -> list[hd.pr.GraphicObject]:
    """The GSPS graphics of one mark (``px_parts``: its parts in image pixels)."""
    d = m.drawing.kind
    if d in (DrawingKind.LINE, DrawingKind.BIDIRECTIONAL):
        return [hd.pr.GraphicObject("POLYLINE", p, "PIXEL") for p in px_parts]
    p = px_parts[0]
    if d is DrawingKind.ARROW:
        tip, tail = p[0], p[1]
        u = (tail - tip) / max(float(np.linalg.norm(tail - tip)), 1e-6)
        n = np.array([-u[1], u[0]], np.float32)
        head = np.array([tip + 3 * u + 2 * n, tip, tip + 3 * u - 2 * n], np.float32)
        return [hd.pr.GraphicObject("POLYLINE", p, "PIXEL"), hd.pr.GraphicObject("POLYLINE", head, "PIXEL")]
    if d is DrawingKind.ELLIPSE and m.circle:
        centre = (p[0] + p[1]) / 2
        return [hd.pr.GraphicObject("CIRCLE", np.array([centre, p[1]], np.float32), "PIXEL")]
    if d is DrawingKind.ELLIPSE:
        return [hd.pr.GraphicObject("ELLIPSE", p, "PIXEL")]
    if d is DrawingKind.POINT:
        return [hd.pr.GraphicObject("POINT", p[:1], "PIXEL")]
    # CONTOUR: a closed polyline (first point repeated)
    return [hd.pr.GraphicObject("POLYLINE", np.concatenate([p, p[:1]]).astype(np.float32), "PIXEL")]


def _text_object(label: str, kind: DrawingKind, px_parts: list[np.ndarray], img: Dataset) -> hd.pr.TextObject:
    """A mark's label: anchored at an arrow's tip, else in a text box beside the graphic."""
    if kind is DrawingKind.ARROW:
        tip_px = (float(px_parts[0][0][0]), float(px_parts[0][0][1]))
        return hd.pr.TextObject(label, "PIXEL", anchor_point=tip_px)
    allp = np.concatenate(px_parts)
    cols, rows = float(img.Columns), float(img.Rows)
    box_w, box_h = min(20.0, cols / 4), min(6.0, rows / 8)
    x0 = min(float(allp[:, 0].max()) + 2.0, cols - box_w)
    y0 = min(max(float(allp[:, 1].min()), 0.0), rows - box_h)
    return hd.pr.TextObject(label, "PIXEL", bounding_box=(x0, y0, x0 + box_w, y0 + box_h))


def write_gsps(
    headers: Sequence[Dataset],
    marks: Sequence[Mark],
    out: Path | str,
    *,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    layer: str = "MEASUREMENTS",
    manufacturer: str = "Workstation",
) -> Path:
    """A GSPS with the ``marks`` on the CT ``headers``' images; returns the file written."""
    headers = [copy.deepcopy(x) for x in headers]
    for h in headers:  # an empty Specific Character Set (some archives' CT) means the default repertoire
        if "SpecificCharacterSet" in h and not h.SpecificCharacterSet:
            del h.SpecificCharacterSet
    gl = hd.pr.GraphicLayer(layer_name=layer, order=1, description="lesion measurements")
    annotations = []
    used: dict[str, Dataset] = {}
    for m in marks:
        img = _image_of(m.drawing.all_points, headers)
        used[str(img.SOPInstanceUID)] = img
        px_parts = [to_pixels(p, img).astype(np.float32) for p in m.drawing.parts]
        objects = _graphic_objects(m, px_parts)
        texts = [_text_object(m.label, m.drawing.kind, px_parts, img)] if m.label else []
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[img], graphic_layer=gl, graphic_objects=objects, text_objects=texts or None
            )
        )
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=list(used.values()) or [headers[0]],
        series_instance_uid=series_uid or generate_uid(),
        series_number=90,
        sop_instance_uid=sop_uid or generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="Test",
        software_versions="1",
        device_serial_number="1",
        content_label="MEASUREMENTS",
        content_description="lesion measurements",
        graphic_annotations=annotations,
        graphic_layers=[gl],
        institution_name="Test Hospital",
        content_creator_name="Reader^One",
    )
    if "Laterality" not in pr:  # General Series Type 2C: dciodvfy asks for it on a CT-derived object
        pr.Laterality = ""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    pr.save_as(path, enforce_file_format=True)
    return path


def _referenced_frame(headers: Sequence[Dataset]) -> Dataset:
    """The structure set's frame of reference → study → series → every CT image it may contour."""
    ref = headers[0]
    contour_images = DicomSequence()
    for h in headers:
        item = Dataset()
        item.ReferencedSOPClassUID = h.SOPClassUID
        item.ReferencedSOPInstanceUID = h.SOPInstanceUID
        contour_images.append(item)
    series_item = Dataset()
    series_item.SeriesInstanceUID = ref.SeriesInstanceUID
    series_item.ContourImageSequence = contour_images
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, as required)
    study_item.ReferencedSOPInstanceUID = ref.StudyInstanceUID
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = ref.FrameOfReferenceUID
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    return frame_item


def _contour_item(number: int, pts: np.ndarray, headers: Sequence[Dataset]) -> Dataset:
    """One contour (a polygon, or a single point) on the CT image it lies on."""
    c = Dataset()
    c.ContourNumber = number
    img = _image_of(pts, headers)
    ci = Dataset()
    ci.ReferencedSOPClassUID = img.SOPClassUID
    ci.ReferencedSOPInstanceUID = img.SOPInstanceUID
    c.ContourImageSequence = DicomSequence([ci])
    c.ContourGeometricType = "POINT" if len(pts) == 1 else "CLOSED_PLANAR"
    c.NumberOfContourPoints = len(pts)
    c.ContourData = [f"{v:.3f}" for v in pts.reshape(-1)]
    return c


def write_rtstruct(
    headers: Sequence[Dataset],
    rois: Sequence[tuple[str, Sequence[np.ndarray]]],
    out: Path | str,
    *,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    interpreted_type: str = "GTV",
    manufacturer: str = "PlanningSystem",
) -> Path:
    """An RT Structure Set on the CT ``headers``: ``rois`` = (name, contours), each contour an (N, 3) LPS polygon on
    one slice (CLOSED_PLANAR) or a single point (POINT)."""
    ref = headers[0]
    now = dt.datetime.now()
    sop = sop_uid or generate_uid()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = sop
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        setattr(ds, kw, ref.get(kw, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 91
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "Test"
    ds.SoftwareVersions = "1"
    ds.FrameOfReferenceUID = ref.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "LESIONS"
    ds.StructureSetName = "lesions"
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(headers)])
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    colours = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]]
    for n, (name, contours) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = n
        roi.ReferencedFrameOfReferenceUID = ref.FrameOfReferenceUID
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = colours[(n - 1) % len(colours)]
        rc.ContourSequence = DicomSequence()
        for c_n, poly in enumerate(contours, start=1):
            rc.ContourSequence.append(_contour_item(c_n, np.asarray(poly, float).reshape(-1, 3), headers))
        ds.ROIContourSequence.append(rc)
        obs = Dataset()
        obs.ObservationNumber = n
        obs.ReferencedROINumber = n
        obs.RTROIInterpretedType = interpreted_type
        obs.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(obs)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(RTSTRUCT_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
