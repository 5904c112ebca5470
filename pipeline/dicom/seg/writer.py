"""DICOM-SEG writer: the tracked lesions of one follow-up CT series as one Segmentation instance (highdicom).

One segment per *present* lesion, labelled with its Tracking ID and the radiologist's description within LO's 64
characters (``pipeline.dicom.lesion_names``; the full description in SegmentDescription), carrying its Tracking UID,
coded as
"Morphologically abnormal structure / Lesion", with the anatomic region when known and the segmentation engine's
name and version as algorithm identification. Unconfirmed new-lesion candidates (``meta["candidate"]``) are segments of
their own kind: "Finding / Abnormal opacity" (or "Abnormal lucency" when darker than the prior), algorithm type
AUTOMATIC, all in one colour (yellow) that no tracked lesion has, labelled "Candidate 1 (liver)". Masks are put back
onto the CT grid (exact when aligned, else nearest neighbour) and the SEG references the source CT slices frame by
frame (highdicom fills Derived Image / ReferencedSeriesSequence).

Encoding: ``binary`` (SOP class Segmentation, bit-packed, widest viewer support; default) or ``labelmap`` (Label Map
Segmentation, RLE, most compact; needs non-overlapping lesions). ``auto`` picks LABELMAP unless lesions overlap.
Only frames that contain lesion pixels are stored (``omit_empty_frames``).

Files are never overwritten: :func:`save_new` writes ``<SOPInstanceUID>.dcm`` and refuses an existing path.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from lesiontrack.config.version import SOFTWARE_NAME as _SOFTWARE_NAME
from lesiontrack.config.version import VERSION as _VERSION
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.pipeline.dicom.lesion_names import clean_description, display_name
from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion
from lesiontrack.pipeline.science.mask_grid import mask_onto_grid

log = logging.getLogger(__name__)

# SoftwareVersions of every SEG/SR we write: the package version (config/version.py, the one place)
SOFTWARE_NAME = _SOFTWARE_NAME
SOFTWARE_VERSION = _VERSION

# Display colours (CIELab via sRGB) cycled over the tracked lesions' segments; yellow is kept for candidates.
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (128, 128, 255),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


CANDIDATE_COLOUR = (255, 255, 0)  # every unconfirmed new-lesion candidate: one colour, none of the lesions'
# A candidate is a computer-aided-detection finding, not a tracked lesion: its own category and property type (the
# "Type of Finding" codes of DICOM CAD, CID 6101: denser than the prior → abnormal opacity, darker → lucency), so a
# viewer, a script or a reader's correction tells the two kinds of segment apart by code, not only by label.
CANDIDATE_CATEGORY = codes.SCT.Finding  # SCT 404684003
CANDIDATE_TYPE_DENSER = codes.cid6101.AbnormalOpacity  # DCM 112033
CANDIDATE_TYPE_DARKER = codes.cid6101.AbnormalLucency  # DCM 112062


def is_candidate(lesion: TrackedLesion) -> bool:
    """An unconfirmed new-lesion candidate (written with the candidate coding), not a tracked lesion."""
    return bool(lesion.meta.get("candidate"))


class SegWriteError(ValueError):
    """The lesions or source images cannot be encoded as a SEG."""


@dataclass
class SegWriteResult:
    dataset: hd.seg.Segmentation
    segment_numbers: dict[str, int] = field(default_factory=dict)  # tracking UID → segment number
    source_datasets: list[Dataset] = field(default_factory=list)  # source slices sorted along the slice normal
    grid: Volume | None = None  # geometry of the sorted source slices
    segmentation_type: str = "binary"
    segment_slices: dict[int, list[int]] = field(default_factory=dict)  # segment number → sorted slice indices


def anatomic_code(site: str | None) -> hd.sr.CodedConcept | None:
    """SNOMED CT code for a free-text anatomic site ("liver", "lymph node"), or None when unknown."""
    if not site:
        return None
    keyword = "".join(w.capitalize() for w in site.replace("_", " ").replace("-", " ").split())
    code = getattr(codes.SCT, keyword, None) if keyword else None
    if code is None:
        return None
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def sort_source_slices(datasets: Sequence[Dataset]) -> tuple[list[Dataset], Volume]:
    """Sort single-frame CT slices along the slice normal; return them and their grid (array of zeros)."""
    if not datasets:
        raise SegWriteError("no source images given for the SEG")
    datasets = [_with_sop_identity(ds) for ds in datasets]
    first = datasets[0]
    for ds in datasets:
        for kw in (
            "ImageOrientationPatient",
            "ImagePositionPatient",
            "PixelSpacing",
            "Rows",
            "Columns",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "FrameOfReferenceUID",
        ):
            if not ds.get(kw):
                raise SegWriteError(
                    f"source image {getattr(ds, 'filename', None) or ds.get('SOPInstanceUID', '?')} "
                    f"lacks {kw} (a SEG/SR must reference it)"
                )
        if ds.SeriesInstanceUID != first.SeriesInstanceUID:
            raise SegWriteError(
                f"source images from several series ({first.SeriesInstanceUID}, "
                f"{ds.SeriesInstanceUID}); one SEG references one series"
            )
    iop = np.array(first.ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = [float(np.dot(np.array(ds.ImagePositionPatient, float), normal)) for ds in datasets]
    order = np.argsort(pos, kind="stable")
    sorted_ds = [datasets[i] for i in order]
    gaps = np.diff(np.sort(pos))
    if len(gaps) and gaps.min() <= 1e-4:
        raise SegWriteError(f"series {first.SeriesInstanceUID}: two slices at the same position")
    sk = float(np.median(gaps)) if len(gaps) else float(first.get("SliceThickness", 1.0) or 1.0)
    ps = [float(v) for v in first.PixelSpacing]
    grid = Volume(
        np.zeros((len(sorted_ds), int(first.Rows), int(first.Columns)), np.uint8),
        origin=np.array(sorted_ds[0].ImagePositionPatient, float),
        spacing=np.array([ps[1], ps[0], sk], float),
        direction=np.stack([row, col, normal], 1),
    )
    return sorted_ds, grid


def _with_sop_identity(ds: Dataset) -> Dataset:
    """Some anonymisers blank SOP Class/Instance UID in the data set but keep them in the file meta: restore them."""
    if ds.get("SOPClassUID") and ds.get("SOPInstanceUID"):
        return ds
    meta = getattr(ds, "file_meta", None)
    cls = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    inst = ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else None)
    if not cls or not inst:
        raise SegWriteError(f"source image {getattr(ds, 'filename', '?')} has no SOP Class/Instance UID")
    fixed = copy.deepcopy(ds)
    fixed.SOPClassUID, fixed.SOPInstanceUID = cls, inst
    return fixed


def _mask_on_grid(lesion: TrackedLesion, grid: Volume) -> np.ndarray:
    return mask_onto_grid(lesion.mask, grid)


class SegHeader(TypedDict, total=False):
    """Where the SEG goes and who made it (keyword arguments of :func:`write_seg`)."""

    series_number: int  # 901 unless given
    instance_number: int
    series_description: str
    manufacturer: str
    software_version: str
    series_instance_uid: str | None
    sop_instance_uid: str | None
    workers: int  # highdicom's frame-encoding workers (0: in this thread)


@dataclass
class _Segments:
    """The present lesions with a non-empty mask on the grid: a label array plus each mask's slice range (crop)."""

    kept: list[TrackedLesion]
    labels: np.ndarray
    crops: list[tuple[int, np.ndarray]]
    overlap: bool


def write_seg(
    source_datasets: Sequence[Dataset],
    lesions: Sequence[TrackedLesion],
    *,
    segmentation_type: str = "binary",
    algorithm_type: str = "SEMIAUTOMATIC",
    **header: Unpack[SegHeader],
) -> SegWriteResult:
    """Build the SEG of ``lesions`` (present ones only) on the CT series ``source_datasets`` (metadata suffices)."""
    sorted_ds, grid = sort_source_slices(source_datasets)
    present = sorted(
        (les for les in lesions if les.status is not LesionStatus.VANISHED),
        key=lambda les: (les.identity.label, les.identity.tracking_id),
    )
    kind = segmentation_type.lower()
    if kind not in ("binary", "labelmap", "auto"):
        raise SegWriteError(f"unknown segmentation type {segmentation_type!r} (binary, labelmap or auto)")
    segs = _segments(present, grid, str(sorted_ds[0].SeriesInstanceUID))
    kept, crops, overlap = segs.kept, segs.crops, segs.overlap
    uids = [les.identity.tracking_uid for les in kept]
    if len(set(uids)) != len(uids):
        raise SegWriteError(f"duplicate tracking UIDs among lesions: {uids}")
    if kind == "auto":
        kind = "binary" if overlap else "labelmap"
    if kind == "labelmap" and overlap:
        raise SegWriteError("lesion masks overlap: LABELMAP cannot encode them (use binary)")
    if not overlap:
        # label-map style input: one integer per voxel (works for BINARY and LABELMAP)
        pixel, sources = segs.labels, sorted_ds
    else:
        pixel, sources = _stacked(segs, sorted_ds, grid)
    software_version = header.get("software_version", SOFTWARE_VERSION)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP
        if kind == "labelmap"
        else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(kept, algorithm_type, software_version),
        series_instance_uid=header.get("series_instance_uid") or hd.UID(),
        series_number=header.get("series_number", 901),
        sop_instance_uid=header.get("sop_instance_uid") or hd.UID(),
        instance_number=header.get("instance_number", 1),
        manufacturer=header.get("manufacturer", SOFTWARE_NAME),
        manufacturer_model_name=SOFTWARE_NAME,
        software_versions=software_version,
        device_serial_number="0",
        content_label="LESIONS",
        content_description="Tracked lesions",
        series_description=header.get("series_description", "LesionTrack lesions"),
        transfer_syntax_uid=RLELossless if kind == "labelmap" else ExplicitVRLittleEndian,
        omit_empty_frames=True,
        workers=header.get("workers", 0),
    )
    n = len(kept)
    log.debug("SEG %s: %d segments (%s) on series %s", seg.SOPInstanceUID, n, kind, sorted_ds[0].SeriesInstanceUID)
    slices_of = {i: [k0 + d for d in range(c.shape[0]) if c[d].any()] for i, (k0, c) in enumerate(crops, start=1)}
    return SegWriteResult(
        seg, {les.identity.tracking_uid: i for i, les in enumerate(kept, start=1)}, sorted_ds, grid, kind, slices_of
    )


def _segments(present: list[TrackedLesion], grid: Volume, series_uid: str) -> _Segments:
    """One pass, bounded memory: a label array for the whole grid plus each mask's slice range (crop)."""
    crops: list[tuple[int, np.ndarray]] = []
    kept: list[TrackedLesion] = []
    labels = np.zeros(grid.shape, np.uint8 if len(present) < 255 else np.uint16)
    overlap = False
    for les in present:
        m = _mask_on_grid(les, grid)
        ks = np.flatnonzero(m.any(axis=(1, 2)))
        if ks.size == 0:
            log.warning(
                "lesion %s (%s) has an empty mask on series %s: no segment written",
                les.identity.tracking_id,
                les.identity.tracking_uid,
                series_uid,
            )
            continue
        overlap = overlap or bool((labels[m] != 0).any())
        labels[m] = len(kept) + 1
        crops.append((int(ks[0]), m[ks[0] : ks[-1] + 1].copy()))
        kept.append(les)
        del m
    if not kept:
        raise SegWriteError(f"no present lesion with a non-empty mask for series {series_uid}")
    return _Segments(kept, labels, crops, overlap)


def _stacked(segs: _Segments, sorted_ds: list[Dataset], grid: Volume) -> tuple[np.ndarray, list[Dataset]]:
    """Stacked segments, restricted to slices that contain any lesion (keeps memory bounded)."""
    crops = segs.crops
    segs.labels = np.zeros((0,), np.uint8)  # the label array is not needed: free it
    slices = sorted({k0 + d for k0, c in crops for d in range(c.shape[0])})
    pos = {k: i for i, k in enumerate(slices)}
    pixel = np.zeros((len(slices), *grid.shape[1:], len(segs.kept)), bool)
    for s_idx, (k0, c) in enumerate(crops):
        for d in range(c.shape[0]):
            pixel[pos[k0 + d], :, :, s_idx] = c[d]
    return pixel, [sorted_ds[i] for i in slices]


def _descriptions(
    kept: list[TrackedLesion], algorithm_type: str, software_version: str
) -> list[hd.seg.SegmentDescription]:
    """One segment per lesion (numbered from 1): tracked lesions in the palette, candidates in their own category."""
    descriptions = []
    lesion_number = 0
    for number, les in enumerate(kept, start=1):
        ident = les.identity
        region = anatomic_code(ident.anatomic_site)
        candidate = is_candidate(les)
        algo_type = "AUTOMATIC" if candidate else algorithm_type.upper()
        algo = None
        if algo_type != "MANUAL":
            algo = hd.AlgorithmIdentificationSequence(
                name=les.engine or SOFTWARE_NAME,
                version=les.engine_version or software_version,
                family=codes.cid7162.ArtificialIntelligence,
            )
        if candidate:
            r, g, b = CANDIDATE_COLOUR
            category = CANDIDATE_CATEGORY
            darker = float(les.meta.get("contrast_hu", 1.0)) < 0
            prop = CANDIDATE_TYPE_DARKER if darker else CANDIDATE_TYPE_DENSER
        else:
            r, g, b = _PALETTE[lesion_number % len(_PALETTE)]
            lesion_number += 1
            category, prop = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=display_name(ident.tracking_id, ident.description),
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=algo_type,
                algorithm_identification=algo,
                tracking_uid=ident.tracking_uid,
                tracking_id=ident.tracking_id[:64],
                anatomic_regions=[region] if region is not None else None,
                display_color=hd.color.CIELabColor.from_rgb(r, g, b),
            )
        )
        said = clean_description(ident.tracking_id, ident.description)
        if said:  # the radiologist's full words (ST); the label above carries them within LO's 64 characters
            descriptions[-1].SegmentDescription = said[:1024]
    return descriptions


def save_new(dataset: Dataset, directory: str | Path) -> Path:
    """Write ``dataset`` to ``directory/<SOPInstanceUID>.dcm``; never overwrites an existing file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dataset.SOPInstanceUID}.dcm"
    with open(path, "xb") as fh:  # "x": fail if it exists — SEG/SR are never overwritten
        dataset.save_as(fh, enforce_file_format=True)
    return path
