"""Cost of the C-STORE door check (``dicom_node.storage.check_structure``) on real CT slices, against an earlier
version of the module for comparison (issue 19: validation must stay cheap on the hot path).

    git show ddb0632:dicom_node/storage.py > /tmp/storage_before.py
    .venv/bin/python bench/door_validation.py --before /tmp/storage_before.py

Prints one JSON document: microseconds per instance (best of 5 x 2000 calls), before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import timeit
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
INTEROP = REPO.parent / "shared" / "data" / "interop"


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, help="an earlier dicom_node/storage.py to compare with")
    args = ap.parse_args()
    from tests.test_dicom_node_scp import dataset_bytes

    mods = {"after": _load(REPO / "dicom_node" / "storage.py", "storage_after")}
    if args.before:
        mods["before"] = _load(args.before, "storage_before")
    ge = sorted((INTEROP / "ct_gantry_tilt_ge").glob("*.dcm"))[0]
    j2k = sorted((INTEROP / "ct_siemens_j2k").iterdir())[0]
    cases = [
        ("GE CT 512x512, explicit VR LE", ge, "1.2.840.10008.1.2.1"),
        ("Siemens CT, JPEG 2000", j2k, "1.2.840.10008.1.2.4.90"),
    ]
    out: dict[str, object] = {
        "benchmark": "door validation (check_structure)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
    }
    for name, path, ts in cases:
        body = dataset_bytes(path)
        for label, mod in mods.items():
            t = min(timeit.repeat(partial(mod.check_structure, body, ts, {}), number=2000, repeat=5))
            out[f"{name}: {label} (us)"] = round(t / 2000 * 1e6, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
