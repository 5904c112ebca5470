"""Imaging-core speed: DICOM series write/read (vs SimpleITK/GDCM, same run), tilt resampling, phantom, synthesis.

    .venv/bin/python bench/imaging_io.py [--slices 500] [--chest]

Prints one JSON object. Anchor for reading: SimpleITK ImageSeriesReader (GDCM) on the same files; for writing:
SimpleITK writing the same volume as a DICOM series slice by slice (GDCM ImageIO).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesiontrack.models.imaging.volume import Volume

SHARED = REPO.parent / "shared" / "data"


CPU: dict[str, float] = {}


def _t(fn, *a, **kw):
    """Wall time; the process CPU time of the call is kept in CPU[fn.__name__] (the machine is shared)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    CPU[fn.__name__] = round(time.process_time() - c, 2)
    return out, time.perf_counter() - t


def bench_series(n_slices: int) -> dict:
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    from lesiontrack.models.imaging.dicom_read import read_series
    from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series

    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 200, (n_slices, 512, 512))).astype(np.int16)
    vol = Volume(arr, origin=(-250.0, -250.0, -400.0), spacing=(0.98, 0.98, 1.0))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ours"
        _files, t_write = _t(
            write_ct_series,
            vol,
            d,
            CTSeriesHeader(
                patient_id="BENCH",
                patient_name="Bench^Series",
                study_uid=generate_uid(),
                series_uid=generate_uid(),
                frame_of_reference_uid=generate_uid(),
                study_date="20260101",
            ),
        )
        # anchor: SimpleITK/GDCM writing the same slices
        ds = Path(tmp) / "sitk"
        ds.mkdir()
        img = vol.to_sitk()
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        cpu_write = CPU["write_ct_series"]
        t, c = time.perf_counter(), time.process_time()
        for k in range(n_slices):
            sl = img[:, :, k]
            sl.SetMetaData("0020|0032", "\\".join(str(v) for v in vol.index_to_patient([0, 0, k])))
            sl.SetMetaData("0020|0013", str(k + 1))
            sl.SetMetaData("0008|0060", "CT")
            writer.SetFileName(str(ds / f"{k:04d}.dcm"))
            writer.Execute(sl)
        t_sitk_write, cpu_sitk_write = time.perf_counter() - t, time.process_time() - c
        back, t_read = _t(read_series, d)
        cpu_read = CPU["read_series"]
        reader = sitk.ImageSeriesReader()
        t, c = time.perf_counter(), time.process_time()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(d)))
        ref = reader.Execute()
        t_sitk_read, cpu_sitk_read = time.perf_counter() - t, time.process_time() - c
        assert np.array_equal(back.array, sitk.GetArrayFromImage(ref))
    return {
        "slices": n_slices,
        "matrix": "512x512 int16",
        "write_s": round(t_write, 2),
        "sitk_write_s": round(t_sitk_write, 2),
        "write_ratio_vs_sitk": round(t_write / t_sitk_write, 2),
        "read_s": round(t_read, 2),
        "sitk_read_s": round(t_sitk_read, 2),
        "read_ratio_vs_sitk": round(t_read / t_sitk_read, 2),
        "cpu_write_s": cpu_write,
        "cpu_sitk_write_s": round(cpu_sitk_write, 2),
        "cpu_write_ratio_vs_sitk": round(cpu_write / cpu_sitk_write, 2),
        "cpu_read_s": cpu_read,
        "cpu_sitk_read_s": round(cpu_sitk_read, 2),
        "cpu_read_ratio_vs_sitk": round(cpu_read / cpu_sitk_read, 2),
    }


def bench_interop() -> dict:
    from lesiontrack.models.imaging.dicom_read import read_series

    out = {}
    for name in ("ct_gantry_tilt_ge", "ct_phantom_tilt_philips/S2010", "ct_siemens_j2k"):
        folder = SHARED / "interop" / name
        if not folder.exists():
            continue
        vol, t = _t(read_series, folder)
        out[name] = {
            "read_s": round(t, 2),
            "cpu_s": CPU["read_series"],
            "grid": list(vol.size_ijk),
            "geometry_fix": vol.meta.get("geometry_fix"),
        }
    return out


def bench_phantom_synthesis(chest: bool) -> dict:
    from lesiontrack.synthetic.phantom import make_phantom
    from lesiontrack.synthetic.synthesis import synthesize_patient

    ph, t_ph = _t(make_phantom, 0)
    _pat, t_syn = _t(synthesize_patient, ph.ct, ph.lesions, np.random.default_rng(0), 1)
    out = {
        "phantom_default_160x160x100_s": round(t_ph, 1),
        "cpu_phantom_default_s": CPU["make_phantom"],
        "synth_one_followup_default_s": round(t_syn, 1),
        "cpu_synth_default_s": CPU["synthesize_patient"],
    }
    if chest:
        phc, t_c = _t(make_phantom, 0, shape=(200, 512, 512), spacing=(0.7, 0.7, 1.5))
        _, t_sc = _t(synthesize_patient, phc.ct, phc.lesions, np.random.default_rng(0), 1)
        cpu_c = CPU["make_phantom"]
        out.update(
            {
                "phantom_chest_512x512x200_s": round(t_c, 1),
                "cpu_phantom_chest_s": cpu_c,
                "synth_one_followup_chest_s": round(t_sc, 1),
                "cpu_synth_chest_s": CPU["synthesize_patient"],
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--chest", action="store_true", help="also the 512x512x200 phantom (minutes)")
    args = ap.parse_args()
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "load_average_at_start": [round(v, 1) for v in os.getloadavg()],
        "series": bench_series(args.slices),
        "interop": bench_interop(),
        "phantom_synthesis": bench_phantom_synthesis(args.chest),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
