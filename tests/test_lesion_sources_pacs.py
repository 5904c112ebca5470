"""Each lesion from its own nearest annotation, when that annotation is on a study only on the PACS (issue 31 C).

A patient's baseline T0 (a GSPS line on each lesion) and first follow-up T1 (a GSPS arrow on one lesion, the
radiologist's re-look) are only in Orthanc; the second follow-up T2 reaches LesionTrack. The job's prior is T1 (the
annotation nearest in time): it marks one lesion. The others are marked only on T0: prior matching fetched T0's
annotation series, the job retrieves T0's CT by the peer's configured method (C-MOVE; DICOMweb) because those
lesions need it, and tracks them from there — none "not assessed", and the job's step output says what it retrieved
and why. A retrieval that fails leaves those lesions "not assessed" with the reason (the unit-level check below).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from bench.drawn_lesions import drawings
from lesiontrack.config.settings import RetrieveMethod
from lesiontrack.db.models import JobState, Series
from lesiontrack.db.repository import get_or_create_patient, get_or_create_series, get_or_create_study
from lesiontrack.db.session import session_scope
from lesiontrack.demo_data import DemoPatient
from lesiontrack.dicom_node.inbound.ingest import ingest_file
from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.models.segmentation.drawing import Drawing
from lesiontrack.pipeline.dicom.annotations.common import normalise_label
from lesiontrack.pipeline.dicom.annotations.gsps import read_gsps_prompts
from lesiontrack.pipeline.dicom.annotations.names import named_lesions
from lesiontrack.pipeline.dicom.annotations.rtstruct import read_rtstruct_prompts
from lesiontrack.pipeline.dicom.seg.reader import UnassessedSegment, read_seg_prompts_and_gaps
from lesiontrack.pipeline.jobs.contract import LoadVolumesOutput, TrackOutput, read_output
from lesiontrack.pipeline.jobs.lesion_sources import PacsAccess, earlier_sources
from lesiontrack.pipeline.jobs.ports import PriorTimepoint
from lesiontrack.pipeline.jobs.steps import build_pipeline
from lesiontrack.service import build_analysis_service, build_ports
from lesiontrack.synthetic.annotations import Mark, write_gsps, write_rtstruct
from lesiontrack.web.dashboard import templates
from tests.support.orthanc_node import Site
from tests.support.still_patient import still_patient

pytestmark = pytest.mark.services


def _patient(tmp: Path) -> tuple[DemoPatient, dict[str, dict[str, Drawing]], str, Path, Path]:
    """The patient, each lesion's drawings, the lesion the T1 arrow marks, the T0 lines' and the T1 arrow's GSPS."""
    patient = still_patient(tmp / "patient")
    prompts, _ = read_seg_prompts_and_gaps(patient.seg_file, read_series(patient.baseline.files))
    rng = np.random.default_rng(3)
    drawn = {p.identity.tracking_id: drawings(p.mask, rng) for p in prompts if p.mask is not None}
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.baseline.files]
    lines = write_gsps(heads, [Mark(d["line"], label) for label, d in drawn.items()], tmp / "pr" / "t0.dcm")
    target = sorted(drawn)[1]
    t1_heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.followups[0].files]
    arrow = write_gsps(t1_heads, [Mark(drawn[target]["arrow"], target)], tmp / "pr" / "t1.dcm")
    return patient, drawn, target, lines, arrow


@pytest.mark.parametrize("method", [RetrieveMethod.C_MOVE, RetrieveMethod.DICOMWEB])
def test_a_lesion_marked_only_on_a_pacs_only_baseline_is_tracked_from_there(
    tmp_path: Path, method: RetrieveMethod
) -> None:
    site = Site(tmp_path / "site", method=method)
    try:
        settings, sf = site.node.settings, site.node.sf
        settings.engines.registration = "none"
        settings.engines.working_spacing_mm = 3.0
        settings.detection.new_lesions = False
        patient, drawn, target, lines, arrow = _patient(tmp_path)
        for f in [*patient.baseline.files, lines, *patient.followups[0].files, arrow]:
            site.orthanc.upload(f)  # T0 and T1: only on the PACS
        for f in patient.followups[1].files:  # T2 reaches LesionTrack
            assert ingest_file(site.node.scp.ingestor, f).ok
        site.node.settle()
        service = build_analysis_service(settings, sf, build_pipeline, ports=build_ports(settings, sf))
        job = service.store.create(patient.followups[1].series_uid)
        assert service.run(job) is JobState.DONE, service.store.get(job).error
        done = service.store.get(job)
        loaded = read_output(done.step_outputs, LoadVolumesOutput)
        assert loaded is not None
        others = sorted(set(drawn) - {target})
        assert [r.tracking_id for r in loaded.lesions] == [target]  # T1's arrow: the nearest annotation
        assert sorted(r.tracking_id for r in loaded.earlier_lesions) == others  # T0's lines, retrieved
        assert loaded.not_assessed == []
        # what was retrieved and why: T0's CT, from the PACS, for those lesions
        assert [
            (r.study_uid, r.ct_series_uid, r.source, sorted(r.lesions), r.error) for r in loaded.earlier_retrieved
        ] == [(patient.baseline.study_uid, patient.baseline.series_uid, "pacs", others, None)]
        assert loaded.earlier_retrieved[0].ct_files == len(patient.baseline.files)
        tracked = read_output(done.step_outputs, TrackOutput)
        assert tracked is not None
        by_id = {r.tracking_id: r for r in tracked.lesions}
        assert sorted(by_id) == sorted(drawn)
        assert all(r.status == "present" for r in tracked.lesions)
        for other in others:  # propagated from the baseline T0, not from T1
            assert any(patient.baseline.series_uid in n for n in by_id[other].notes), by_id[other].notes
        html = templates.env.get_template("_prior_annotation.html").render(job=done)  # the job page says it
        assert f"Study {patient.baseline.study_uid}" in html
        assert "retrieved from pacs for " + ", ".join(others) in html
    finally:
        site.stop()


def test_a_failed_retrieval_leaves_the_lesions_not_assessed_with_the_reason(tmp_path: Path) -> None:
    """Unit level: an earlier study whose CT is not held and whose retrieval fails — the lesions its annotation alone
    names are "not assessed" with the failure as reason, and the retrieval is recorded with the error."""
    site = Site(tmp_path / "site", start_orthanc=False)
    try:
        sf = site.node.sf
        patient, drawn, target, lines, _arrow = _patient(tmp_path)
        assert ingest_file(site.node.scp.ingestor, lines).ok  # T0's annotation is here, its CT is not
        head = pydicom.dcmread(patient.baseline.files[0], stop_before_pixels=True)
        with session_scope(sf) as s:  # the CT series row prior matching creates ahead of a retrieval
            pt = get_or_create_patient(s, str(head.PatientID), None)
            st = get_or_create_study(s, pt, str(head.StudyInstanceUID), study_date=str(head.StudyDate))
            get_or_create_series(s, st, patient.baseline.series_uid, modality="CT")
            s.flush()
            pk = pt.id
            assert s.scalar(select(Series).where(Series.series_instance_uid == patient.baseline.series_uid))
        asked: list[PriorTimepoint] = []

        def refuse(tp: PriorTimepoint) -> PriorTimepoint:
            asked.append(tp)
            raise ConnectionRefusedError("association rejected by the PACS")

        warnings: list[str] = []
        found = earlier_sources(
            sf,
            pk,
            [],
            "99999999999999",
            warnings,
            prior_marks={normalise_label(target)},
            pacs=PacsAccess(refuse, {patient.baseline.series_uid: "pacs"}),
        )
        others = sorted(set(drawn) - {target})
        assert [tp.ct_series_uid for tp in asked] == [patient.baseline.series_uid]  # asked once, for T0 only
        assert found.sources == []
        assert sorted(g.identity.tracking_id for g in found.unassessed) == others
        assert all(isinstance(g, UnassessedSegment) for g in found.unassessed)
        assert all("association rejected" in g.reason and "pacs" in g.reason for g in found.unassessed)
        assert [(sorted(r.lesions), r.source) for r in found.retrieved] == [(others, "pacs")]
        assert found.retrieved[0].error is not None
        # nothing to look for (every lesion the earlier annotation names is the prior's): nothing is retrieved
        asked.clear()
        nothing = earlier_sources(
            sf,
            pk,
            [],
            "99999999999999",
            [],
            prior_marks={normalise_label(k) for k in drawn},
            pacs=PacsAccess(refuse, {}),
        )
        assert (asked, nothing.sources, nothing.unassessed, nothing.retrieved) == ([], [], [], [])
        names = [i.tracking_id for i in named_lesions(lines, "PR")]
        assert sorted(names) == sorted(drawn)
    finally:
        site.stop()


def test_the_lesions_an_object_names_without_its_ct_are_the_lesions_its_reader_reads(tmp_path: Path) -> None:
    """What decides that a PACS study is needed (names read without its CT) names the lesions as reading it on the
    CT does: a SEG's segments, a GSPS's labelled lines, an RT structure set's ROIs (Tracking UID and ID alike)."""
    patient, _drawn, _target, lines, _arrow = _patient(tmp_path)
    ct = read_series(patient.baseline.files)
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.baseline.files]
    prompts, _ = read_seg_prompts_and_gaps(patient.seg_file, ct)
    mask = prompts[0].mask
    assert mask is not None
    centre = ct.index_to_patient(np.argwhere(np.asarray(mask.array) > 0).mean(0)[::-1])  # a lesion: in the body
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = np.stack([centre[0] + 8 * np.cos(t), centre[1] + 8 * np.sin(t), np.full_like(t, centre[2])], -1)
    rs = write_rtstruct(heads, [("liver L9", [ring])], tmp_path / "rs" / "rs.dcm")
    cases = [
        (patient.seg_file, "SEG", [p.identity for p in prompts]),
        (lines, "PR", [p.identity for p in read_gsps_prompts(lines, ct).prompts]),
        (rs, "RTSTRUCT", [p.identity for p in read_rtstruct_prompts(rs, ct).prompts]),
    ]
    for path, modality, read in cases:
        named = named_lesions(path, modality)
        assert read, modality
        assert sorted((i.tracking_uid, i.tracking_id) for i in named) == sorted(
            (i.tracking_uid, i.tracking_id) for i in read
        ), modality
