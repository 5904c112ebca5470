"""Tracking loop on the analytic phantom: identity over 3 timepoints, vanished → empty, no merges, backwards."""

from __future__ import annotations

import numpy as np
import pytest

from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.science.lesions import LesionStatus
from lesiontrack.pipeline.science.tracking import (
    NoRegistrationEngine,
    ProgressEvent,
    label_map,
    track_lesions,
    tracking_summary,
)
from tests.support.phantom import LESIONS, PhantomTimepoint, dice, mask_prompts, phantom_volumes, series


@pytest.fixture(scope="module")
def phantom() -> list[PhantomTimepoint]:
    return series(seed=1)


def test_identity_kept_over_three_timepoints_and_vanished_is_empty(phantom: list[PhantomTimepoint]) -> None:
    tps = phantom_volumes(phantom)
    events: list[ProgressEvent] = []
    track_lesions(
        tps,
        mask_prompts(phantom[0]),
        source_index=0,
        registration=NoRegistrationEngine(),
        segmentation=build_segmentation("adaptive"),
        progress=events.append,
    )
    assert events[-1].stage == "done"
    assert events[-1].done == events[-1].total
    for t in (1, 2):
        by_label = {les.identity.label: les for les in tps[t].lesions}
        assert sorted(by_label) == [1, 2, 3, 4, 5, 6]
        for n in (1, 2, 3, 4):
            les = by_label[n]
            assert les.status is LesionStatus.PRESENT
            assert les.identity.tracking_uid == f"2.25.{1000 + n}"
            assert dice(les.mask.array, phantom[t].labels.array == n) > 0.85, (t, n)
        # the nodule touching the same-density chest wall: found, its shrinkage only bounded by the shape prior
        assert by_label[5].status is LesionStatus.PRESENT
        assert dice(by_label[5].mask.array, phantom[t].labels.array == 5) > 0.5
    assert dice({les.identity.label: les for les in tps[1].lesions}[6].mask.array, phantom[1].labels.array == 6) > 0.8
    gone = {les.identity.label: les for les in tps[2].lesions}[6]
    assert gone.status is LesionStatus.VANISHED
    assert not gone.mask.array.any()
    lm = label_map(tps[2])
    assert set(np.unique(lm.array)) == {0, 1, 2, 3, 4, 5}
    summary = tracking_summary(tps)
    l6 = next(e for e in summary["lesions"] if e["label"] == 6)
    assert [tp["status"] for tp in l6["timepoints"]] == ["present", "present", "vanished"]


def test_nearby_lesions_do_not_merge(phantom: list[PhantomTimepoint]) -> None:
    base = [les.radius_mm for les in LESIONS]
    grown = list(base)
    grown[2], grown[3] = 9.0, 9.5  # centres 18 mm apart: the pair now touches
    tps_p = series(seed=2, shifts_mm=((0, 0, 0), (1, -1, 1)), radii_per_tp=[base, grown])
    gt = tps_p[1].labels.array
    tps = phantom_volumes(tps_p)
    track_lesions(
        tps,
        mask_prompts(tps_p[0]),
        source_index=0,
        registration=NoRegistrationEngine(),
        segmentation=build_segmentation("adaptive"),
    )
    by_label = {les.identity.label: les for les in tps[1].lesions}
    a, b = by_label[3].mask.array > 0, by_label[4].mask.array > 0
    assert not (a & b).any()
    assert dice(a, gt == 3) > 0.75
    assert dice(b, gt == 4) > 0.75
    # each keeps its own centre side: A is the more anterior (smaller y) of the two
    ya = np.argwhere(a)[:, 1].mean()
    yb = np.argwhere(b)[:, 1].mean()
    assert ya < yb


def test_backward_propagation_from_last_timepoint(phantom: list[PhantomTimepoint]) -> None:
    tps = phantom_volumes(phantom)
    prompts = mask_prompts(phantom[2])
    assert [p.identity.label for p in prompts] == [1, 2, 3, 4, 5]
    track_lesions(
        tps, prompts, source_index=2, registration=NoRegistrationEngine(), segmentation=build_segmentation("adaptive")
    )
    for t in (1, 0):
        for les in tps[t].lesions:
            assert les.status is LesionStatus.PRESENT
            limit = 0.85 if les.identity.label != 5 else 0.5  # wall nodule: see the forward test
            assert dice(les.mask.array, phantom[t].labels.array == les.identity.label) > limit, (t, les.identity)


def test_point_and_box_prompts_on_the_source_timepoint(phantom: list[PhantomTimepoint]) -> None:
    tps = phantom_volumes(phantom)[:2]
    lung, liver = LESIONS[0], LESIONS[1]
    prompts = [
        Prompt(LesionIdentity("2.25.1", "L1", 1), PromptKind.POINTS, points_mm=np.array([lung.centre_mm])),
        Prompt(
            LesionIdentity("2.25.2", "L2", 2),
            PromptKind.BOX,
            box_mm=(np.array(liver.centre_mm) - 13.0, np.array(liver.centre_mm) + 13.0),
        ),
    ]
    track_lesions(
        tps, prompts, source_index=0, registration=NoRegistrationEngine(), segmentation=build_segmentation("adaptive")
    )
    for t in (0, 1):
        for les in tps[t].lesions:
            assert dice(les.mask.array, phantom[t].labels.array == les.identity.label) > 0.75, (t, les.identity)


def test_duplicate_labels_are_rejected(phantom: list[PhantomTimepoint]) -> None:
    p = mask_prompts(phantom[0])
    p[1].identity.label = p[0].identity.label
    with pytest.raises(ValueError, match="unique"):
        track_lesions(
            phantom_volumes(phantom),
            p,
            source_index=0,
            registration=NoRegistrationEngine(),
            segmentation=build_segmentation("adaptive"),
        )


def test_boosting_reprompts_at_the_first_result_centre() -> None:
    from lesiontrack.pipeline.science.tracking import TrackingOptions

    ph = series(seed=6, shifts_mm=((0, 0, 0), (5, -4, 3)))  # 7 mm motion, no registration: the prompt is off
    tps = phantom_volumes(ph)
    prompts = [p for p in mask_prompts(ph[0]) if p.identity.label in (1, 2)]
    track_lesions(
        tps,
        prompts,
        source_index=0,
        registration=NoRegistrationEngine(),
        segmentation=build_segmentation("adaptive"),
        options=TrackingOptions(boosting=True),
    )
    for les in tps[1].lesions:
        assert any(n.startswith("boosted") for n in les.notes), les.notes
        assert dice(les.mask.array, ph[1].labels.array == les.identity.label) > 0.8
