"""The long-series benchmark's generator (bench/tracking.py): what it shows where a lesion was removed.

Its ground truth says "gone"; the image must agree, or the benchmark scores the engine against a lesion-dense site.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from bench import tracking as bench
from lesiontrack.synthetic.phantom import make_phantom


def test_a_removed_lesion_site_holds_the_surrounding_parenchyma_not_its_neighbours() -> None:
    ph = make_phantom(seed=3)  # its juxtapleural nodule's surroundings are mostly chest wall
    ct, labels = ph.ct, ph.lesions.with_array(ph.lesions.array.astype(np.uint8))
    sp = ct.spacing[::-1]
    checked = 0
    for info in ph.lesion_info:
        site = labels.array == info.label
        e_ct, e_lab = bench.evolve(ct, labels, {info.label: 0.0}, np.random.default_rng(0))
        assert not (e_lab.array == info.label).any()
        filled = e_ct.array[site].astype(float)
        lesion = float(np.median(ct.array[site]))
        if "lung" in info.kind:
            # a lung lesion's site is aerated lung again, also against the chest wall or mediastinum
            assert np.median(filled) < -700, info.kind
            assert np.mean(filled > -500) < 0.02, info.kind
            checked += 1
        else:
            # liver lesion, lymph node: the tissue around it, not the lesion
            dist = ndi.distance_transform_edt(~site, sampling=sp)
            ring = (dist > 3) & (dist <= 9) & (labels.array == 0)
            around = float(np.median(ct.array[ring]))
            assert abs(np.median(filled) - around) < 0.5 * abs(lesion - around) + 10, info.kind
    assert checked >= 4
