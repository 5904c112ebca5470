"""Tracking the real lung tumour of ../shared/data/real/lung1 through synthetic follow-ups (growth, then gone)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import tracking as bench
from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.science.lesions import LesionStatus, Timepoint
from lesiontrack.pipeline.science.tracking import NoRegistrationEngine, track_lesions
from lesiontrack.synthetic.transforms import SpatialTransform, apply_transform
from tests.support.tools import require_shared_data

pytestmark = pytest.mark.realdata


def test_real_tumour_grows_then_vanishes() -> None:
    img_p = require_shared_data("real", "lung1", "lung1_image.nrrd")
    lab_p = require_shared_data("real", "lung1", "lung1_label.nrrd")
    ct, lab = Volume.read(str(img_p)), Volume.read(str(lab_p))
    c = np.argwhere(lab.array > 0).mean(0).astype(int)
    sl = (slice(None), slice(c[1] - 64, c[1] + 64), slice(c[2] - 64, c[2] + 64))
    origin = ct.index_to_patient(np.array([sl[2].start, sl[1].start, 0], float))
    ct = Volume(np.ascontiguousarray(ct.array[sl]).astype(np.int16), origin, ct.spacing, ct.direction)
    labels = ct.with_array((lab.array[sl] > 0).astype(np.uint8))
    rng = np.random.default_rng(0)
    cts, gts = [ct], [labels]
    for factor, shift in ((1.3, (1.5, -1.0, 0.0)), (0.0, (-1.0, 1.0, 0.0))):
        e_ct, e_lab = bench.evolve(ct, labels, {1: factor}, rng)
        tr = SpatialTransform(translation=np.array(shift))
        cts.append(apply_transform(e_ct, tr, ct))
        gts.append(apply_transform(e_lab, tr, ct, label=True))
    assert gts[1].array.sum() > 1.8 * labels.array.sum()
    assert gts[2].array.sum() == 0
    tps = [Timepoint(f"1.2.3.{t}", v) for t, v in enumerate(cts)]
    prompt = Prompt(LesionIdentity("2.25.77", "L1 lung", 1), PromptKind.MASK, mask=labels)
    track_lesions(
        tps, [prompt], source_index=0, registration=NoRegistrationEngine(), segmentation=build_segmentation("adaptive")
    )
    grown = tps[1].lesions[0]
    a, b = grown.mask.array > 0, gts[1].array > 0
    assert grown.status is LesionStatus.PRESENT
    assert grown.identity.tracking_uid == "2.25.77"
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.75
    gone = tps[2].lesions[0]
    assert gone.status is LesionStatus.VANISHED
    assert not gone.mask.array.any()
