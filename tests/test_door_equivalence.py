"""One analysis behind every door (issue 30): the same patient through ``lesiontrack track`` (folders) and through the
running service (C-STORE to its SCP) gives the same lesions, statuses, review flags, new-lesion candidates, RECIST,
SEG segments and SR content — UIDs, dates and times aside.

A phantom patient (baseline + radiologist's SEG, two follow-ups on the baseline's position so registration 'none'
keeps it fast) with a lung nodule that appears at the second follow-up; ``track`` must report it as a candidate.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from lesiontrack.db.models import JobState
from lesiontrack.db.session import make_engine, make_session_factory
from lesiontrack.pipeline.jobs.contract import JobResults, job_results
from lesiontrack.pipeline.jobs.store import JobStore
from tests.support.segsr import content_items
from tests.support.still_patient import still_patient

ENGINES = {"registration": "none", "working_spacing_mm": 3.0}


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lesiontrack.cli import app
    from lesiontrack.demo import demo_settings, send_files, wait_for_job
    from lesiontrack.service import LesionTrackService

    tmp = tmp_path_factory.mktemp("doors")
    patient = still_patient(tmp / "patient", new_lesions={2: [("lung", 12.0, 30.0)]})
    followups = [fu.series_uid for fu in patient.followups]
    # the service door: DICOM in over C-STORE, one series after the other as a PACS routes them
    settings = demo_settings(tmp / "serve", http=False, engines=ENGINES)
    service = LesionTrackService(settings).start()
    try:
        send_files(settings, [*patient.baseline.files, patient.seg_file])
        wait_for_job(service.job_store, patient.baseline.series_uid, 300)
        for fu in patient.followups:
            send_files(settings, fu.files)
            wait_for_job(service.job_store, fu.series_uid, 600)
        serve = {uid: service.job_store.latest_for_series(uid) for uid in followups}
    finally:
        service.stop()
    # the CLI door: the same files as folders, the same settings, its embedded store kept to read the job records
    folders = []
    for name, files in [
        ("baseline", [*patient.baseline.files, patient.seg_file]),
        *((f"fu{i}", fu.files) for i, fu in enumerate(patient.followups, start=1)),
    ]:
        folders.append(tmp / "folders" / name)
        folders[-1].mkdir(parents=True)
        for f in files:
            shutil.copy(f, folders[-1] / f.name)
    config = tmp / "track.toml"
    config.write_text('[engines]\nregistration = "none"\nworking_spacing_mm = 3.0\n')
    out, store = tmp / "out", tmp / "track-store"
    args = ["--config", str(config), "track", "--baseline", str(folders[0])]
    for f in reversed(folders[1:]):  # any order: sorted by study date
        args += ["--followup", str(f)]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--store", str(store)])
    assert res.exit_code == 0, res.output
    sf = make_session_factory(make_engine(f"sqlite:///{(store / 'lesiontrack.sqlite3').resolve()}"))
    track = {uid: JobStore(sf).latest_for_series(uid) for uid in followups}
    return {
        "patient": patient,
        "serve": serve,
        "track": track,
        "summary": json.loads((out / "tracking.json").read_text()),
        "output": res.output,
        "out": out,
    }


def _results(job: Any) -> JobResults:
    assert job is not None, job and job.error
    assert job.state is JobState.DONE, job and job.error
    return job_results(job.step_outputs)


def _analysis(r: JobResults) -> dict[str, Any]:
    """What a job concluded, UIDs of its own objects aside (a candidate's UID is derived from the job's id)."""
    assert r.track is not None
    assert r.detect is not None
    assert r.measure is not None
    return {
        "lesions": sorted(
            (les.tracking_uid, les.tracking_id, les.status, les.review, les.confidence, tuple(les.review_reasons))
            for les in r.track.lesions
        ),
        "search": (r.detect.ran, r.detect.detector, r.detect.note),
        "candidates": sorted(c.model_dump(exclude={"tracking_uid"}).items().__repr__() for c in r.detect.candidates),
        "measurements": sorted(json.dumps(m.model_dump(mode="json"), sort_keys=True) for m in r.measure.lesions),
        "recist": r.measure.recist.model_dump(),
    }


def _segments(path: str, candidates: set[str]) -> tuple[list[tuple[Any, ...]], np.ndarray]:
    ds = pydicom.dcmread(path)
    segs = [
        (
            int(s.SegmentNumber),
            str(s.SegmentLabel),
            str(s.get("TrackingID", "")),
            None if str(s.get("TrackingUID", "")) in candidates else str(s.get("TrackingUID", "")),
            str(s.SegmentAlgorithmType),
        )
        for s in ds.SegmentSequence
    ]
    return segs, ds.pixel_array


_NOT_CONTENT = {"UIDREF", "DATE", "TIME", "DATETIME"}


def _sr_content(path: str) -> list[tuple[Any, ...]]:
    """The SR's content tree as (value type, concept, value), UIDs, dates, times and referenced instances aside."""
    out = []
    for item in content_items(pydicom.dcmread(path)):
        vt = str(item.get("ValueType", ""))
        concept = item.ConceptNameCodeSequence[0].CodeMeaning if item.get("ConceptNameCodeSequence") else ""
        if vt in _NOT_CONTENT:
            out.append((vt, concept))
            continue
        value: Any = None
        if vt == "TEXT":
            value = str(item.TextValue)
        elif vt == "CODE":
            value = str(item.ConceptCodeSequence[0].CodeValue)
        elif vt == "NUM":
            mv = item.get("MeasuredValueSequence")
            value = round(float(mv[0].NumericValue), 3) if mv else None
        elif vt in ("SCOORD3D", "SCOORD"):
            value = [round(float(v), 2) for v in item.GraphicData]
        out.append((vt, concept, value))
    return out


def test_both_doors_reach_the_same_conclusions(doors: dict[str, Any]) -> None:
    for uid, serve_job in doors["serve"].items():
        serve, track = _results(serve_job), _results(doors["track"][uid])
        assert _analysis(track) == _analysis(serve), uid
        assert serve.match is not None
        assert track.match is not None
        assert track.match.prior.annotation.sop_instance_uid == serve.match.prior.annotation.sop_instance_uid


def test_both_doors_write_the_same_seg_and_sr(doors: dict[str, Any]) -> None:
    for uid, serve_job in doors["serve"].items():
        serve, track = _results(serve_job), _results(doors["track"][uid])
        assert serve.written is not None
        assert track.written is not None
        assert serve.written.seg
        assert serve.written.sr
        assert serve.written.viewer_sr
        assert track.written.seg
        assert track.written.sr
        assert track.written.viewer_sr
        candidates = {c.tracking_uid for r in (serve, track) if r.detect is not None for c in r.detect.candidates}
        segs_s, px_s = _segments(serve.written.seg, candidates)
        segs_t, px_t = _segments(track.written.seg, candidates)
        assert segs_t == segs_s, uid
        assert np.array_equal(px_t, px_s), uid
        assert _sr_content(track.written.sr) == _sr_content(serve.written.sr), uid
        assert _sr_content(track.written.viewer_sr) == _sr_content(serve.written.viewer_sr), uid


def test_track_reports_the_new_lesion_as_a_candidate(doors: dict[str, Any]) -> None:
    patient, summary = doors["patient"], doors["summary"]
    truth = patient.truth["new_lesions"][0]["centre_mm"]
    first, second = summary["timepoints"][1], summary["timepoints"][2]
    assert first["new_lesion_search"]["ran"]
    assert second["new_lesion_search"]["ran"]
    near = [c for c in second["candidates"] if np.linalg.norm(np.subtract(c["centre_mm"], truth)) < 5.0]
    # a candidate, not a tracked lesion: labelled as such (issue 29: "Candidate 1 (lung)")
    assert near, second["candidates"]
    assert all(c["tracking_id"].startswith("Candidate ") for c in near), second["candidates"]
    assert not any(np.linalg.norm(np.subtract(c["centre_mm"], truth)) < 5.0 for c in first["candidates"])
    seg = pydicom.dcmread(doors["out"] / second["dicom"][0], stop_before_pixels=True)
    assert near[0]["tracking_uid"] in {str(s.TrackingUID) for s in seg.SegmentSequence}
    # the closing table says so too: the candidate row of the follow-up it appeared at
    assert near[0]["tracking_id"] in doors["output"], doors["output"]
    assert "candidate, unconfirmed" in doors["output"], doors["output"]
