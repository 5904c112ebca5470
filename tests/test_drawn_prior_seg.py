"""Issue 31 item 2: the lesions derived from a radiologist's drawing on the prior are stored as a DICOM-SEG on the PRIOR
study ("derived from the radiologist's measurement", each segment with its confidence) and sent with the results;
issued once per prior (the next follow-up does not re-issue it), superseded when re-derived, and a person's
correction of it verifies the prior timepoint (issue 16's take-in path), later follow-ups re-analysed from it.

The real pipeline runs in-process on a phantom patient whose baseline carries only a GSPS with one long-axis line
per lesion (registration 'none' keeps it fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.db.models import JobState, LesionObservation, TimepointVerification
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.pipeline.jobs.contract import job_results
from lesiontrack.pipeline.jobs.derived_prior_seg import CONTENT_DESCRIPTION, SERIES_DESCRIPTION
from tests.support.correction import write_correction
from tests.support.still_patient import still_patient


def _run(service: Any, series_uid: str) -> Any:
    job = service.store.create(series_uid)
    assert service.run(job) is JobState.DONE, service.store.get(job).error
    return job_results(service.store.get(job).step_outputs).written


def _gsps(patient: Any, out: Path, kind: str, seed: int) -> Path:
    from bench.drawn_lesions import drawings
    from lesiontrack.models.imaging.dicom_read import read_series
    from lesiontrack.pipeline.dicom.seg.reader import read_seg_prompts_and_gaps
    from lesiontrack.synthetic.annotations import Mark, write_gsps

    ct = read_series(patient.baseline.files)
    prompts, _ = read_seg_prompts_and_gaps(patient.seg_file, ct)
    rng = np.random.default_rng(seed)
    marks = [Mark(drawings(p.mask, rng)[kind], p.identity.tracking_id) for p in prompts if p.mask is not None]
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.baseline.files]
    return write_gsps(heads, marks, out)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lesiontrack.demo import demo_settings
    from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_file
    from lesiontrack.dicom_node.inbound.scp import storage_root
    from lesiontrack.dicom_node.inbound.storage import InstanceStore
    from lesiontrack.pipeline.jobs.steps import build_pipeline
    from lesiontrack.service import build_analysis_service, build_ports

    tmp = tmp_path_factory.mktemp("drawn-prior-seg")
    settings = demo_settings(tmp / "data", http=False, engines={"registration": "none"})
    settings.detection.new_lesions = False
    upgrade(settings.effective_database_url)
    sf = make_session_factory(make_engine(settings.effective_database_url))
    patient = still_patient(tmp / "patient")
    lines = _gsps(patient, tmp / "pr" / "lines.dcm", "line", 1)
    store = InstanceStore(storage_root(settings), fsync=False)
    ingestor = Ingestor(store, sf)
    for f in [*patient.baseline.files, lines, *patient.followups[0].files, *patient.followups[1].files]:
        assert ingest_file(ingestor, f).ok
    service = build_analysis_service(settings, sf, build_pipeline, ports=build_ports(settings, sf))
    fu1, fu2 = (fu.series_uid for fu in patient.followups)
    first = _run(service, fu1)
    second = _run(service, fu2)
    again = _run(service, fu1)
    return {
        "tmp": tmp,
        "sf": sf,
        "settings": settings,
        "service": service,
        "patient": patient,
        "ingestor": ingestor,
        "first": first,
        "second": second,
        "again": again,
    }


def test_the_drawn_prior_lesions_go_to_the_pacs_as_a_seg_on_the_prior_study(site: dict[str, Any]) -> None:
    first, patient = site["first"], site["patient"]
    assert first.prior_seg
    assert not first.prior_seg_reused
    assert first.prior_seg in first.files  # sent with the follow-up's results, through the same delivery
    ds = pydicom.dcmread(first.prior_seg, stop_before_pixels=True)
    base = pydicom.dcmread(patient.baseline.files[0], stop_before_pixels=True)
    assert ds.Modality == "SEG"
    assert ds.StudyInstanceUID == base.StudyInstanceUID  # the PRIOR study, not the follow-up's
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == base.SeriesInstanceUID
    assert str(ds.SeriesDescription) == f"{SERIES_DESCRIPTION} rev1"
    assert str(ds.ContentDescription).startswith(CONTENT_DESCRIPTION)
    assert first.prior_seg_series_uid == base.SeriesInstanceUID
    segments = list(ds.SegmentSequence)
    assert len(segments) == 3
    for item in segments:  # each segment: what it was derived from and its confidence
        assert CONTENT_DESCRIPTION in str(item.SegmentDescription)
        assert "line" in str(item.SegmentDescription)
        assert "confidence 0.65" in str(item.SegmentDescription)
        assert item.TrackingUID


def test_the_next_follow_up_and_a_rerun_reuse_it(site: dict[str, Any]) -> None:
    first, second, again = site["first"], site["second"], site["again"]
    for later in (second, again):
        assert later.prior_seg_reused
        assert later.prior_seg_sop_instance_uid == first.prior_seg_sop_instance_uid
        assert later.prior_seg == first.prior_seg
        assert later.prior_seg not in later.files  # not issued, not sent again


def test_a_re_derived_prior_issues_a_new_seg_that_supersedes_the_old(site: dict[str, Any]) -> None:
    """A later annotation of the same lesions on the prior (ellipses) derives other masks: a new SEG, rev2, naming
    the one it replaces; the old file is kept."""
    from lesiontrack.dicom_node.inbound.ingest import ingest_file

    patient, first = site["patient"], site["first"]
    ellipses = _gsps(patient, site["tmp"] / "pr" / "ellipses.dcm", "ellipse", 2)
    ds = pydicom.dcmread(ellipses)
    ds.ContentDate, ds.ContentTime = "29991231", "235959"  # drawn after the lines: the newer annotation wins
    ds.save_as(ellipses, enforce_file_format=True)
    assert ingest_file(site["ingestor"], ellipses).ok
    redo = _run(site["service"], patient.followups[1].series_uid)
    assert redo.prior_seg
    assert not redo.prior_seg_reused
    assert redo.prior_seg_supersedes == first.prior_seg_sop_instance_uid
    assert redo.prior_seg_revision == first.prior_seg_revision + 1
    new = pydicom.dcmread(redo.prior_seg, stop_before_pixels=True)
    assert str(new.ContentDescription) == f"{CONTENT_DESCRIPTION} (rev2)"
    assert str(new.SeriesDescription).endswith(f"rev{redo.prior_seg_revision}")
    assert Path(first.prior_seg).is_file()  # never overwritten
    site["latest_prior_seg"] = redo.prior_seg


def test_a_correction_of_it_verifies_the_prior_and_later_follow_ups_follow_it(site: dict[str, Any]) -> None:
    from lesiontrack.dicom_node.inbound.ingest import ingest_file
    from lesiontrack.pipeline.jobs.verification import take_in_series

    patient, sf = site["patient"], site["sf"]
    ours = site.get("latest_prior_seg") or site["first"].prior_seg
    base = pydicom.dcmread(patient.baseline.files[0], stop_before_pixels=True)
    from lesiontrack.models.imaging.dicom_read import read_series

    ct = read_series(patient.baseline.files)
    centre = ct.index_to_patient(np.asarray([[s // 2 for s in reversed(ct.shape)]], float))[0]
    corr = write_correction(ours, patient.baseline.files, site["tmp"] / "correction", add_centre_mm=centre)
    assert ingest_file(site["ingestor"], corr.path).ok
    jobs = take_in_series(sf, site["settings"].verification, corr.series_uid)
    with session_scope(sf) as s:
        v = s.scalar(
            select(TimepointVerification).where(TimepointVerification.source_sop_instance_uid == corr.sop_instance_uid)
        )
        assert v is not None
        assert v.series_instance_uid == base.SeriesInstanceUID
        assert sorted(v.reanalysis_jobs or []) == sorted(jobs)
    assert len(jobs) == 2  # both analysed follow-ups, re-analysed from the corrected prior
    for job in jobs:
        assert site["service"].run(job) is JobState.DONE, site["service"].store.get(job).error
        res = job_results(site["service"].store.get(job).step_outputs)
        assert res.match is not None
        assert res.written is not None
        assert res.written.prior_seg is None  # the prior is now a person's SEG: nothing derived to re-issue
        sr = pydicom.dcmread(res.written.sr, stop_before_pixels=True)
        assert corr.sop_instance_uid in str(sr)  # the corrected SEG is the evidence the SR names


def _nums(ds: Any, code: str) -> list[float]:
    out = []
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "NUM" and name and name[0].CodeValue == code:
            out.append(float(item.MeasuredValueSequence[0].NumericValue))
        out += _nums(item, code)
    return out


def test_the_sr_reports_the_radiologists_diameters_beside_ours(site: dict[str, Any]) -> None:
    """Each lesion's group: the long axis the radiologist drew on the prior and ours of the lesion derived from it
    minus theirs (mm) — the ours being the prior's measurement the job recorded."""
    first = site["first"]
    sr = pydicom.dcmread(first.sr)
    theirs, diff = _nums(sr, "LT067"), _nums(sr, "LT069")
    assert len(theirs) == len(diff) == 3  # one per lesion, each drawn as a single long-axis line
    assert all(5.0 < t < 60.0 for t in theirs)
    assert _nums(sr, "LT068") == []  # a single line: no short axis drawn, none reported
    base = pydicom.dcmread(site["patient"].baseline.files[0], stop_before_pixels=True)
    with session_scope(site["sf"]) as s:
        ours = [
            o.long_axis_mm
            for o in s.scalars(
                select(LesionObservation).where(LesionObservation.series_instance_uid == base.SeriesInstanceUID)
            )
            if o.long_axis_mm
        ]
    for t, d in zip(theirs, diff, strict=True):  # ours minus theirs: ours is the derived lesion's long axis
        assert any(abs(t + d - o) < 0.11 for o in ours), (t, d, ours)
    assert all(abs(d) < 10.0 for d in diff)  # the derived lesion reproduces the drawn diameter within a few mm


def test_drawn_diameters_node_line_is_the_short_axis_and_differences_are_ours_minus_theirs() -> None:
    from types import SimpleNamespace

    from lesiontrack.pipeline.dicom.sr.writer import _drawn_measurements
    from lesiontrack.pipeline.science.drawn_priors import drawn_diameters

    node = SimpleNamespace(is_node=True, long_axis_mm=18.0, short_axis_mm=11.0)
    mass = SimpleNamespace(is_node=False, long_axis_mm=18.0, short_axis_mm=11.0)
    line = SimpleNamespace(meta={"drawn_diameters_mm": [12.5, None]})
    pair = SimpleNamespace(meta={"drawn_diameters_mm": [20.0, 10.0]})
    arrow = SimpleNamespace(meta={"prompt_origin": "arrow"})
    d = drawn_diameters(line, node)
    assert d is not None
    assert d.radiologist_long_mm is None
    assert d.radiologist_short_mm == 12.5
    vals = [(m.name.value, float(m.value)) for m in _drawn_measurements(d)]
    assert vals == [("LT068", 12.5), ("LT070", -1.5)]
    d = drawn_diameters(pair, mass)
    assert d is not None
    vals = [(m.name.value, float(m.value)) for m in _drawn_measurements(d)]
    assert vals == [("LT067", 20.0), ("LT069", -2.0), ("LT068", 10.0), ("LT070", 1.0)]
    assert drawn_diameters(arrow, mass) is None  # nothing measured: nothing reported beside ours
    assert drawn_diameters(pair, None) is None


def test_the_prior_seg_and_the_sr_with_the_drawn_diameters_validate(site: dict[str, Any]) -> None:
    from lesiontrack.pipeline.dicom.validate import validate_seg, validate_sr

    first = site["first"]
    for rep in [*validate_seg(first.prior_seg), *validate_sr(first.sr)]:
        assert rep.ok, rep.summary()


def test_follow_ups_analysed_at_once_issue_the_same_instance(site: dict[str, Any]) -> None:
    """Two jobs of one prior that run at the same time (neither sees the other's SEG yet) write the same SOP
    Instance UID, so the PACS and our database keep the SEG once; another derivation gets other UIDs."""
    from lesiontrack.pipeline.dicom.seg.reader import read_seg_prompts_and_gaps
    from lesiontrack.pipeline.jobs.derived_prior_seg import write_drawn_prior_seg
    from lesiontrack.pipeline.science.lesions import LesionStatus, TrackedLesion

    patient = site["patient"]
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.baseline.files]
    from lesiontrack.models.imaging.dicom_read import read_series

    ct = read_series(patient.baseline.files)
    prompts, _ = read_seg_prompts_and_gaps(patient.seg_file, ct)
    lesions = [
        TrackedLesion(p.identity, LesionStatus.PRESENT, p.mask, "adaptive", meta={"prompt_origin": "line"})
        for p in prompts
        if p.mask is not None
    ]
    a = write_drawn_prior_seg(heads, lesions, key="k1").dataset
    b = write_drawn_prior_seg(heads, lesions, key="k1").dataset
    c = write_drawn_prior_seg(heads, lesions, key="k2").dataset
    d = write_drawn_prior_seg(heads, lesions, key="k1", revision=2, supersedes=str(a.SOPInstanceUID)).dataset
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert len({a.SOPInstanceUID, c.SOPInstanceUID, d.SOPInstanceUID}) == 3


def test_every_local_code_value_means_one_thing() -> None:
    """A code value of our scheme names one concept: the prior-annotation answers once re-used LT058 ("Maximum 3D
    diameter") and LT059 (the "Prior annotation" concept itself)."""
    from lesiontrack.pipeline.dicom.sr.writer import LT, PRIOR_ANNOTATION_CODES

    meaning: dict[str, str] = {}
    codes = [v for k, v in vars(LT).items() if not k.startswith("_")] + list(PRIOR_ANNOTATION_CODES.values())
    for code in codes:
        assert meaning.setdefault(code.value, code.meaning) == code.meaning, (code.value, meaning[code.value])
