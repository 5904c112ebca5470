"""A radiologist's corrected SEG of a follow-up, written as another tool would (highdicom, another Manufacturer).

:func:`write_correction` reads LesionTrack's SEG of a follow-up, edits one lesion's mask, deletes one, adds one, and
writes a new SEG (new UIDs, Manufacturer "OtherViewer", ContentCreatorName, segments MANUAL) — optionally without
our Tracking UIDs, as viewers that drop them do (then Tracking ID / label / overlap match them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from lesiontrack.pipeline.dicom.seg.reader import SegSegment, read_seg
from lesiontrack.pipeline.dicom.seg.writer import sort_source_slices

READER = "Reader^Anna"


@dataclass
class Correction:
    path: Path
    sop_instance_uid: str
    series_uid: str
    edited_uid: str
    deleted_uid: str
    added_uid: str
    edited_mask: np.ndarray  # on the follow-up grid of sort_source_slices
    added_mask: np.ndarray


def write_correction(
    our_seg: str | Path,
    ct_files: Sequence[Path],
    out_dir: Path,
    *,
    add_centre_mm: Sequence[float],
    add_radius_mm: float = 6.0,
    drop_tracking_uids: bool = False,
    manufacturer: str = "OtherViewer",
) -> Correction:
    sources = [pydicom.dcmread(f) for f in ct_files]
    sorted_ds, grid = sort_source_slices(sources)
    ours = read_seg(our_seg, grid)
    tracked = [s for s in ours.segments if not s.label.startswith("Candidate ") and s.mask.array.any()]
    if len(tracked) < 2:
        raise ValueError(f"{our_seg}: need two tracked lesions to edit one and delete one")
    edited, deleted = tracked[0], tracked[1]
    kept = [s for s in tracked if s is not deleted]
    masks = []
    for s in kept:
        m = s.mask.array.astype(bool)
        if s is edited:  # the reader trims its last slice (partial volume) — the mask changes, the lesion stays
            top = int(np.nonzero(m.any(axis=(1, 2)))[0].max())
            m = m.copy()
            m[top] = False
        masks.append(m)
    zz, yy, xx = np.indices(grid.shape)
    centre_ijk = grid.patient_to_index(np.asarray([add_centre_mm], float))[0]
    spacing = np.asarray(grid.spacing, float)  # (x, y, z) mm
    d2 = (
        ((xx - centre_ijk[0]) * spacing[0]) ** 2
        + ((yy - centre_ijk[1]) * spacing[1]) ** 2
        + ((zz - centre_ijk[2]) * spacing[2]) ** 2
    )
    added = d2 <= add_radius_mm**2
    for m in masks:
        added &= ~m
    masks.append(added)
    added_uid = hd.UID()
    descriptions = []
    segments: list[SegSegment | None] = [*kept, None]  # None: the lesion the reader adds
    for n, item in enumerate(segments, start=1):
        label = item.label if item is not None else "Liver lesion added by reader"
        uid: str | None = item.identity.tracking_uid if item is not None else added_uid
        tracking_id: str | None = item.identity.tracking_id if item is not None else "R1"
        if drop_tracking_uids and item is not None:  # as a viewer that drops them: label (edited one) or overlap
            uid = tracking_id = None
            if item is not edited:
                label = f"Lesion {n}"
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=label[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Neoplasm,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
                tracking_uid=uid,
                tracking_id=tracking_id,
            )
        )
    pixel = np.stack(masks, axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sorted_ds,
        pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=950,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="Viewer",
        software_versions="1.0",
        device_serial_number="1",
        content_label="CORRECTED",
        content_creator_name=READER,
        series_description="Corrected lesions",
        omit_empty_frames=True,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{seg.SOPInstanceUID}.dcm"
    seg.save_as(path)
    return Correction(
        path,
        str(seg.SOPInstanceUID),
        str(seg.SeriesInstanceUID),
        edited.identity.tracking_uid,
        deleted.identity.tracking_uid,
        added_uid,
        masks[0],
        added,
    )
