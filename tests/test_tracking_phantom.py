"""A small analytic torso phantom with lesions and its exact longitudinal follow-ups, for tracking tests.

Anatomy is a function of LPS position, so a follow-up is the same function evaluated at the exactly known
follow-up → baseline mapping (synthetic.transforms.SpatialTransform), with every lesion's radius changed.
Lesions: lung nodule, low-contrast liver lesion, two nearby liver lesions (4 mm apart), a nodule touching the
chest wall (same density as the wall), a lung nodule that vanishes at the third timepoint.
"""

from __future__ import annotations

import numpy as np

from tests.support.phantom import series


def test_phantom_renders_lesions() -> None:
    tps = series()
    assert len(tps) == 3
    for tp in tps[:2]:
        assert set(np.unique(tp.labels.array)) == {0, 1, 2, 3, 4, 5, 6}
    assert 6 not in np.unique(tps[2].labels.array)  # vanished at the last timepoint
    # the nearby pair does not touch
    a = np.argwhere(tps[0].labels.array == 3)
    b = np.argwhere(tps[0].labels.array == 4)
    assert np.min(np.linalg.norm(a[:, None] - b[None], axis=-1)) > 1
