"""Memory check of the default registration engine on a 512 × 512 × 600 CT pair (the issue's bounded-memory claim).

Builds a 600-slice, 512 × 512 baseline from ../shared/data/real/lung1 (resampled to 0.4 mm slices), a follow-up by a
known rigid motion (3°, 15 mm), registers them on CPU with the default engine at the default 2 mm working grid and
prints one JSON line: wall time, stages, peak RSS of this process (the two int16 volumes included) and TRE against
the known motion. Run: ``.venv/bin/python bench/registration_memory.py``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LESIONTRACK_SHARED_DATA", REPO.parent / "shared" / "data"))

from lesiontrack.models.engines import build_registration
from lesiontrack.models.imaging.volume import Volume


def main() -> None:
    src = Volume.read(str(DATA / "real" / "lung1" / "lung1_image.nrrd"))
    ref = Volume(np.zeros((600, 512, 512), np.uint8), src.origin, np.array([0.5703125, 0.5703125, 0.4]))
    base = src.resample_to(ref)
    base = base.with_array(base.array.astype(np.int16))
    motion = sitk.Euler3DTransform()
    motion.SetCenter(tuple(base.index_to_patient(np.array([256.0, 256.0, 300.0]))))
    motion.SetRotation(0.03, -0.02, 0.05)
    motion.SetTranslation((8.0, -12.0, 6.0))
    fu = base.resample_to(base, transform=motion)
    fu = fu.with_array(fu.array.astype(np.int16))
    t = time.perf_counter()
    reg = build_registration("convex", device="cpu").register(base, fu)
    wall = time.perf_counter() - t
    pts = fu.index_to_patient(np.argwhere(fu.array[::40, ::40, ::40] > -400)[:, ::-1] * 40.0)
    truth = np.array([motion.TransformPoint(tuple(p)) for p in pts])
    err = np.linalg.norm(reg.map_points_to_baseline(pts) - truth, axis=1)
    print(
        json.dumps(
            {
                "benchmark": "registration_memory",
                "date": time.strftime("%Y-%m-%d"),
                "shape_kji": list(base.shape),
                "volume_mib_each": base.array.nbytes / 2**20,
                "wall_s": wall,
                "stages": reg.quality.stage_seconds,
                "working_grid": reg.quality.extra.get("working_grid"),
                "landmarks": len(pts),
                "tre_mean": float(err.mean()),
                "tre_p95": float(np.percentile(err, 95)),
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
    )


if __name__ == "__main__":
    main()
