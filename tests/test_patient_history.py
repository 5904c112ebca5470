"""One patient history: with slices thicker than 5 mm (RECIST's measurability rule depends on it) the SR a
radiologist reads, the API's timeline and the dashboard page report the same target lesions and responses, and
the baseline's target choice is stored once and kept by later jobs.

The real pipeline steps run in-process on a small phantom patient ingested into the local store (the local
database is the prior source; no PACS needed); registration engine 'none' keeps it fast.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select

from lesiontrack.db.models import JobState, Lesion, Patient, Series
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.pipeline.jobs.contract import job_results

API_KEY = {"X-API-Key": "demo"}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lesiontrack.demo import demo_settings
    from lesiontrack.demo_data import FollowUps, make_patient
    from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_file
    from lesiontrack.dicom_node.inbound.scp import storage_root
    from lesiontrack.dicom_node.inbound.storage import InstanceStore
    from lesiontrack.pipeline.jobs.steps import build_pipeline
    from lesiontrack.service import build_analysis_service, build_ports

    tmp = tmp_path_factory.mktemp("history")
    settings = demo_settings(tmp / "data", http=False, engines={"registration": "none"})
    url = settings.effective_database_url
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    patient = make_patient(
        tmp / "patient",
        seed=5,
        shape=(20, 112, 112),
        spacing=(2.5, 2.5, 9.0),
        n_lesions=5,
        n_followups=2,
        follow_ups=FollowUps.STILL,  # registration "none" below: the follow-ups lie on the baseline position
    )
    ingestor = Ingestor(InstanceStore(storage_root(settings), fsync=False), sf)
    for f in [*patient.baseline.files, patient.seg_file, *(f for fu in patient.followups for f in fu.files)]:
        assert ingest_file(ingestor, f).ok
    ingestor.close()
    service = build_analysis_service(settings, sf, build_pipeline, ports=build_ports(settings, sf))
    views = []
    for fu in patient.followups:
        job = service.store.create(fu.series_uid)
        assert service.run(job) is JobState.DONE, service.store.get(job).error
        views.append(service.store.get(job))
    return {"settings": settings, "sf": sf, "patient": patient, "views": views}


def _sr_report(path: str) -> dict[str, Any]:
    """Targets (by Tracking UID) and the responses the SR states."""
    from lesiontrack.pipeline.dicom.sr.reader import read_sr

    sr = read_sr(path)
    roles = {}
    for g in sr.groups:
        for value in g.qualitative.values():
            if value[2] in ("Target Lesion at Baseline", "Non-Target Lesion at Baseline"):
                roles[g.tracking_uid] = "target" if value[2].startswith("Target") else "non-target"
    return {"roles": roles, "response": sr.response}


def _meaning(item: Any) -> str | None:
    return item["meaning"] if isinstance(item, dict) else None


def test_thick_slices_sr_api_and_dashboard_agree(analysed: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from lesiontrack.web import create_app

    sf, views = analysed["sf"], analysed["views"]
    with session_scope(sf) as s:
        patient_pk = s.scalar(select(Patient.id))
        thickness = {u: t for u, t in s.execute(select(Series.series_instance_uid, Series.slice_thickness_mm))}
    patient = analysed["patient"]
    assert thickness[patient.baseline.series_uid] == pytest.approx(9.0), "slice thickness kept with the timepoint"

    client = TestClient(create_app(analysed["settings"], sf))
    tl = client.get(f"/api/patients/{patient_pk}/timeline", headers=API_KEY).json()
    html = client.get(f"/patients/{patient_pk}", headers=API_KEY).text
    api_roles = {row["tracking_uid"]: row["role"] for row in tl["lesions"]}

    for index, view in enumerate(views, start=1):
        results = job_results(view.step_outputs)
        assert results.written is not None
        assert results.written.sr
        assert results.measure is not None
        sr = _sr_report(results.written.sr)
        tp = tl["timepoints"][index]
        assert tp["series_uid"] == view.followup_series_uid
        # same targets in SR, API and the measure step's record
        sr_targets = {u for u, r in sr["roles"].items() if r == "target"}
        assert sr_targets == {u for u, r in api_roles.items() if r == "target"} == set(results.measure.recist.targets)
        assert {u: r for u, r in sr["roles"].items()} == {u: api_roles[u] for u in sr["roles"]}
        # same responses
        assert results.measure.recist.overall_response == tp["overall_response"]
        assert results.measure.recist.target_response == tp["target_response"]
        assert results.measure.recist.sum_of_diameters_mm == pytest.approx(tp["sum_of_diameters_mm"])
        overall_cells = re.findall(r'class="overall-resp" data-tp="(\d+)"><span [^>]*>([^<]*)</span>', html)
        assert dict(overall_cells)[str(index)] == tp["overall_response"]
        target_cells = dict(re.findall(r'class="target-resp" data-tp="(\d+)">([^<]*)</td>', html))
        assert target_cells[str(index)] == tp["target_response"]
    for row in tl["lesions"]:
        assert f"role-{row['role'] or 'none'}" in html


def test_targets_are_chosen_once_at_baseline_with_its_slice_thickness(analysed: dict[str, Any]) -> None:
    from lesiontrack.pipeline.science import recist
    from lesiontrack.pipeline.science.recist import RecistRules
    from lesiontrack.pipeline.views.history import build_timeline

    sf = analysed["sf"]
    with session_scope(sf) as s:
        stored = {les.tracking_uid: les.is_target for les in s.scalars(select(Lesion))}
        patient_pk = s.scalar(select(Patient.id))
        tl = build_timeline(s, patient_pk, RecistRules())
    assert any(stored.values()), "the first job stored the baseline's target choice"
    assert tl.assessment is not None
    baseline = tl.measurements_at(0)
    min_ld = RecistRules().min_long_axis_for(9.0)
    assert min_ld == pytest.approx(18.0), "2 × slice thickness over 5 mm"
    thin = recist.select_targets(
        [recist.RecistLesion.from_measurement(m) for m in baseline.values()], RecistRules(), slice_thickness_mm=None
    )
    assert set(thin.targets) != set(tl.assessment.selection.targets), (
        "this patient is one where the slice-thickness rule changes the targets (so the agreement test means it)"
    )
    for d in tl.assessment.selection.decisions:
        m = baseline[d.tracking_uid]
        if d.role == "target" and not m.is_node:
            assert m.long_axis_mm >= min_ld, "a target is measurable at the baseline's slice thickness"
    # both follow-ups' jobs report the targets stored by the first one
    for view in analysed["views"]:
        measure = job_results(view.step_outputs).measure
        assert measure is not None
        assert set(measure.recist.targets) == {u for u, t in stored.items() if t}
