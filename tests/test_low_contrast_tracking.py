"""A low-contrast lesion tracked unchanged from its true SEG keeps its size, and a segment many times its prior is
flagged for review.

The finding (issue 31's OHIF test, seed 8): a hypodense liver lesion about one noise SD below its liver, near the
liver's edge, unchanged, tracked from the baseline's true SEG came out 5x its volume. The linear outline fit read the
fat beyond the liver (darker than the lesion) as the most lesion-like tissue of all, drew the fitted outline out to the
growth limit, and the random walk then spread through the liver around the lesion.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.base import SegmentationEngine, SegReference
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.science.confidence import ConfidenceRules
from lesiontrack.pipeline.science.lesions import LesionStatus, Timepoint
from lesiontrack.pipeline.science.tracking import NoRegistrationEngine, TrackingOptions, track_lesions
from lesiontrack.synthetic.phantom import make_phantom

TOLERANCE = 0.35  # relative volume error allowed for an unchanged lesion


def _tracked(ct: Volume, masks: dict[int, Volume], engine: SegmentationEngine) -> Timepoint:
    """Track every lesion of ``masks`` (label → its true mask on ``ct``) onto the same CT (unchanged, no motion)."""
    tps = [Timepoint("2.25.801", ct, "20260105"), Timepoint("2.25.802", ct, "20260302")]
    prompts = [Prompt(LesionIdentity(f"2.25.{900 + n}", f"L{n}", n), PromptKind.MASK, mask=m) for n, m in masks.items()]
    track_lesions(
        tps,
        prompts,
        source_index=0,
        registration=NoRegistrationEngine(),
        segmentation=engine,
        options=TrackingOptions(confidence=ConfidenceRules()),
    )
    return tps[1]


def _demo_patient() -> tuple[Volume, dict[int, Volume], int]:
    """The finding's patient (``make_patient(seed=8, shape=(40, 80, 80), spacing 3 mm, 3 lesions)``'s phantom): its
    CT, its lesions' true masks and the label of the liver lesion."""
    ph = make_phantom(seed=8, shape=(40, 80, 80), spacing=(3.0, 3.0, 3.0), n_lesions=3)
    masks = {i.label: ph.lesions.with_array((ph.lesions.array == i.label).astype(np.uint8)) for i in ph.lesion_info}
    [liver] = [i.label for i in ph.lesion_info if i.organ == "liver"]
    return ph.ct, masks, liver


def test_unchanged_low_contrast_liver_lesion_keeps_its_volume() -> None:
    ct, masks, liver = _demo_patient()
    les = {x.identity.label: x for x in _tracked(ct, masks, build_segmentation("adaptive")).lesions}[liver]
    truth = int(masks[liver].array.sum())
    got = int(les.mask.array.sum())
    assert les.status is LesionStatus.PRESENT
    within = abs(got / truth - 1.0) <= TOLERANCE
    assert within or les.meta.get("review"), (got, truth)
    assert within, f"{got} voxels for a lesion of {truth} (flagged for review, but still wrong)"


class _Swollen:
    """A segmentation engine that returns the prompt dilated by four voxels (a leak into the organ, as in the
    finding): about five times its volume."""

    name = "swollen"
    version = "0"

    def segment(self, image: Volume, prompt: Prompt, reference: SegReference | None = None) -> Volume:
        if prompt.mask is None:
            raise ValueError("mask prompts only")
        grown = ndi.binary_dilation(prompt.mask.array > 0, iterations=4)
        return prompt.mask.with_array(grown.astype(np.uint8))


def test_a_segment_many_times_its_prior_without_a_registration_change_is_flagged() -> None:
    """The registration explains no change (identity); a segment of the finding's size (x4.9) is flagged for its
    volume (beyond x3 in 8 weeks). A swelling within that allowance is growth as far as the volume signals can tell
    (issue 29 item 5 judges a change falling short of the Jacobian's, not one beyond it)."""
    ct, masks, liver = _demo_patient()
    les = {x.identity.label: x for x in _tracked(ct, {liver: masks[liver]}, _Swollen()).lesions}[liver]
    assert les.mask.array.sum() >= 4 * masks[liver].array.sum()
    assert les.meta.get("review") is True
    conf = les.meta["confidence"]
    assert any(r.startswith("implausible volume change") for r in conf.reasons), conf.reasons
