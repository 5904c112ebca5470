"""Volume → DICOM CT Image Storage series (one file per slice), for the phantom, synthesis and tests.

Geometry is written exactly: ImageOrientationPatient = the i and j direction columns, ImagePositionPatient of
slice k = ``origin + k·sk·direction[:, 2]``, PixelSpacing = (sj, si). Pixels are stored as signed 16-bit HU
(RescaleSlope 1, RescaleIntercept 0), rounded — so a round trip is exact in geometry and within 0.5 HU.
Patient/study/series/frame-of-reference identity is passed in; nothing is invented except per-instance UIDs.

The slice normal of a DICOM plane is row × column; a volume with a left-handed direction matrix is written with
its k axis reversed so the files describe the same voxels (reading it back gives the right-handed equivalent).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lesiontrack.config.version import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from lesiontrack.models.imaging.volume import Volume


def _ds_number(x: float) -> str:
    """A DS value (≤ 16 characters) that round-trips the float as closely as DS allows."""
    for digits in range(12, 4, -1):
        s = f"{x:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{x:.6e}"


@dataclass(frozen=True)
class CTSeriesHeader:
    """Who and what a written CT series is: patient, study, series and frame of reference (passed in, never
    invented), and the descriptive attributes of the series."""

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    study_date: str
    study_time: str = "120000"
    series_number: int = 1
    series_description: str = ""
    study_description: str = ""
    accession_number: str = ""
    study_id: str = "1"
    issuer_of_patient_id: str | None = None
    patient_birth_date: str = ""
    patient_sex: str = ""
    manufacturer: str = "LesionTrack"
    body_part: str = "CHEST"
    window: tuple[float, float] = (40.0, 400.0)
    slice_thickness: float | None = None  # None: the slice spacing


def write_ct_series(
    volume: Volume,
    out_dir: Path | str,
    header: CTSeriesHeader,
    *,
    sop_instance_uids: list[str] | None = None,
    filename: str = "CT{k:04d}.dcm",
) -> list[Path]:
    """Write ``volume`` (HU) as a CT series into ``out_dir``; returns the file paths in k order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels, origin, direction = _int16_planes(volume)
    (si, sj, sk), nk = volume.spacing, pixels.shape[0]
    if sop_instance_uids is not None and len(sop_instance_uids) != nk:
        raise ValueError(f"{len(sop_instance_uids)} SOPInstanceUIDs for {nk} slices")
    now = _dt.datetime.now()

    base = Dataset()
    for keyword, value in _FIXED_ATTRIBUTES:
        setattr(base, keyword, value)
    base.StudyDate, base.StudyTime = header.study_date, header.study_time
    base.SeriesDate, base.SeriesTime = header.study_date, header.study_time
    base.ContentDate, base.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    base.AccessionNumber = header.accession_number
    base.Manufacturer = header.manufacturer
    base.StudyDescription = header.study_description
    base.SeriesDescription = header.series_description
    base.BodyPartExamined = header.body_part
    base.PatientName = header.patient_name
    base.PatientID = header.patient_id
    if header.issuer_of_patient_id:
        base.IssuerOfPatientID = header.issuer_of_patient_id
    base.PatientBirthDate = header.patient_birth_date
    base.PatientSex = header.patient_sex
    base.SliceThickness = _ds_number(float(header.slice_thickness if header.slice_thickness is not None else sk))
    base.StudyInstanceUID = header.study_uid
    base.SeriesInstanceUID = header.series_uid
    base.StudyID = header.study_id
    base.SeriesNumber = int(header.series_number)
    base.FrameOfReferenceUID = header.frame_of_reference_uid
    base.ImageOrientationPatient = [_ds_number(v) for v in (*direction[:, 0], *direction[:, 1])]
    base.Rows, base.Columns = int(pixels.shape[1]), int(pixels.shape[2])
    base.PixelSpacing = [_ds_number(sj), _ds_number(si)]
    base.WindowCenter, base.WindowWidth = _ds_number(header.window[0]), _ds_number(header.window[1])

    paths: list[Path] = []
    for k in range(nk):
        sop_uid = UID(sop_instance_uids[k]) if sop_instance_uids else generate_uid()
        ds = _slice_dataset(base, pixels[k], sop_uid, k, origin + k * sk * direction[:, 2], direction[:, 2])
        path = out / filename.format(k=k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: the attributes every slice of every series we write has (pydicom writes them in tag order)
_FIXED_ATTRIBUTES: tuple[tuple[str, object], ...] = (
    ("SpecificCharacterSet", "ISO_IR 192"),
    ("ImageType", ["DERIVED", "SECONDARY", "AXIAL"]),
    ("SOPClassUID", CTImageStorage),
    ("Modality", "CT"),
    ("ReferringPhysicianName", ""),
    ("KVP", "120"),
    ("PatientPosition", "HFS"),
    ("AcquisitionNumber", 1),
    ("PositionReferenceIndicator", ""),
    ("SamplesPerPixel", 1),
    ("PhotometricInterpretation", "MONOCHROME2"),
    ("BitsAllocated", 16),
    ("BitsStored", 16),
    ("HighBit", 15),
    ("PixelRepresentation", 1),
    ("RescaleIntercept", "0"),
    ("RescaleSlope", "1"),
    ("RescaleType", "HU"),
    ("BurnedInAnnotation", "NO"),
)


def _int16_planes(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The volume's voxels as rounded signed 16-bit planes, with the origin and direction they are written with
    (a left-handed volume's k axis reversed: DICOM's normal is row × column)."""
    arr = volume.array
    origin, direction, sk = volume.origin, volume.direction.copy(), volume.spacing[2]
    if np.linalg.det(direction) < 0:  # DICOM's normal is row × col: flip k so the planes stay right-handed
        arr = arr[::-1]
        origin = origin + (arr.shape[0] - 1) * sk * direction[:, 2]
        direction[:, 2] = -direction[:, 2]
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr)
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    if lo < -32768 or hi > 32767:
        raise ValueError(f"values {lo}..{hi} do not fit signed 16-bit HU")
    return np.ascontiguousarray(arr.astype("<i2")), origin, direction


def _slice_dataset(
    base: Dataset, plane: np.ndarray, sop_uid: UID, k: int, ipp: np.ndarray, normal: np.ndarray
) -> Dataset:
    """Slice ``k`` of the series: ``base`` with its instance identity, position and pixels, as a Part 10 file."""
    ds = Dataset()
    ds.update(base)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds_number(v) for v in ipp]
    ds.SliceLocation = _ds_number(float(ipp @ normal))
    ds.SmallestImagePixelValue = int(plane.min())
    ds.LargestImagePixelValue = int(plane.max())
    ds["SmallestImagePixelValue"].VR = "SS"
    ds["LargestImagePixelValue"].VR = "SS"
    ds.PixelData = plane.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    return ds
