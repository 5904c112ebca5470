"""Benchmark: DICOM-SEG + TID 1500 SR writing for a 500-slice CT (512×512) with 10 lesions; prints JSON.

Source CT = 500 in-memory slice headers (metadata only, as the writers need). Lesions = ellipsoids of 6–30 mm radius
given as masks cropped to their bounding box (aligned with the CT grid). Timed: measurement of the 10 lesions,
``write_seg`` (BINARY and LABELMAP) + save, ``write_sr`` + save. Wall and process-CPU seconds are both reported
(the CPU figure is robust to a loaded machine). Anchor measured in the same run: highdicom's
Segmentation with ``omit_empty_frames=False`` (every slice × every segment stored), i.e. what the SEG costs without
the frame omission.

    .venv/bin/python bench/seg_sr.py [--slices 500] [--lesions 10] [--repeat 3] [--no-anchor]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lesiontrack.models.imaging.volume import Volume
    from lesiontrack.pipeline.science.lesions import TrackedLesion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _headers(n: int, rows: int = 512) -> list:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "BENCH-1", "Bench^Patient", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer, ds.SeriesNumber = "", "CT", "Bench", 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-179.3, -179.3, -500.0 + k * 1.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PositionReferenceIndicator = ""
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _lesions(n_lesions: int, slices: int, grid: Volume) -> list[TrackedLesion]:
    """``n_lesions`` ellipsoids (6–30 mm radii) spread along the series, each as a crop on the CT's grid."""
    from pydicom.uid import generate_uid

    from lesiontrack.models.imaging.volume import Volume
    from lesiontrack.models.segmentation.prompts import LesionIdentity
    from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion

    rng = np.random.default_rng(7)
    lesions: list[TrackedLesion] = []
    sites = ["liver", "lung", "lymph node", "kidney", "adrenal gland", "liver", "lung", "spleen", "pancreas", "bone"]
    for n in range(n_lesions):
        radii = rng.uniform(6, 30, 3)
        half = np.ceil(radii / grid.spacing).astype(int) + 1  # (i, j, k) half extent
        centre = np.array(
            [
                rng.integers(half[0], 512 - half[0]),
                rng.integers(half[1], 512 - half[1]),
                (n + 0.5) * slices / n_lesions,
            ]
        )
        lo = (centre - half).astype(int)
        lo[2] = int(np.clip(lo[2], 0, slices - 2 * half[2] - 1))
        shape = (2 * half[2] + 1, 2 * half[1] + 1, 2 * half[0] + 1)
        k, j, i = np.indices(shape)
        d = np.stack([i - half[0], j - half[1], k - half[2]], -1) * grid.spacing
        mask = ((d / radii) ** 2).sum(-1) <= 1
        crop = Volume(mask.astype(np.uint8), origin=grid.index_to_patient(lo), spacing=grid.spacing)
        site = sites[n % len(sites)]
        ident = LesionIdentity(generate_uid(), f"L{n + 1} {site}", n + 1, site, site == "lymph node")
        lesions.append(TrackedLesion(ident, LesionStatus.PRESENT, crop, "bench-engine", "1.0"))
    return lesions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--lesions", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-anchor", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from lesiontrack.pipeline.dicom.seg.writer import save_new, sort_source_slices, write_seg
    from lesiontrack.pipeline.dicom.sr.writer import LesionReport, SrTimepoint, write_sr
    from lesiontrack.pipeline.science.measurements import measure_tracked

    heads = _headers(args.slices)
    _, grid = sort_source_slices(heads)
    lesions = _lesions(args.lesions, args.slices, grid)

    ct = grid.with_array(np.zeros(grid.shape, np.int16))
    t0, c0 = time.perf_counter(), time.process_time()
    meas = [measure_tracked(les, ct) for les in lesions]
    t_measure, c_measure = time.perf_counter() - t0, time.process_time() - c0
    reports = [LesionReport(m, baseline_category="target") for m in meas]

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("binary", "labelmap"):
            seg_t, sr_t, seg_c, sr_c = [], [], [], []
            for r in range(args.repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                seg = write_seg(heads, lesions, segmentation_type=kind)
                seg_path = save_new(seg.dataset, Path(tmp) / f"{kind}{r}")
                seg_t.append(time.perf_counter() - t0)
                seg_c.append(time.process_time() - c0)
                t0, c0 = time.perf_counter(), time.process_time()
                sr = write_sr(heads, seg, reports, time_point=SrTimepoint("T1", 1))
                sr_path = save_new(sr.dataset, Path(tmp) / f"{kind}{r}")
                sr_t.append(time.perf_counter() - t0)
                sr_c.append(time.process_time() - c0)
            results[kind] = {
                "seg_write_s": round(float(np.median(seg_t)), 3),
                "seg_write_cpu_s": round(float(np.median(seg_c)), 3),
                "sr_write_s": round(float(np.median(sr_t)), 3),
                "sr_write_cpu_s": round(float(np.median(sr_c)), 3),
                "seg_bytes": os.path.getsize(seg_path),
                "sr_bytes": os.path.getsize(sr_path),
                "seg_frames": int(seg.dataset.NumberOfFrames),
                "transfer_syntax": str(seg.dataset.file_meta.TransferSyntaxUID),
            }
        anchor = None
        if not args.no_anchor:
            # same label array, same descriptions, but every frame stored (omit_empty_frames=False)
            labels = np.zeros(grid.shape, np.uint8)
            from lesiontrack.pipeline.science.mask_grid import mask_onto_grid

            for n, les in enumerate(lesions, start=1):
                labels[mask_onto_grid(les.mask, grid)] = n
            descs = [
                hd.seg.SegmentDescription(
                    segment_number=n,
                    segment_label=les.identity.tracking_id,
                    segmented_property_category=hd.sr.CodedConcept(
                        "49755003", "SCT", "Morphologically Abnormal Structure"
                    ),
                    segmented_property_type=hd.sr.CodedConcept("52988006", "SCT", "Lesion"),
                    algorithm_type="MANUAL",
                )
                for n, les in enumerate(lesions, start=1)
            ]
            t0, c0 = time.perf_counter(), time.process_time()
            naive = hd.seg.Segmentation(
                source_images=heads,
                pixel_array=labels,
                segmentation_type="BINARY",
                segment_descriptions=descs,
                series_instance_uid=generate_uid(),
                series_number=1,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer="x",
                manufacturer_model_name="x",
                software_versions="x",
                device_serial_number="x",
                omit_empty_frames=False,
                transfer_syntax_uid=ExplicitVRLittleEndian,
            )
            p = Path(tmp) / "naive.dcm"
            naive.save_as(p)
            t_naive, c_naive = time.perf_counter() - t0, time.process_time() - c0
            anchor = {
                "name": "highdicom BINARY, omit_empty_frames=False",
                "seg_write_s": round(t_naive, 3),
                "seg_write_cpu_s": round(c_naive, 3),
                "seg_bytes": os.path.getsize(p),
                "seg_frames": int(naive.NumberOfFrames),
            }
            for kind in ("binary", "labelmap"):
                results[kind]["time_ratio_vs_anchor"] = round(results[kind]["seg_write_s"] / t_naive, 3)
                results[kind]["cpu_ratio_vs_anchor"] = round(results[kind]["seg_write_cpu_s"] / c_naive, 3)
                results[kind]["size_ratio_vs_anchor"] = round(results[kind]["seg_bytes"] / anchor["seg_bytes"], 4)

    print(
        json.dumps(
            {
                "benchmark": "seg_sr",
                "slices": args.slices,
                "rows": 512,
                "lesions": args.lesions,
                "lesion_voxels": int(sum(m.voxel_count for m in meas)),
                "measure_lesions_s": round(t_measure, 3),
                "measure_lesions_cpu_s": round(c_measure, 3),
                "results": results,
                "anchor": anchor,
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "date": time.strftime("%Y-%m-%d"),
                "repeat": args.repeat,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
