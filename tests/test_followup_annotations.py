"""Issue 31 item 3: a radiologist's annotation on a follow-up is a person-made prompt source at that timepoint.

An arrow on a lesion that tracking lost re-finds it there and from there on (nearest-annotation propagation), while
the lesions that annotation does not mark are still propagated to that timepoint from their own nearest annotation.
"""

from __future__ import annotations

import numpy as np

from lesiontrack.models.segmentation.base import get_engine
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.pipeline.annotations.common import drawing_prompt
from lesiontrack.pipeline.lesions import LesionStatus
from lesiontrack.pipeline.tracking import NoRegistrationEngine, track_lesions
from tests.test_tracking import _mask_prompts, _timepoints, dice
from tests.test_tracking_phantom import LESIONS, series


def test_an_arrow_on_a_lost_lesion_at_a_follow_up_re_finds_it_there_and_from_there_on() -> None:
    # the patient moves 25 mm at T2 and no registration corrects it: propagated from T0 every lesion is missed there
    shift = (25.0, 0.0, 0.0)
    radii = [[les.radius_mm for les in LESIONS]] * 4
    phantom = series(seed=5, shifts_mm=((0, 0, 0), (0, 0, 0), shift, shift), radii_per_tp=radii)
    tps = _timepoints(phantom)
    prompts = _mask_prompts(phantom[0])
    lung = next(p for p in prompts if p.identity.label == 1)
    truth2 = phantom[2].labels.array == 1
    kji = np.argwhere(truth2).mean(axis=0)
    tip = phantom[2].labels.index_to_patient(kji[::-1])
    arrow = Drawing(DrawingKind.ARROW, [np.stack([tip, tip + np.array([0.0, -20.0, 0.0])])], what="GSPS arrow")
    track_lesions(
        tps,
        prompts,
        source_index=0,
        registration=NoRegistrationEngine(),
        segmentation=get_engine("adaptive"),
        confirmed={2: [drawing_prompt(lung.identity, arrow, "GSPS on T2")]},
    )
    for t in (1, 2, 3):  # every lesion has a result at every timepoint, the arrow's timepoint included
        assert sorted(les.identity.label for les in tps[t].lesions) == [p.identity.label for p in prompts]
    at2 = {les.identity.label: les for les in tps[2].lesions}
    at3 = {les.identity.label: les for les in tps[3].lesions}
    assert at2[1].status is LesionStatus.PRESENT and at2[1].meta.get("prompt_origin") == "arrow"
    assert dice(at2[1].mask.array > 0, truth2) > 0.6
    assert at3[1].status is LesionStatus.PRESENT
    assert at3[1].propagated_from is not None and at3[1].propagated_from.timepoint_index == 2
    assert at3[1].propagated_from.by_person
    assert dice(at3[1].mask.array > 0, phantom[3].labels.array == 1) > 0.6
    assert at3[1].meta.get("review")  # from an arrow: flagged until a person confirms it
    for label in (2, 3, 5):  # the lesions the arrow does not mark: still from T0's annotation
        assert at2[label].propagated_from is not None and at2[label].propagated_from.timepoint_index == 0
        assert at3[label].propagated_from is not None and at3[label].propagated_from.timepoint_index == 0
