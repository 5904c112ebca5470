"""DICOM CT series → :class:`~models.imaging.volume.Volume` with exact patient geometry.

* Files are grouped by SeriesInstanceUID (:func:`group_series`); a mixed input without ``series_uid`` is refused.
* Slices are sorted by their position along the slice normal (never by InstanceNumber); the slice spacing comes
  from the positions, not from SliceThickness.
* Gantry tilt (slices stacked along a direction that is not the plane normal) and irregular gaps are resampled
  onto a regular grid in the image-plane frame (row, column, normal) by linear interpolation between the two
  neighbouring acquired planes; what was done is written to ``volume.meta["geometry_fix"]``.
* Pixel values are converted to HU with RescaleSlope/Intercept; compressed transfer syntaxes are decoded by
  pydicom's pixel handlers (pylibjpeg: JPEG 2000, JPEG lossless, JPEG-LS via pyjpegls, RLE).
* Enhanced / Legacy Converted Enhanced CT multi-frame objects are read frame by frame from their functional groups.
* Localizers (ImageType contains LOCALIZER), non-image objects and inconsistent series are refused with a
  :class:`SeriesError` that names the file and the problem.

``volume.meta`` carries the DICOM identity needed downstream (keys are DICOM keywords): PatientID,
IssuerOfPatientID, PatientName (never log it), StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID,
StudyDate, SOPClassUID, Modality, plus ``SOPInstanceUIDs`` / ``source_files`` / ``source_frames`` in sorted
(k) order of the *acquired* slices and ``slices_match_instances`` (False when the grid was resampled, i.e. output
slice k is no longer acquired instance k).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from scipy import ndimage

from lesiontrack.models.imaging.volume import Volume

log = logging.getLogger(__name__)

Array = np.ndarray
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "KO", "PR", "REG", "RTPLAN", "RTDOSE", "DOC"}
ORIENTATION_TOL = 1e-4
SPACING_TOL_MM = 1e-3
AIR_HU = -1024.0
NO_SERIES_UID = "no-series-uid:"


class SeriesError(ValueError):
    """The input cannot be turned into one volume; the message names the file(s) and the problem."""


@dataclass
class _Slice:
    path: Path
    frame: int | None  # frame index for multi-frame objects, None for single-frame files
    sop_uid: str
    position: Array  # ImagePositionPatient
    orientation: Array  # ImageOrientationPatient (6)
    pixel_spacing: Array  # (row spacing, column spacing)
    rows: int
    cols: int
    slope: float
    intercept: float
    thickness: float | None


# -- file discovery and grouping -------------------------------------------------------------------------
def _expand(paths: Path | str | Iterable[Path | str]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise SeriesError(f"{p}: no such file or directory")
    return out


def _is_dicomdir(ds: Dataset) -> bool:
    sop_class = str(ds.get("SOPClassUID", "") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", ""))
    return sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds


def _series_key(ds: Dataset) -> str:
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    return uid or f"{NO_SERIES_UID}{ds.get('FrameOfReferenceUID', '') or '?'}"


def _read_header(path: Path) -> Dataset | None:
    """Header without pixels; None for non-DICOM files and DICOMDIRs."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    return None if _is_dicomdir(ds) else ds


def group_series(paths: Path | str | Iterable[Path | str]) -> dict[str, list[Path]]:
    """Group the DICOM files found in ``paths`` (files and/or folders, recursive) by SeriesInstanceUID.

    Non-DICOM files and DICOMDIRs are skipped. Files whose SeriesInstanceUID is empty (badly anonymised data)
    are grouped under ``"no-series-uid:<FrameOfReferenceUID>"`` so they can still be read; the volume's meta then
    says ``identity_incomplete``.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in _expand(paths):
        ds = _read_header(f)
        if ds is None:
            continue
        groups[_series_key(ds)].append(f)
    return dict(groups)


# -- slice records --------------------------------------------------------------------------------------
def _floats(value: Any, n: int, path: Path, name: str) -> Array:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{path}: {name} is missing or not numeric ({value!r})") from exc
    if arr.shape != (n,):
        raise SeriesError(f"{path}: {name} must have {n} values, got {len(arr)}")
    return arr


def _check_is_image(ds: Dataset, path: Path) -> None:
    modality = str(ds.get("Modality", ""))
    if modality in NON_IMAGE_MODALITIES or "Rows" not in ds:
        raise SeriesError(f"{path}: not an image (Modality {modality or '?'}, SOPClassUID {ds.get('SOPClassUID')})")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        joined = "\\".join(image_type)
        raise SeriesError(
            f"{path}: is a localizer/scout (ImageType {joined}); localizers cannot be used as analysis input"
        )


def _sop_uid(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", Dataset())
    return str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", ""))


def _single_frame_slice(ds: Dataset, path: Path) -> _Slice:
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise SeriesError(f"{path}: ImagePositionPatient/ImageOrientationPatient missing; cannot place the slice")
    return _Slice(
        path=path,
        frame=None,
        sop_uid=_sop_uid(ds),
        position=_floats(ds.ImagePositionPatient, 3, path, "ImagePositionPatient"),
        orientation=_floats(ds.ImageOrientationPatient, 6, path, "ImageOrientationPatient"),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2, path, "PixelSpacing"),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        thickness=float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
    )


def _group_item(fg: Dataset | None, shared: Dataset | None, seq: str) -> Dataset | None:
    for src in (fg, shared):
        if src is not None and seq in src and len(src[seq].value):
            return src[seq].value[0]
    return None


def _multi_frame_slices(ds: Dataset, path: Path) -> list[_Slice]:
    n = int(ds.get("NumberOfFrames", 1))
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = list(ds.PerFrameFunctionalGroupsSequence) if "PerFrameFunctionalGroupsSequence" in ds else []
    if len(per_frame) != n:
        raise SeriesError(f"{path}: multi-frame object has {n} frames but {len(per_frame)} per-frame groups")
    slices = []
    for f in range(n):
        fg = per_frame[f]
        pos = _group_item(fg, shared, "PlanePositionSequence")
        ori = _group_item(fg, shared, "PlaneOrientationSequence")
        pm = _group_item(fg, shared, "PixelMeasuresSequence")
        pvt = _group_item(fg, shared, "PixelValueTransformationSequence")
        if pos is None or ori is None or pm is None:
            raise SeriesError(f"{path}: frame {f + 1} lacks plane position/orientation/pixel measures")
        ftype = _group_item(fg, shared, "CTImageFrameTypeSequence")
        if ftype is not None and "LOCALIZER" in [str(v).upper() for v in (ftype.get("FrameType") or [])]:
            raise SeriesError(f"{path}: frame {f + 1} is a localizer (FrameType); refused as analysis input")
        slices.append(
            _Slice(
                path=path,
                frame=f,
                sop_uid=_sop_uid(ds),
                position=_floats(pos.ImagePositionPatient, 3, path, f"frame {f + 1} ImagePositionPatient"),
                orientation=_floats(ori.ImageOrientationPatient, 6, path, f"frame {f + 1} ImageOrientationPatient"),
                pixel_spacing=_floats(pm.get("PixelSpacing"), 2, path, f"frame {f + 1} PixelSpacing"),
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                slope=float(pvt.get("RescaleSlope", 1.0)) if pvt is not None else float(ds.get("RescaleSlope", 1.0)),
                intercept=(
                    float(pvt.get("RescaleIntercept", 0.0))
                    if pvt is not None
                    else float(ds.get("RescaleIntercept", 0.0))
                ),
                thickness=float(pm.SliceThickness) if pm.get("SliceThickness") not in (None, "") else None,
            )
        )
    return slices


def _check_consistent(slices: list[_Slice]) -> None:
    ref = slices[0]
    for s in slices[1:]:
        if (s.rows, s.cols) != (ref.rows, ref.cols):
            raise SeriesError(
                f"{s.path}: image size {s.rows}x{s.cols} differs from {ref.path} ({ref.rows}x{ref.cols}); mixed series"
            )
        if not np.allclose(s.orientation, ref.orientation, atol=ORIENTATION_TOL):
            raise SeriesError(
                f"{s.path}: ImageOrientationPatient {s.orientation.round(4).tolist()} differs from "
                f"{ref.path} ({ref.orientation.round(4).tolist()}); mixed orientations"
            )
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, atol=1e-4):
            raise SeriesError(
                f"{s.path}: PixelSpacing {s.pixel_spacing.tolist()} differs from {ref.path} "
                f"({ref.pixel_spacing.tolist()}); mixed series"
            )


# -- public entry point ---------------------------------------------------------------------------------
_META_KEYS = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "SOPClassUID",
    "Modality",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "SeriesDescription",
    "GantryDetectorTilt",
)


def read_series(paths: Path | str | list[Path] | list[str], series_uid: str | None = None) -> Volume:
    """Read one DICOM image series (folder, file or list of files) into a :class:`Volume` in HU.

    Raises :class:`SeriesError` for: no images, several series without ``series_uid``, localizers, non-image
    objects, mixed sizes/orientations/pixel spacings, duplicate slice positions, missing geometry.
    """
    datasets, slices = _image_slices(_choose_series(paths, series_uid))
    first_ds = datasets[0][1]
    planes, integral = _hu_planes(datasets, slices)
    volume = _assemble(slices, planes)
    if integral and volume.array.dtype != np.int16 and volume.array.min() >= -32768 and volume.array.max() <= 32767:
        volume.array = np.rint(volume.array).astype(np.int16)

    order = volume.meta.pop("_order")
    meta = _series_meta(first_ds, slices)
    meta.update(
        SOPInstanceUIDs=[slices[i].sop_uid for i in order],
        source_files=[str(slices[i].path) for i in order],
        source_frames=[slices[i].frame for i in order],
        TransferSyntaxUID=str(getattr(first_ds, "file_meta", Dataset()).get("TransferSyntaxUID", "")),
        SliceThickness=slices[0].thickness,
    )
    volume.meta.update(meta)
    log.debug(
        "read series %s: %d slices -> grid %s, spacing %s%s",
        meta["SeriesInstanceUID"],
        len(slices),
        volume.size_ijk,
        np.round(volume.spacing, 4).tolist(),
        f" ({volume.meta['geometry_fix']})" if volume.meta.get("geometry_fix") else "",
    )
    return volume


def _choose_series(paths: Path | str | list[Path] | list[str], series_uid: str | None) -> list[tuple[Path, Dataset]]:
    """The files (parsed once; PixelData deferred until decoded) of the one series to read."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for f in _expand(paths):
        try:
            ds: Dataset = pydicom.dcmread(f, defer_size="64 KB")
        except Exception:
            continue
        if _is_dicomdir(ds):
            continue
        groups[_series_key(ds)].append((f, ds))
    if not groups:
        raise SeriesError(f"{paths}: no DICOM image files found")
    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesError(f"{paths}: series {series_uid} not found (present: {', '.join(sorted(groups))})")
        return groups[series_uid]
    if len(groups) > 1:
        listing = "; ".join(f"{uid} ({len(fs)} files, e.g. {fs[0][0].name})" for uid, fs in sorted(groups.items()))
        raise SeriesError(f"{paths}: input mixes {len(groups)} series: {listing}; pass series_uid to choose one")
    return next(iter(groups.values()))


def _image_slices(chosen: list[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], list[_Slice]]:
    """The image datasets and one slice record per frame, checked to form one consistent series."""
    datasets: list[tuple[Path, Dataset]] = []
    slices: list[_Slice] = []
    for f, ds in chosen:
        _check_is_image(ds, f)
        datasets.append((f, ds))
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            slices.extend(_multi_frame_slices(ds, f))
        else:
            slices.append(_single_frame_slice(ds, f))
    _check_consistent(slices)

    first_ds = datasets[0][1]
    for f, ds in datasets[1:]:
        for key in ("StudyInstanceUID", "FrameOfReferenceUID"):
            if ds.get(key) != first_ds.get(key):
                raise SeriesError(f"{f}: {key} differs from {datasets[0][0]} within one series; mixed series")
    return datasets, slices


def _hu_planes(datasets: list[tuple[Path, Dataset]], slices: list[_Slice]) -> tuple[list[Array], bool]:
    """Pixels in HU, one 2-D array per slice record, and whether the rescale is integral (exact integer HU)."""
    frames_by_file: dict[Path, Array] = {}
    for f, ds in datasets:
        try:
            frames_by_file[f] = ds.pixel_array
        except Exception as exc:
            ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", "?")
            raise SeriesError(f"{f}: pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    planes: list[Array] = []
    for s in slices:
        px = frames_by_file[s.path]
        px = px[s.frame] if s.frame is not None else px
        if px.shape != (s.rows, s.cols):
            raise SeriesError(f"{s.path}: pixel array shape {px.shape} does not match Rows/Columns")
        if integral:  # exact integer HU, kept as int16 when it fits
            hu = px.astype(np.int32)
            if s.slope != 1:
                hu *= int(s.slope)
            hu += int(s.intercept)
        else:
            hu = px.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
        planes.append(hu)
    if integral and all(p.min() >= -32768 and p.max() <= 32767 for p in planes):
        planes = [p.astype(np.int16) for p in planes]
    elif integral:
        planes = [p.astype(np.float32) for p in planes]
    frames_by_file.clear()
    return planes, integral


def _series_meta(first_ds: Dataset, slices: list[_Slice]) -> dict[str, object]:
    """The series' identity (as strings) and which of the UIDs a DICOM reference needs are missing."""
    meta: dict[str, object] = {
        key: (str(first_ds.get(key)) if first_ds.get(key) is not None else None) for key in _META_KEYS
    }
    if not meta["SOPClassUID"]:
        meta["SOPClassUID"] = str(getattr(first_ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", "")) or None
    missing = [
        k for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID") if not meta.get(k)
    ] + (["SOPInstanceUID"] if not all(s.sop_uid for s in slices) else [])
    for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        meta[k] = meta[k] or None
    if missing:
        log.warning(
            "series read from %s lacks %s (anonymised?); results cannot reference it in DICOM",
            slices[0].path.parent,
            ", ".join(missing),
        )
    meta["identity_incomplete"] = missing
    return meta


# -- geometry -------------------------------------------------------------------------------------------
def _slice_axes(ref: _Slice) -> tuple[Array, Array, Array]:
    """Row direction (increasing column i), column direction (increasing row j, orthogonalised) and normal."""
    row_dir = ref.orientation[:3] / np.linalg.norm(ref.orientation[:3])  # direction of increasing column i
    col_dir = ref.orientation[3:] / np.linalg.norm(ref.orientation[3:])  # direction of increasing row j
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise SeriesError(f"{ref.path}: ImageOrientationPatient row/column vectors are not orthogonal")
    col_dir = col_dir - (row_dir @ col_dir) * row_dir
    col_dir /= np.linalg.norm(col_dir)
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _interpolate_planes(dist: Array, d_out: Array, sample: Callable[[int], Array], out: Array) -> None:
    """Fill ``out[k]`` at normal distance ``d_out[k]``: linear between the acquired planes at ``dist`` (each plane
    sampled once onto the output grid by ``sample``)."""
    cache: dict[int, Array] = {}
    for k, d in enumerate(d_out):
        s = int(np.clip(np.searchsorted(dist, d, side="right") - 1, 0, len(dist) - 1))
        w = 0.0 if s == len(dist) - 1 else float((d - dist[s]) / (dist[s + 1] - dist[s]))
        if s not in cache:
            cache = {key: v for key, v in cache.items() if key >= s - 1}
            cache[s] = sample(s)
        if w < 1e-6:
            out[k] = cache[s]
        else:
            if s + 1 not in cache:
                cache[s + 1] = sample(s + 1)
            out[k] = (1.0 - w) * cache[s] + w * cache[s + 1]


def _assemble(slices: list[_Slice], planes: list[Array]) -> Volume:
    ref = slices[0]
    row_dir, col_dir, normal = _slice_axes(ref)
    si, sj = float(ref.pixel_spacing[1]), float(ref.pixel_spacing[0])
    direction = np.stack([row_dir, col_dir, normal], axis=1)

    dist = np.array([s.position @ normal for s in slices])
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    gaps = np.diff(dist)
    if len(gaps) and gaps.min() < SPACING_TOL_MM:
        i = int(np.argmin(gaps))
        a, b = slices[order[i]], slices[order[i + 1]]
        raise SeriesError(
            f"{b.path}: duplicate slice position (same plane as {a.path}"
            f"{'' if a.frame is None else f' frame {a.frame + 1}'}); "
            "several acquisitions in one series cannot be stacked"
        )
    pos0 = slices[order[0]].position
    offsets = np.array(
        [[(slices[o].position - pos0) @ row_dir, (slices[o].position - pos0) @ col_dir] for o in order]
    )  # in-plane shift of each slice relative to the first (mm)
    sheared = bool(np.max(np.abs(offsets)) > 0.01) if len(offsets) else False
    median_gap = float(np.median(gaps)) if len(gaps) else float(ref.thickness or 1.0)
    irregular = bool(len(gaps) and np.max(np.abs(gaps - median_gap)) > max(0.01, 0.01 * median_gap))
    stack = np.stack([planes[o] for o in order])

    meta: dict[str, object] = {"_order": [int(o) for o in order], "slices_match_instances": True}
    if not sheared and not irregular:
        spacing = np.array([si, sj, float(np.mean(gaps)) if len(gaps) else median_gap])
        return Volume(stack, pos0, spacing, direction, meta)

    # resample: regular grid along the normal, in-plane grid extended to cover all shifted slices
    stack = stack.astype(np.float32)
    spacing_k = _target_gap(gaps) if irregular else float(np.mean(gaps))
    n_out = int(np.floor((dist[-1] - dist[0]) / spacing_k + 1e-6)) + 1
    d_out = dist[0] + spacing_k * np.arange(n_out)
    oi, oj = offsets[:, 0] / si, offsets[:, 1] / sj
    i_start, i_end = int(np.floor(oi.min() + 1e-6)), int(np.ceil(oi.max() - 1e-6)) + ref.cols - 1
    j_start, j_end = int(np.floor(oj.min() + 1e-6)), int(np.ceil(oj.max() - 1e-6)) + ref.rows - 1
    ni, nj = i_end - i_start + 1, j_end - j_start + 1
    jj, ii = np.meshgrid(np.arange(nj, dtype=np.float64), np.arange(ni, dtype=np.float64), indexing="ij")
    out = np.empty((n_out, nj, ni), np.float32)

    def sample(s: int) -> Array:
        coords = np.stack([jj + j_start - oj[s], ii + i_start - oi[s]])
        return ndimage.map_coordinates(stack[s], coords, order=1, mode="constant", cval=AIR_HU, prefilter=False)

    _interpolate_planes(dist, d_out, sample, out)

    origin = pos0 + i_start * si * row_dir + j_start * sj * col_dir
    what = []
    if sheared:
        step = slices[order[-1]].position - pos0
        tilt = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), -1, 1))))
        what.append(f"gantry tilt {tilt:.1f}°")
        meta["gantry_tilt_deg"] = tilt
    if irregular:
        what.append(f"irregular slice spacing {gaps.min():.2f}–{gaps.max():.2f} mm")
    meta["geometry_fix"] = (
        ", ".join(what) + f"; resampled onto a regular {spacing_k:.3f} mm grid along the "
        f"slice normal (linear between acquired planes, in-plane grid {ni}x{nj})"
    )
    meta["acquired_slice_positions_mm"] = dist.tolist()
    meta["slices_match_instances"] = False
    return Volume(out, origin, np.array([si, sj, spacing_k]), direction, meta)


def _target_gap(gaps: Array) -> float:
    """Output slice spacing for irregular series: the smallest gap that occurs repeatedly (else the median)."""
    rounded = np.round(gaps, 2)
    values, counts = np.unique(rounded, return_counts=True)
    repeated = values[counts >= 2]
    target = float(repeated.min()) if len(repeated) else float(np.median(gaps))
    close = gaps[np.abs(gaps - target) < 0.011]
    return float(np.mean(close)) if len(close) else target
