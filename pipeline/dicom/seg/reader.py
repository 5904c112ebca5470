"""DICOM-SEG reader: segments of a prior SEG (ours or anyone's: BINARY, FRACTIONAL, LABELMAP) → masks + identity,
and → mask :class:`~models.segmentation.prompts.Prompt` objects for the tracking loop.

Identity per segment: Tracking UID / Tracking ID when present; otherwise a stable UID derived from the SEG's SOP
Instance UID and the segment number, and the segment label (or "Segment N") as Tracking ID. FRACTIONAL segments are
thresholded at 0.5. The LABELMAP background segment (number 0) is skipped. Masks are returned on the SEG's own grid
(or put onto ``ct``'s grid when given, see :mod:`pipeline.science.mask_grid`).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.dicom.lesion_names import clean_description
from lesiontrack.pipeline.science.mask_grid import mask_onto_grid

log = logging.getLogger(__name__)

SEG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}


class SegReadError(ValueError):
    """The file is not a readable segmentation; the message names the file."""


@dataclass
class SegSegment:
    number: int
    identity: LesionIdentity
    mask: Volume
    label: str
    property_type: str
    algorithm: tuple[str, str] | None = None  # (name, version)
    tracking_from_file: bool = True  # False when the UID was derived (segment had none)


@dataclass
class SegContents:
    path: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    referenced_series_uids: list[str]
    segmentation_type: str
    segments: list[SegSegment] = field(default_factory=list)

    def by_tracking_uid(self) -> dict[str, SegSegment]:
        return {s.identity.tracking_uid: s for s in self.segments}


def derived_tracking_uid(sop_instance_uid: str, segment_number: int) -> str:
    h = hashlib.sha256(f"{sop_instance_uid}|segment|{segment_number}".encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def segment_identity(
    sop_instance_uid: str, number: int, tracking_uid: object, tracking_id: object, label: str
) -> tuple[str, str]:
    """A segment's Tracking UID and Tracking ID: its own, else a UID derived from the SEG's SOP Instance UID and the
    segment number (:func:`derived_tracking_uid`) and its label (or "Segment n") as its ID."""
    uid = str(tracking_uid) if tracking_uid else derived_tracking_uid(sop_instance_uid, number)
    return uid, str(tracking_id) if tracking_id else (label or f"Segment {number}")


def _hd_volume_to_volume(vol: hd.Volume, array: np.ndarray) -> Volume:
    """highdicom Volume (array axes slice,row,column; affine on array indices) → our Volume (array [k, j, i])."""
    a = np.asarray(vol.affine, float)
    cols = [a[:3, 2], a[:3, 1], a[:3, 0]]  # i (column), j (row), k (slice) steps in LPS mm
    spacing = np.array([np.linalg.norm(c) for c in cols])
    direction = np.stack([c / s for c, s in zip(cols, spacing, strict=True)], 1)
    return Volume(array, origin=a[:3, 3], spacing=spacing, direction=direction)


def read_seg(path: str | Path, ct: Volume | None = None) -> SegContents:
    """Read every non-background segment's mask and identity."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise SegReadError(f"{path}: not a readable DICOM file ({exc})") from exc
    if ds.get("SOPClassUID") not in SEG_SOP_CLASSES:
        raise SegReadError(f"{path}: not a Segmentation (SOP class {ds.get('SOPClassUID')})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation.from_dataset(ds)
    except Exception as exc:
        raise SegReadError(f"{path}: highdicom cannot parse this SEG ({exc})") from exc
    numbers = [n for n in seg.segment_numbers if n != 0]
    if not numbers:
        raise SegReadError(f"{path}: SEG has no segments")
    try:
        hv = seg.get_volume(segment_numbers=numbers, combine_segments=False)
    except Exception as exc:
        raise SegReadError(f"{path}: segment frames do not form a volume ({exc})") from exc
    arr = np.asarray(hv.array)
    if arr.ndim == 3:
        arr = arr[..., None]
    seg_type = str(seg.segmentation_type.value)
    out = SegContents(
        str(path),
        str(ds.SOPInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.StudyInstanceUID),
        [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])],
        seg_type,
    )
    for idx, n in enumerate(numbers):
        desc = seg.get_segment_description(n)
        plane = arr[..., idx]
        if seg_type == "FRACTIONAL":
            max_value = float(ds.get("MaximumFractionalValue", 1) or 1) if plane.dtype.kind in "iu" else 1.0
            m = (plane.astype(np.float32) / max_value) >= 0.5
        else:
            m = plane > 0
        mask = _hd_volume_to_volume(hv, m.astype(np.uint8))
        if ct is not None:
            mask = ct.with_array(mask_onto_grid(mask, ct).astype(np.uint8))
            mask.meta = {}
        label = str(desc.segment_label)
        regions = [c.meaning for c in (desc.anatomic_regions or [])]
        ptype = str(desc.segmented_property_type.meaning)
        uid, tid = desc.tracking_uid, desc.tracking_id
        site = regions[0] if regions else None
        is_node = any("lymph node" in t.lower() for t in [*regions, ptype])
        tracking_uid, tracking_id = segment_identity(out.sop_instance_uid, n, uid, tid, label)
        ident = LesionIdentity(
            tracking_uid=tracking_uid,
            tracking_id=tracking_id,
            label=n,
            anatomic_site=site,
            is_node=is_node,
            description=clean_description(tracking_id, str(desc.get("SegmentDescription", "") or "") or label),
        )
        algo = None
        algo_seq = desc.get("SegmentationAlgorithmIdentificationSequence")
        if algo_seq:
            algo = (str(algo_seq[0].get("AlgorithmName", "")), str(algo_seq[0].get("AlgorithmVersion", "")))
        out.segments.append(SegSegment(n, ident, mask, label, ptype, algo, tracking_from_file=bool(uid)))
    log.debug("read SEG %s: %d segment(s) (%s)", out.sop_instance_uid, len(out.segments), seg_type)
    return out


@dataclass(frozen=True)
class UnassessedSegment:
    """A lesion of the prior SEG that cannot be a prompt (no voxel on the prior CT): reported "not assessed" with
    ``reason`` and flagged for review in every result, never silently left out (issue 29)."""

    identity: LesionIdentity
    reason: str


def read_seg_prompts(path: str | Path, ct: Volume | None = None) -> list[Prompt]:
    """One MASK prompt per non-empty segment, carrying the segment's tracking identity."""
    return read_seg_prompts_and_gaps(path, ct)[0]


def read_seg_prompts_and_gaps(
    path: str | Path, ct: Volume | None = None
) -> tuple[list[Prompt], list[UnassessedSegment]]:
    """The prompts of :func:`read_seg_prompts`, and the segments that have no voxel on ``ct`` (empty in the SEG,
    or on slices ``ct`` does not have) with the reason."""
    contents = read_seg(path, ct)
    prompts = []
    gaps: list[UnassessedSegment] = []
    for s in contents.segments:
        if not s.mask.array.any():
            reason = (
                f"not assessed: segment {s.number} ({s.label}) of the prior SEG has no voxel on the prior CT "
                "(empty, or on slices the prior CT does not have)"
            )
            log.warning("SEG %s segment %d has no voxel on the CT: not assessed", contents.sop_instance_uid, s.number)
            gaps.append(UnassessedSegment(s.identity, reason))
            continue
        prompts.append(
            Prompt(
                identity=s.identity,
                kind=PromptKind.MASK,
                mask=s.mask,
                source=f"SEG {contents.sop_instance_uid} segment {s.number}",
                meta={"segment_number": s.number, "segment_label": s.label, "tracking_from_file": s.tracking_from_file},
            )
        )
    return prompts, gaps
