"""Server-side PNG pictures for the dashboard: lesion thumbnails (axial CT slice + mask contour) and volume plots.

Thumbnails are cut from the real objects: the lesion's segment is read from our DICOM-SEG with highdicom, the axial
source slice where the segment is largest is read with pydicom, windowed, cropped around the lesion and drawn with the
contour. Plots use matplotlib's Agg backend (no display needed). Everything returns PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from scipy import ndimage

from lesiontrack.pipeline.dicom.seg.reader import derived_tracking_uid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMB_PX = 160
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # level, width (HU)
LUNG_WINDOW = (-600.0, 1500.0)


class ThumbnailError(ValueError):
    """A thumbnail cannot be drawn (names the object and the reason)."""


@dataclass
class LesionSlice:
    """The axial slice through a lesion: the source CT instance UID and the lesion mask on it."""

    source_sop_instance_uid: str
    mask: np.ndarray  # bool [rows, cols]


def lesion_slice_from_seg(seg_path: Path, segment_number: int | None, tracking_uid: str | None = None) -> LesionSlice:
    """The source slice where the lesion's segment of the SEG at ``seg_path`` covers most pixels.

    The segment is ``segment_number``, or (when that is None, e.g. a radiologist's baseline SEG) the segment whose
    Tracking UID is ``tracking_uid``.
    """

    try:
        seg = hd.seg.segread(str(seg_path))
    except Exception as exc:
        raise ThumbnailError(f"{seg_path}: not a readable DICOM-SEG ({exc})") from exc
    if segment_number is None:
        segment_number = _segment_of(seg, tracking_uid)
        if segment_number is None:
            raise ThumbnailError(f"{seg_path}: no segment with Tracking UID {tracking_uid}")
    if segment_number not in seg.segment_numbers:
        raise ThumbnailError(f"{seg_path}: no segment number {segment_number} (has {list(seg.segment_numbers)})")
    uids = [u[2] for u in seg.get_source_image_uids()]
    if not uids:
        raise ThumbnailError(f"{seg_path}: SEG references no source images")
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=[segment_number],
        combine_segments=True,
        ignore_spatial_locations=True,
    )
    areas = pixels.reshape(len(uids), -1).astype(bool).sum(axis=1)
    best = int(np.argmax(areas))
    if areas[best] == 0:
        raise ThumbnailError(f"{seg_path}: segment {segment_number} is empty")
    return LesionSlice(uids[best], pixels[best] > 0)


def _segment_of(seg: hd.seg.Segmentation, tracking_uid: str | None) -> int | None:
    """The segment carrying ``tracking_uid``, or whose derived UID it is (a SEG without Tracking UIDs, read by
    :func:`pipeline.dicom.seg.reader.read_seg`, gets ``derived_tracking_uid(SOPInstanceUID, segment number)``)."""

    if not tracking_uid:
        return None
    found = seg.get_segment_numbers(tracking_uid=tracking_uid)
    if found:
        return int(found[0])
    for n in seg.segment_numbers:
        if derived_tracking_uid(str(seg.SOPInstanceUID), int(n)) == tracking_uid:
            return int(n)
    return None


def ct_slice_hu(ct_path: Path) -> np.ndarray:
    """One CT slice in Hounsfield units (float32 [rows, cols])."""

    try:
        ds = pydicom.dcmread(str(ct_path))
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise ThumbnailError(f"{ct_path}: cannot read CT pixels ({exc})") from exc
    if arr.ndim != 2:
        raise ThumbnailError(f"{ct_path}: expected a single-frame CT slice, got shape {arr.shape}")
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def choose_window(hu: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Lung window when the lesion sits in aerated lung, soft-tissue window otherwise."""
    ring = _dilate(mask, 6) & ~mask
    if ring.any() and float(np.median(hu[ring])) < -500:
        return LUNG_WINDOW
    return SOFT_TISSUE_WINDOW


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:

    return ndimage.binary_dilation(mask, iterations=iterations)


def crop_box(mask: np.ndarray, margin: float = 1.5, min_size: int = 48) -> tuple[int, int, int, int]:
    """A square (r0, r1, c0, c1) around the mask: ``margin`` × its extent on each side, at least ``min_size``."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        h, w = mask.shape
        return 0, h, 0, w
    cr, cc = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    half = max(min_size / 2, extent * (0.5 + margin))
    half = min(half, max(mask.shape) / 2)
    h, w = mask.shape
    r0, c0 = int(max(0, round(cr - half))), int(max(0, round(cc - half)))
    r1, c1 = int(min(h, round(cr + half))), int(min(w, round(cc + half)))
    return r0, r1, c0, c1


def render_thumbnail(
    hu: np.ndarray,
    mask: np.ndarray | None,
    *,
    size: int = THUMB_PX,
    window: tuple[float, float] | None = None,
    label: str | None = None,
    colour: str = "#ffd000",
) -> bytes:
    """PNG of a windowed CT crop with the lesion contour (``mask`` None = whole slice, no contour)."""
    if mask is not None and mask.shape != hu.shape:
        raise ThumbnailError(f"mask shape {mask.shape} does not match CT slice {hu.shape}")
    level, width = window or (choose_window(hu, mask) if mask is not None else SOFT_TISSUE_WINDOW)
    r0, r1, c0, c1 = crop_box(mask) if mask is not None else (0, hu.shape[0], 0, hu.shape[1])
    img = np.clip((hu[r0:r1, c0:c1] - (level - width / 2)) / width, 0.0, 1.0)
    fig = _figure((size / 100, size / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    if mask is not None:
        m = mask[r0:r1, c0:c1].astype(float)
        if m.any():
            ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.4)
    if label:
        ax.text(
            3,
            3,
            label,
            color="white",
            fontsize=7,
            va="top",
            ha="left",
            bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5, "edgecolor": "none"},
        )
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(figsize: tuple[float, float], dpi: int, facecolor: str | None = None) -> Figure:
    """A matplotlib figure on the Agg backend (no display)."""
    # matplotlib is imported on first use, not at module top: measured `python -X importtime -c "import
    # matplotlib.figure"` ≈ 3 s on the CI machine, and only the dashboard's image routes draw anything
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib costs 1.3 s at import, only when a thumbnail is drawn
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi, facecolor=facecolor)


def placeholder_png(text: str, *, size: int = THUMB_PX) -> bytes:
    """A neutral tile with a short text (e.g. "vanished", "no SEG") where no lesion can be drawn."""
    fig = _figure((size / 100, size / 100), dpi=100, facecolor="#20242a")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_facecolor("#20242a")
    ax.text(0.5, 0.5, text, color="#c8ccd2", fontsize=9, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor=fig.get_facecolor())
    return buf.getvalue()


def volume_plot(
    labels: Sequence[str],
    volumes_ml: Sequence[float | None],
    *,
    title: str = "",
    long_axes_mm: Sequence[float | None] | None = None,
    width_px: int = 360,
    height_px: int = 200,
) -> bytes:
    """PNG line plot of a lesion's volume (mL) over timepoints; long axis (mm) on a second axis if given."""
    fig = _figure((width_px / 100, height_px / 100), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(labels))
    vols = np.array([np.nan if v is None else v for v in volumes_ml], dtype=float)
    ax.plot(x, vols, marker="o", color="#1f6fd1", label="volume (mL)")
    for xi, v in zip(x, vols, strict=True):
        if not np.isnan(v):
            ax.annotate(
                f"{v:.2f}",
                (xi, v),
                textcoords="offset points",
                xytext=(0, -12),
                ha="center",
                fontsize=7,
                color="#1f6fd1",
            )
    ax.set_ylabel("volume (mL)", fontsize=8, color="#1f6fd1")
    ax.set_xlim(-0.4, len(labels) - 0.6)
    ax.set_ylim(bottom=0, top=max(1e-3, float(np.nanmax(vols)) if np.isfinite(vols).any() else 1.0) * 1.25)
    ax.set_xticks(x, list(labels), fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3)
    if long_axes_mm is not None:
        la = np.array([np.nan if v is None else v for v in long_axes_mm], dtype=float)
        ax2 = ax.twinx()
        ax2.plot(x, la, marker="s", linestyle="--", color="#d1701f", label="long axis (mm)")
        ax2.set_ylabel("long axis (mm)", fontsize=8, color="#d1701f")
        ax2.tick_params(axis="y", labelsize=7)
        ax2.set_ylim(bottom=0, top=max(1.0, float(np.nanmax(la)) if np.isfinite(la).any() else 1.0) * 1.25)
    if title:
        ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.15, right=0.85 if long_axes_mm is not None else 0.97, bottom=0.24, top=0.86)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
