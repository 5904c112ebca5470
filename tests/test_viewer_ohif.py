"""Viewer proof: LesionTrack's SEG and SR for a follow-up CT, stored in a real Orthanc (Debian orthanc-dicomweb), open
in OHIF (npm @ohif/app prebuilt dist) in headless Debian Chromium driven by playwright-core, offline.

The test checks that OHIF lists the SEG's segment labels (the Tracking IDs) and shows the SR's measurements (the
volume of every present lesion); that after accepting OHIF's tracking prompt on the OHIF measurements SR
(pipeline.dicom.sr.viewer) its tracked-measurements panel lists every present lesion by name with its long and short
axis;
that what OHIF then saves ("Create SR") reads back as the radiologist's annotation; and saves the screenshots under
``tests/artifacts/ohif/``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest

from lesiontrack.db.session import make_engine, make_session_factory, upgrade
from tests.support.ohif import OhifExpectation, require_browser_stack, run_ohif_check
from tests.support.segsr import content_items
from tests.support.tools import REPO

ARTIFACTS = Path(os.environ.get("LESIONTRACK_TEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "ohif"

pytestmark = [pytest.mark.slow, pytest.mark.services]


def test_ohif_shows_our_seg_and_sr(tmp_path: Path) -> None:
    require_browser_stack()
    from lesiontrack.pipeline.dicom.lesion_names import display_name
    from lesiontrack.pipeline.dicom.seg.writer import save_new
    from lesiontrack.pipeline.dicom.sr.viewer import viewer_lesions, write_viewer_sr
    from lesiontrack.pipeline.dicom.sr.writer import LesionReport, SrTimepoint
    from tests.support.patient import RADIOLOGIST_WORDS, build_patient, phantom_timepoints

    url = f"sqlite:///{tmp_path / 'lt.sqlite3'}"
    upgrade(url)
    built = build_patient(
        make_session_factory(make_engine(url)),
        phantom_timepoints(tmp_path),
        tmp_path,
        patient_id="LT-DEMO-7",
        with_failed_job=False,
    )
    fu = built.timepoints[1]
    seg = pydicom.dcmread(fu.seg_path, stop_before_pixels=True)
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    # each label is the Tracking ID plus the radiologist's description, within LO's 64 characters
    assert labels == [display_name(s.TrackingID, s.get("SegmentDescription")) for s in seg.SegmentSequence]
    assert all(": " in label and len(label) <= 64 for label in labels), labels
    assert {s.SegmentDescription for s in seg.SegmentSequence} <= set(RADIOLOGIST_WORDS.values())
    present = [m for m in fu.measurements.values() if m.status != "vanished"]
    assert present
    assert len(labels) == len(present)
    volumes = [f"Volume: {m.volume_mm3 / 1000:.2f} ml" for m in present]  # in ml since issue 29, not "66606.41 mm3"
    # the RECIST long axis is named and shown as such (the 3-D diameter is "Maximum 3D diameter", never "Diameter")
    long_axes = [f"Long axis: {m.long_axis.length_mm:.2f} mm" for m in present if m.long_axis is not None]
    largest = max(present, key=lambda m: m.volume_mm3).tracking_id  # the screenshot jumps to it
    # the OHIF measurements SR (pipeline.dicom.sr.viewer), written as the write step writes it; the smallest lesion as
    # if
    # it had been measured without a short axis (a Length measurement in OHIF)
    thin = min(present, key=lambda m: m.volume_mm3).tracking_uid
    reports = [LesionReport(replace(m, short_axis=None) if m.tracking_uid == thin else m) for m in present]
    viewer_sr = write_viewer_sr(
        [pydicom.dcmread(f, stop_before_pixels=True) for f in fu.ct_files],
        reports,
        time_point=SrTimepoint("T1", 1, fu.study_date),
        seg=seg,
    )
    assert viewer_sr is not None
    viewer_path = save_new(viewer_sr, tmp_path / "viewer")
    tracked = viewer_lesions(reports)
    assert len(tracked) == len(present), "every present phantom lesion has a RECIST long axis"
    by_uid = {s.TrackingUID: s.SegmentLabel for s in seg.SegmentSequence}
    tracked_texts = [by_uid[r.measurement.tracking_uid] for r in tracked]
    # each listed as its name, then its RECIST long axis ("L") and short axis ("W") as OHIF prints them
    tracked_rows = [
        f"{by_uid[m.tracking_uid]}\nL: {m.long_axis.length_mm:.1f} mm\nW: {m.short_axis.length_mm:.1f} mm"
        if m.short_axis is not None
        else f"{by_uid[m.tracking_uid]}\n{m.long_axis.length_mm:.1f} mm"
        for m in (r.measurement for r in tracked)
        if m.long_axis is not None
    ]

    assert fu.seg_path is not None
    assert fu.sr_path is not None
    ours = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (fu.sr_path, viewer_path)}
    saved: list[Path] = []
    result, code = run_ohif_check(
        tmp_path,
        [*fu.ct_files, fu.seg_path, fu.sr_path, viewer_path],
        fu.study_uid,
        OhifExpectation(
            seg=str(seg.SeriesDescription),
            sr=str(pydicom.dcmread(fu.sr_path, stop_before_pixels=True).SeriesDescription),
            labels=labels,
            sr_texts=volumes + long_axes,
            track_sr=str(viewer_sr.SeriesDescription),
            tracked_texts=tracked_texts,
            focus_label=largest,
            save_sr=True,
        ),
        before_stop=lambda orthanc: saved.extend(_new_srs(orthanc, fu.study_uid, ours, tmp_path / "saved")),
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "result.json").write_text(json.dumps(result, indent=1))
    for shot in result["screenshots"]:
        shutil.copy(shot, ARTIFACTS / Path(shot).name)

    assert result["labelsFound"] == labels, f"segment labels missing in OHIF: {result['labelsMissing']}"
    assert sorted(result["srTextsFound"]) == sorted(volumes + long_axes), f"missing: {result['srTextsMissing']}"
    shown = result["srPanelText"]
    assert "mm3" not in shown, shown[-2000:]
    assert "\nDiameter:" not in shown, shown[-2000:]
    assert "Maximum 3D diameter:" in shown, shown[-2000:]
    # OHIF re-hydrates the OHIF measurements SR: its tracked-measurements panel lists every lesion by name
    assert result["trackedMissing"] == [], (result["trackedMissing"], result["trackedPanelText"][-2000:])
    assert f"Measurements ({len(tracked)})" in result["trackedPanelText"]
    missing_rows = [row for row in tracked_rows if row not in result["trackedPanelText"]]
    assert not missing_rows, (missing_rows, result["trackedPanelText"][-2000:])
    # the SR's tracking identifiers carry the same names as the SEG labels
    sr = pydicom.dcmread(fu.sr_path)
    names = {item.TextValue for item in content_items(sr) if _concept(item) == "112039"}
    assert set(labels) <= names, (labels, names)
    assert code == 0
    for name in ("ohif-study.png", "ohif-seg.png", "ohif-sr.png", "ohif-tracked.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000, name

    # What OHIF saved ("Create SR", the dialog's defaults) is the radiologist's annotation, not ours: another
    # Manufacturer, fresh Tracking UIDs, the lesions named by their labels; it references the follow-up CT.
    assert len(saved) == 1, (result["stowStatus"], result["saveDialogText"])
    _check_ohif_saved_sr(saved[0], fu, tracked, viewer_sr)


def _new_srs(orthanc: Any, study_uid: str, known: set[str], out: Path) -> list[Path]:
    """The SR instances of the study in Orthanc that are not ``known`` (downloaded to ``out``)."""
    import urllib.request

    out.mkdir(parents=True, exist_ok=True)
    study = orthanc.post("/tools/lookup", study_uid)[0]["ID"]
    found = []
    for inst in orthanc.get_json(f"/studies/{study}/instances"):
        if inst["MainDicomTags"]["SOPInstanceUID"] in known:
            continue
        with urllib.request.urlopen(f"{orthanc.url}/instances/{inst['ID']}/file", timeout=30) as r:
            data = r.read()
        path = out / f"{inst['ID']}.dcm"
        path.write_bytes(data)
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR":
            found.append(path)
    return found


def _check_ohif_saved_sr(path: Path, fu: Any, tracked: list[Any], viewer_sr: pydicom.Dataset) -> None:
    from lesiontrack.pipeline.dicom.sr.reader import read_sr, read_sr_prompts
    from lesiontrack.pipeline.jobs.verification import AnnotationHeader
    from lesiontrack.pipeline.science.prompt_selection import is_our_object

    ds = pydicom.dcmread(path)
    assert str(ds.get("Manufacturer", "")) != "LesionTrack"
    assert not is_our_object(path)
    header = AnnotationHeader.read(path)
    assert header is not None
    assert header.modality == "SR"
    assert not header.is_ours(set())
    assert fu.series_uid in header.references
    lesion_uids = {r.measurement.tracking_uid for r in tracked}
    contents = read_sr(path)
    assert len(contents.groups) == len(tracked)
    assert not lesion_uids & set(contents.tracking_uids())
    ct = [pydicom.dcmread(f, stop_before_pixels=True) for f in fu.ct_files]
    prompts = read_sr_prompts(path, images=ct)
    assert sorted(p.identity.tracking_id for p in prompts) == sorted(r.measurement.tracking_id for r in tracked)
    # OHIF's save dialog defaults to the series of the SR the measurements came from (docs/viewer.md)
    assert ds.SeriesInstanceUID == viewer_sr.SeriesInstanceUID
    pred = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == viewer_sr.SOPInstanceUID


def _concept(item: pydicom.Dataset) -> str | None:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else None
