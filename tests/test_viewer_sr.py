"""The OHIF measurements SR (pipeline.dicom.sr.viewer): valid DICOM, shaped as OHIF's cornerstone adapters re-hydrate
it,
one group per lesion under the lesion's own Tracking UID, ours for our readers — and an SR OHIF saves from it after a
radiologist's edit reads back as the radiologist's annotation, the lesions named by their labels.

The browser proof (OHIF 3.13.2 lists these measurements in its tracked-measurements panel, and saves them) is in
tests/test_viewer_ohif.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.models.segmentation.rasterize import prompt_to_mask
from lesiontrack.pipeline.dicom.lesion_names import display_name
from lesiontrack.pipeline.dicom.seg.reader import read_seg_prompts
from lesiontrack.pipeline.dicom.seg.writer import SegWriteResult, save_new, write_seg
from lesiontrack.pipeline.dicom.sr.reader import (
    is_tool_tag,
    name_from_label,
    read_sr,
    read_sr_measurements,
    read_sr_prompts,
)
from lesiontrack.pipeline.dicom.sr.viewer import OHIF_BIDIRECTIONAL, OHIF_LENGTH, viewer_lesions, write_viewer_sr
from lesiontrack.pipeline.dicom.sr.writer import LesionReport, SrTimepoint
from lesiontrack.pipeline.dicom.validate import ToolMissing, dciodvfy_path, run_dciodvfy, run_dsrdump, run_sr_validator
from lesiontrack.pipeline.jobs.verification import AnnotationHeader
from lesiontrack.pipeline.science.correction_matching import MatchedBy, SegmentOfInterest, match_correction
from lesiontrack.pipeline.science.lesions import LesionStatus
from lesiontrack.pipeline.science.measurements import LesionMeasurement, measure_tracked
from lesiontrack.pipeline.science.prompt_selection import is_our_object
from tests.support.segsr import SyntheticTimepoint, content_items, make_series
from tests.support.tools import require_tool

PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
WORDS = {"liver": "hypodense lesion segment VIII", "lymph node": "enlarged right paratracheal node"}


@dataclass
class Viewer:
    tp: SyntheticTimepoint
    measurements: list[LesionMeasurement]
    seg: SegWriteResult
    seg_path: Path
    path: Path
    dataset: pydicom.Dataset


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Viewer:
    tmp = tmp_path_factory.mktemp("viewer-sr")
    tp = make_series(tmp, n_timepoints=2)[1]
    # the radiologist's words travel on the lesions (as the pipeline's do): SEG SegmentDescription → the SR's labels
    tp.lesions = [
        replace(les, identity=replace(les.identity, description=WORDS.get((les.identity.anatomic_site or "").lower())))
        for les in tp.lesions
    ]
    meas = [measure_tracked(les, tp.ct, tp.series_uid) for les in tp.lesions]
    seg = write_seg(tp.datasets, tp.lesions)
    reports = [LesionReport(m) for m in meas]
    ds = write_viewer_sr(tp.datasets, reports, time_point=SrTimepoint("T1", 1), seg=seg.dataset)
    assert ds is not None
    return Viewer(tp, meas, seg, save_new(seg.dataset, tmp / "out"), save_new(ds, tmp / "out"), ds)


def _groups(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [i for i in content_items(ds) if i.ConceptNameCodeSequence[0].CodeValue == "125007"]


def _child(group: pydicom.Dataset, code: str) -> list[pydicom.Dataset]:
    return [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code]


def test_viewer_sr_passes_dciodvfy_and_dsrdump(viewer: Viewer) -> None:
    try:
        dciodvfy_path()
    except ToolMissing:
        require_tool("dciodvfy")
    require_tool("dsrdump")
    rep = run_dciodvfy(viewer.path)
    assert rep.ok, rep.summary()
    dump = run_dsrdump(viewer.path)
    assert dump.ok, dump.summary()


@pytest.mark.slow
def test_viewer_sr_passes_pixelmed_sr_validator(viewer: Viewer, tmp_path: Path) -> None:
    require_tool("java", PIXELMED_JAR)
    first = next(m for m in viewer.measurements if m.present)  # one lesion as a Length (no short axis)
    mixed = [LesionReport(replace(m, short_axis=None) if m is first else m) for m in viewer.measurements]
    ds = write_viewer_sr(viewer.tp.datasets, mixed, time_point=SrTimepoint("T1", 1), seg=viewer.seg.dataset)
    assert ds is not None
    for rep in run_sr_validator([viewer.path, save_new(ds, tmp_path)]):
        assert rep.ok, rep.summary()
        assert "Found Root Template TID_1500" in rep.output


def test_one_ohif_bidirectional_group_per_present_lesion_under_its_tracking_uid(viewer: Viewer) -> None:
    ds = viewer.dataset
    assert ds.Manufacturer == "LesionTrack"
    assert int(ds.SeriesNumber) == 903
    assert ds.SeriesDate == ds.ContentDate
    assert ds.SeriesTime == ds.ContentTime
    present = [m for m in viewer.measurements if m.present]
    assert viewer.tp.lesions
    assert any(les.status is LesionStatus.VANISHED for les in viewer.tp.lesions)
    assert [r.measurement for r in viewer_lesions([LesionReport(m) for m in viewer.measurements])] == present
    groups = _groups(ds)
    assert len(groups) == len(present)
    segments = {str(s.TrackingUID): s for s in viewer.seg.dataset.SegmentSequence}
    for m, group in zip(present, groups, strict=True):
        # OHIF's tool tag as Tracking Identifier, the lesion's own Tracking UID (the same as its SEG segment's)
        assert _child(group, "112039")[0].TextValue == OHIF_BIDIRECTIONAL
        assert m.tracking_uid == _child(group, "112040")[0].UID
        assert m.tracking_uid in segments
        # the label OHIF shows: the lesion's name, as the SEG segment label
        (comment,) = _child(group, "121106")
        assert comment.TextValue == display_name(m.tracking_id, WORDS.get((m.anatomic_site or "").lower()))
        assert comment.TextValue == segments[m.tracking_uid].SegmentLabel
        # Long Axis / Short Axis (CodeMeaning as OHIF looks them up), each from a 2-point POLYLINE on one CT slice
        images = set()
        for code, meaning, axis in (("103339001", "Long Axis", m.long_axis), ("103340004", "Short Axis", m.short_axis)):
            (num,) = _child(group, code)
            assert num.ConceptNameCodeSequence[0].CodeMeaning == meaning
            assert axis is not None
            assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(axis.length_mm)
            (scoord,) = [c for c in num.ContentSequence if c.ValueType == "SCOORD"]
            assert scoord.RelationshipType == "INFERRED FROM"
            assert scoord.GraphicType == "POLYLINE"
            assert len(scoord.GraphicData) == 4
            images.add(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        assert len(images) == 1


def test_viewer_sr_is_ours_and_reads_back_with_the_lesions_names(viewer: Viewer) -> None:
    assert is_our_object(viewer.path)
    header = AnnotationHeader.read(viewer.path)
    assert header is not None
    assert header.is_ours(set())
    present = {m.tracking_uid: m for m in viewer.measurements if m.present}
    prompts = read_sr_prompts(viewer.path, images=viewer.tp.datasets)
    assert {p.identity.tracking_uid for p in prompts} == set(present)
    for p in prompts:
        m = present[p.identity.tracking_uid]
        assert p.identity.tracking_id == m.tracking_id
        assert p.identity.description == WORDS.get((m.anatomic_site or "").lower())
    back = read_sr_measurements(viewer.path, images=viewer.tp.datasets)
    for uid, m in present.items():
        assert back[uid].tracking_id == m.tracking_id
        assert back[uid].long_axis is not None
        assert m.long_axis is not None
        assert back[uid].long_axis.length_mm == pytest.approx(m.long_axis.length_mm)
        assert np.allclose(back[uid].long_axis.start_mm, m.long_axis.start_mm, atol=1e-3)


def _as_ohif_saves_it(viewer: Viewer, tmp: Path) -> Path:
    """What OHIF 3.13.2 stores when the radiologist saves the hydrated measurements (observed in
    tests/test_viewer_ohif.py): same series (the dialog's default), Manufacturer "Unspecified", fresh Tracking UIDs,
    the labels as Comments, the Predecessor Documents Sequence naming our SR; here one lesion was re-measured."""
    ds = copy.deepcopy(viewer.dataset)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Manufacturer = "Unspecified"
    ds.InstanceNumber = 2
    for group in _groups(ds):
        _child(group, "112040")[0].UID = pydicom.uid.generate_uid()
    (num,) = _child(_groups(ds)[0], "103339001")
    num.MeasuredValueSequence[0].NumericValue = round(float(num.MeasuredValueSequence[0].NumericValue) + 2.0, 3)
    path = tmp / "ohif-saved.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_an_sr_ohif_saves_from_it_is_the_radiologists_and_matches_our_lesions(viewer: Viewer, tmp_path: Path) -> None:
    saved = _as_ohif_saves_it(viewer, tmp_path)
    assert not is_our_object(saved)
    header = AnnotationHeader.read(saved)
    assert header is not None
    assert not header.is_ours(set())
    assert viewer.tp.series_uid in header.references
    present = {m.tracking_id: m for m in viewer.measurements if m.present}
    prompts = read_sr_prompts(saved, images=viewer.tp.datasets)
    assert sorted(p.identity.tracking_id for p in prompts) == sorted(present)
    assert not {p.identity.tracking_uid for p in prompts} & {m.tracking_uid for m in present.values()}
    assert {p.meta["segment_label"] for p in prompts} == {
        s.SegmentLabel for s in viewer.seg.dataset.SegmentSequence if s.TrackingID in present
    }
    # matched to our lesions as a correction is (pipeline.science.correction_matching): by Tracking ID, not as additions
    ct = viewer.tp.ct
    corrected = [
        SegmentOfInterest(
            n, p.identity.tracking_uid, p.identity.tracking_id, p.meta["segment_label"], prompt_to_mask(p, ct)
        )
        for n, p in enumerate(prompts, start=1)
    ]
    ours = [
        SegmentOfInterest(
            int(p.meta.get("segment_number", n)),
            p.identity.tracking_uid,
            p.identity.tracking_id,
            str(p.meta.get("segment_label") or p.identity.tracking_id),
            p.mask if p.mask is not None else prompt_to_mask(p, ct),
        )
        for n, p in enumerate(read_seg_prompts(viewer.seg_path, ct), start=1)
    ]
    match = match_correction(corrected, ours)
    assert {m.matched_by for m in match.matches} == {MatchedBy.TRACKING_ID}
    assert not match.deleted
    assert {m.tracking_uid for m in match.matches} == {m.tracking_uid for m in present.values()}


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("L2 liver: hypodense lesion segment VIII", ("L2 liver", "hypodense lesion segment VIII")),
        ("L2 liver", ("L2 liver", None)),
        ("N1 (unconfirmed)", ("N1 (unconfirmed)", None)),
        ("left lower lobe mass, spiculated", ("L3 lung", "left lower lobe mass, spiculated")),
        (None, ("L3 lung", None)),
    ],
)
def test_name_from_an_ohif_label(label: str | None, expected: tuple[str, str | None]) -> None:
    assert name_from_label(label, "L3 lung") == expected


def test_tool_tags_are_recognised_whatever_their_case() -> None:
    assert is_tool_tag("Cornerstone3DTools@^0.1.0:Bidirectional")
    assert is_tool_tag("cornerstoneTools@^4.0.0:Length")
    assert not is_tool_tag("L2 liver: hypodense lesion")
    assert not is_tool_tag("Cornerstone lesion")


def test_no_viewer_sr_without_a_lesion_with_axes(viewer: Viewer) -> None:
    gone = [LesionReport(m) for m in viewer.measurements if not m.present]
    assert write_viewer_sr(viewer.tp.datasets, gone, time_point=SrTimepoint("T1", 1)) is None
    assert read_sr(viewer.path).groups  # (the module fixture's SR has them)


def test_an_sr_ohif_saves_into_our_series_is_taken_in_as_a_correction(viewer: Viewer, tmp_path: Path) -> None:
    """OHIF's save dialog defaults to the series the measurements came from, so the radiologist's SR arrives in our
    series 903: completion hands it to verification, which records it as a correction; it is not counted as ours."""
    from lesiontrack.config.settings import RoutingSettings, VerificationSettings
    from lesiontrack.db.models import AnalysisJob, JobState, Series, TimepointVerification
    from lesiontrack.db.repository import get_or_create_patient, get_or_create_series, get_or_create_study
    from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
    from lesiontrack.dicom_node.inbound.completion import complete_series
    from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_file
    from lesiontrack.dicom_node.inbound.storage import InstanceStore
    from lesiontrack.pipeline.jobs.contract import WriteSegSrOutput
    from lesiontrack.pipeline.jobs.steps.persistence import record_our_objects
    from lesiontrack.pipeline.jobs.verification import take_in_series
    from lesiontrack.pipeline.science.prompt_selection import our_instance_uids

    url = f"sqlite:///{tmp_path / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    ct = viewer.tp.datasets[0]
    with session_scope(sf) as s:  # the follow-up CT and the job that issued our SEG + OHIF SR for it
        patient = get_or_create_patient(s, str(ct.PatientID), None)
        study = get_or_create_study(s, patient, str(ct.StudyInstanceUID), study_date=str(ct.StudyDate))
        get_or_create_series(s, study, viewer.tp.series_uid, modality="CT")
        out = WriteSegSrOutput(
            files=[str(viewer.seg_path), str(viewer.path)],
            seg=str(viewer.seg_path),
            sr=None,
            seg_sop_instance_uid=str(viewer.seg.dataset.SOPInstanceUID),
            present=2,
            vanished=1,
            viewer_sr=str(viewer.path),
        )
        s.add(
            AnalysisJob(
                followup_series_uid=viewer.tp.series_uid,
                patient_pk=patient.id,
                state=JobState.DONE,
                step="send",
                step_outputs={WriteSegSrOutput.step: out.model_dump(mode="json")},
            )
        )
    record_our_objects(sf, [viewer.seg_path, viewer.path])
    ohif_series = str(viewer.dataset.SeriesInstanceUID)
    rules = RoutingSettings()
    assert complete_series(sf, rules, ohif_series, forced=True) is not None
    assert take_in_series(sf, VerificationSettings(), ohif_series) == [], "our own result alone is no correction"

    saved = _as_ohif_saves_it(viewer, tmp_path)
    ingestor = Ingestor(InstanceStore(tmp_path / "dicom", fsync=False), sf)
    try:
        assert ingest_file(ingestor, saved, calling_ae="PACS").ok
    finally:
        ingestor.close()
    handed: list[str] = []
    route = complete_series(sf, rules, ohif_series, forced=True, on_annotation_complete=handed.append)
    assert route is not None
    assert handed == [ohif_series]
    saved_uid = str(pydicom.dcmread(saved, stop_before_pixels=True).SOPInstanceUID)
    ours = our_instance_uids(sf, [saved_uid, str(viewer.dataset.SOPInstanceUID)])
    assert ours == {str(viewer.dataset.SOPInstanceUID)}
    jobs = take_in_series(sf, VerificationSettings(), ohif_series)
    assert len(jobs) == 1
    with session_scope(sf) as s:
        (v,) = s.scalars(select(TimepointVerification)).all()
        assert v.source_sop_instance_uid == saved_uid
        assert v.series_instance_uid == viewer.tp.series_uid
        assert v.source_manufacturer == "Unspecified"
        series = s.scalar(select(Series).where(Series.series_instance_uid == ohif_series))
        assert series is not None
        assert series.created_by_us


def test_a_lesion_without_a_short_axis_is_an_ohif_length(viewer: Viewer, tmp_path: Path) -> None:
    m = next(m for m in viewer.measurements if m.present)
    ds = write_viewer_sr(
        viewer.tp.datasets, [LesionReport(replace(m, short_axis=None))], time_point=SrTimepoint("T1", 1)
    )
    assert ds is not None
    (group,) = _groups(ds)
    assert _child(group, "112039")[0].TextValue == OHIF_LENGTH
    assert m.tracking_uid == _child(group, "112040")[0].UID
    assert _child(group, "103339001")
    assert not _child(group, "103340004")
    path = save_new(ds, tmp_path)
    try:
        dciodvfy_path()
    except ToolMissing:
        require_tool("dciodvfy")
    rep = run_dciodvfy(path)
    assert rep.ok, rep.summary()
    (prompt,) = read_sr_prompts(path, images=viewer.tp.datasets)
    assert prompt.identity.tracking_id == m.tracking_id


def test_unconfirmed_candidates_are_not_tracked_measurements(viewer: Viewer) -> None:
    """Issue 29 item 6: OHIF's tracked-measurements panel lists the tracked lesions by name, not every new-lesion
    candidate: a candidate (status "candidate") is left out of the OHIF SR, a confirmed new lesion is not."""
    present = [m for m in viewer.measurements if m.present]
    assert len(present) >= 2
    cand = replace(present[0], tracking_id="N1 (unconfirmed)", status=LesionStatus.CANDIDATE)
    new = replace(present[1], status=LesionStatus.NEW)
    reports = [LesionReport(cand), LesionReport(new), *[LesionReport(m) for m in present[2:]]]
    shown = [r.measurement.tracking_uid for r in viewer_lesions(reports)]
    assert cand.tracking_uid not in shown
    assert new.tracking_uid in shown
    ds = write_viewer_sr(viewer.tp.datasets, reports, time_point=SrTimepoint("T1", 1), seg=viewer.seg.dataset)
    assert ds is not None
    assert len(_groups(ds)) == len(shown)
