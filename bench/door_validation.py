"""Cost of the C-STORE door check on real CT slices, against an earlier version of the structure walk
(issue 19: validation must stay cheap on the hot path; issue 32: every binary value's length, the IOD content
check and the compressed frame header added). Also the cost of decoding the pixel data, which the door leaves to
the check before analysis.

    git show 628cdd6:dicom_node/storage.py > /tmp/storage_before.py
    .venv/bin/python bench/door_validation.py --before /tmp/storage_before.py

Prints one JSON document: microseconds per instance (best of 5 x N calls): the walk before and after, the whole
door after (walk, header, content check: ``parse_header`` + ``content_refusal``), and a pixel decode.
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
if not INTEROP.is_dir():
    INTEROP = Path("/work/shared/data/interop")


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _decode(path: Path) -> None:
    from pydicom import dcmread

    _ = dcmread(path).pixel_array


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, help="an earlier dicom_node/inbound/storage.py to compare with")
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args()
    from pydicom import dcmread

    from lesiontrack.dicom_node.inbound.ingest import content_refusal, parse_header
    from tests.support.dicom_node import dataset_bytes

    mods = {"after": _load(REPO / "dicom_node" / "inbound" / "storage.py", "storage_after")}
    if args.before:
        mods["before"] = _load(args.before, "storage_before")
    ge = sorted((INTEROP / "ct_gantry_tilt_ge").glob("*.dcm"))[0]
    j2k = sorted((INTEROP / "ct_siemens_j2k").iterdir())[0]
    cases = [
        ("GE CT 512x512, explicit VR LE", ge, "1.2.840.10008.1.2.1"),
        ("Siemens CT, JPEG 2000", j2k, "1.2.840.10008.1.2.4.90"),
    ]
    out: dict[str, object] = {
        "benchmark": "door validation (check_structure; parse_header + content_refusal; pixel decode)",
        "load_average_before": list(os.getloadavg()),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
    }
    n = args.number
    for name, path, ts in cases:
        body = dataset_bytes(path)
        sop_class = str(dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPClassUID)
        for label, mod in mods.items():
            t = min(timeit.repeat(partial(mod.check_structure, body, ts, {}), number=n, repeat=5))
            out[f"{name}: walk {label} (us)"] = round(t / n * 1e6, 1)

        def door(body: bytes = body, ts: str = ts, sop_class: str = sop_class, name: str = name) -> None:
            if content_refusal(parse_header(b"", body, ts), sop_class, ts) is not None:
                raise SystemExit(f"{name}: refused by the door")

        t = min(timeit.repeat(door, number=n, repeat=5))
        out[f"{name}: whole door after (us)"] = round(t / n * 1e6, 1)
        t = min(timeit.repeat(partial(_decode, path), number=20, repeat=3))
        out[f"{name}: read + pixel decode (us)"] = round(t / 20 * 1e6, 1)
    out["load_average_after"] = list(os.getloadavg())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
