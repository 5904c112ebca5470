"""A follow-up on which tracking loses a lesion, and the radiologist's arrow that re-finds it (issue 31 item 3).

The still phantom's follow-up is shifted ``SHIFT_VOXELS`` columns (the patient moved 25 mm; the geometry is unchanged),
and analysed without registration: the baseline's largest lesion is propagated where it no longer is. The truth is
that lesion shifted the same way; the radiologist's GSPS puts an arrow on it, labelled as on the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from bench.drawn_lesions import drawings
from lesiontrack.demo_data import DemoPatient
from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import Prompt
from lesiontrack.pipeline.dicom.seg.reader import read_seg_prompts_and_gaps
from lesiontrack.synthetic.annotations import Mark, write_gsps
from tests.support.phantom import dice

SHIFT_VOXELS = 10  # 25 mm along x at 2.5 mm: the follow-up's patient moved, no registration corrects it


@dataclass(frozen=True)
class LostLesion:
    """The baseline's lesion tracking loses (its prompt) and where it is on the moved follow-up (the truth)."""

    prompt: Prompt
    moved: Volume

    @property
    def tracking_uid(self) -> str:
        return self.prompt.identity.tracking_uid


def move(files: list[Path]) -> None:
    """Shift each image of a series ``SHIFT_VOXELS`` columns (the patient moved; the geometry is unchanged)."""
    for f in files:
        ds = pydicom.dcmread(f)
        arr = np.roll(ds.pixel_array, SHIFT_VOXELS, axis=1)
        arr[:, :SHIFT_VOXELS] = arr.min()
        ds.PixelData = arr.astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(f)


def lost_lesion(patient: DemoPatient) -> LostLesion:
    """The largest of the baseline SEG's lesions, and where it is on the moved follow-up."""
    prompts, _ = read_seg_prompts_and_gaps(patient.seg_file, read_series(patient.baseline.files))
    lost = max(prompts, key=lambda p: 0 if p.mask is None else int(p.mask.array.sum()))
    assert lost.mask is not None
    m = lost.mask
    return LostLesion(lost, Volume(np.roll(m.array, SHIFT_VOXELS, axis=2), m.origin, m.spacing, m.direction))


def overlap(seg: str | Path, lesion: LostLesion, ct: Volume) -> float:
    """Dice of the lesion's segment in our SEG against the truth (0 when the SEG has no voxel of it)."""
    prompts = read_seg_prompts_and_gaps(str(seg), ct)[0]
    masks = [p.mask for p in prompts if p.identity.tracking_uid == lesion.tracking_uid]
    return dice(masks[0].array > 0, lesion.moved.array > 0) if masks and masks[0] is not None else 0.0


def arrow_gsps(followup_files: list[Path], lesion: LostLesion, dest: Path) -> Path:
    """The radiologist's GSPS: an arrow on the lost lesion of the follow-up, labelled as on the baseline."""
    arrow = drawings(lesion.moved, np.random.default_rng(3))["arrow"]
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in followup_files]
    return write_gsps(heads, [Mark(arrow, lesion.prompt.identity.tracking_id)], dest)
