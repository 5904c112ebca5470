"""Skipped series are visible and recoverable: ``/api/series?state=skipped`` and the dashboard list them with their
reason; an operator's "analyse anyway" queues a job and the override survives a later completion; a read key may
not; ``routing re-evaluate`` applies changed rules (priors and our own results untouched); the metric counts skips
by reason code. Real SQLite database, real job store, the service's JobControl."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from lesiontrack.config.settings import RoutingSettings, Settings
from lesiontrack.db.models import AnalysisJob, RoutingDecision, Series, SeriesState
from lesiontrack.db.repository import get_or_create_patient, get_or_create_series, get_or_create_study
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.dicom_node.inbound.completion import complete_series
from lesiontrack.dicom_node.inbound.skipped import reevaluate

READ, OPERATOR = "read-key-0123456789", "operator-key-9876543210"


def add_series(sf: Any, description: str, body_part: str = "CHEST", n: int = 40, **kw: Any) -> str:
    uid = generate_uid()
    with session_scope(sf) as s:
        p = get_or_create_patient(s, "P-SKIP", None)
        st = get_or_create_study(s, p, "1.2.826.0.1.3680043.8.498.1", study_date="20260101")
        se = get_or_create_series(
            s, st, uid, modality="CT", series_description=description, body_part=body_part, series_number=1
        )
        se.instance_count = n
        for k, v in kw.items():
            setattr(se, k, v)
    return uid


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    from fastapi.testclient import TestClient

    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.service import JobControl
    from lesiontrack.web import create_app

    url = f"sqlite:///{tmp_path / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    settings = Settings(
        data_dir=tmp_path,
        http={
            "api_keys": [
                {"name": "viewer", "key": READ, "role": "read"},
                {"name": "ops", "key": OPERATOR, "role": "operator"},
            ]
        },
        routing={"body_parts": ["ABDOMEN"]},
    )
    store = JobStore(sf)
    control = JobControl(store, lambda _id: None, settings=settings, session_factory=sf)
    with TestClient(create_app(settings, sf, control)) as client:
        yield client, sf, settings


def test_skipped_series_listed_analysed_anyway_and_override_kept(env: Any) -> None:
    client, sf, settings = env
    chest = add_series(sf, "Thorax 3mm IMR1")
    own = add_series(sf, "LesionTrack SEG", created_by_us=True)
    for uid in (chest, own):
        complete_series(sf, settings.routing, uid)
    r = client.get("/api/series?state=skipped", headers={"X-API-Key": READ})
    assert r.status_code == 200
    items = {s["series_instance_uid"]: s for s in r.json()["items"]}
    assert set(items) == {chest}  # our own SEG/SR are not listed unless asked
    assert items[chest]["routing_reason"] == "body part CHEST not in ['ABDOMEN']"
    r = client.get("/api/series?state=skipped&include_own=true", headers={"X-API-Key": READ})
    assert {s["series_instance_uid"] for s in r.json()["items"]} == {chest, own}
    assert client.get("/api/series?state=bogus", headers={"X-API-Key": READ}).status_code == 422

    metrics = client.get("/metrics", headers={"X-API-Key": READ}).text
    assert 'lesiontrack_series_skipped_total{reason="body_part"} 1.0' in metrics

    # dashboard: read role sees the list and reason, no button
    client.post("/login", data={"key": READ, "next": "/"})
    page = client.get("/series/skipped").text
    assert chest in page
    assert "body part CHEST" in page
    assert "Analyse anyway</button>" not in page
    assert client.post(f"/api/series/{chest}/analyse", headers={"X-API-Key": READ}).status_code == 403

    client.post("/login", data={"key": OPERATOR, "next": "/"})
    page = client.get("/series/skipped").text
    assert "Analyse anyway</button>" in page
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    r = client.post(f"/series/{chest}/analyse", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert "queued" in r.headers["location"]
    with session_scope(sf) as s:
        se = s.scalar(select(Series).where(Series.series_instance_uid == chest))
        assert se.routing_decision == RoutingDecision.ANALYSE
        assert se.routing_reason.startswith("analysis requested by operator api:ops")
        assert s.scalar(select(AnalysisJob).where(AnalysisJob.followup_series_uid == chest)) is not None
    assert client.post(f"/api/series/{chest}/analyse", headers={"X-API-Key": OPERATOR}).status_code == 409
    assert client.post(f"/api/series/{own}/analyse", headers={"X-API-Key": OPERATOR}).status_code == 409
    assert client.post("/api/series/1.2.3/analyse", headers={"X-API-Key": OPERATOR}).status_code == 404
    # late instances re-open the series; its next completion keeps the operator's decision
    with session_scope(sf) as s:
        s.scalar(select(Series).where(Series.series_instance_uid == chest)).state = SeriesState.RECEIVING
    assert complete_series(sf, settings.routing, chest).decision == RoutingDecision.ANALYSE


def test_completion_trigger_endpoint_is_idempotent(env: Any) -> None:
    client, sf, _ = env
    uid = add_series(sf, "Abdomen 5mm iDose 4", body_part="ABDOMEN")
    h = {"X-API-Key": OPERATOR}
    r = client.post(f"/api/series/{uid}/complete", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["completed"]
    assert body["routing_decision"] == "analyse"
    assert body["job_id"] is None
    again = client.post(f"/api/series/{uid}/complete", headers=h).json()
    assert again["completed"] is False
    assert again["routing_decision"] == "analyse"
    # a series none of whose instances is indexed yet is remembered, not refused (issue 29)
    unknown = client.post("/api/series/1.2.3/complete?expected_instances=5", headers=h)
    assert unknown.status_code == 202, unknown.text
    assert unknown.json()["pending"] is True
    assert unknown.json()["expected_instances"] == 5
    assert client.post(f"/api/series/{uid}/complete", headers={"X-API-Key": READ}).status_code == 403


def test_reevaluate_after_a_rule_change(env: Any) -> None:
    _, sf, settings = env
    chest = add_series(sf, "Thorax 3mm IMR1")
    loc = add_series(sf, "Topogram 0.6 T20s", body_part="ABDOMEN")
    prior = add_series(sf, "Thorax", routing_reason="retrieved as prior from pacs")
    for uid in (chest, loc, prior):
        complete_series(sf, settings.routing, uid)
    routed: list[str] = []
    dry = reevaluate(sf, RoutingSettings(), routed.append, dry_run=True)
    assert {r.series_uid: r.now_routed for r in dry} == {chest: True, loc: False}
    assert routed == []
    out = reevaluate(sf, RoutingSettings(), routed.append)
    assert routed == [chest]
    assert {r.series_uid for r in out} == {chest, loc}
    with session_scope(sf) as s:
        decisions = {se.series_instance_uid: se.routing_decision for se in s.scalars(select(Series))}
    assert decisions[chest] == RoutingDecision.ANALYSE
    assert decisions[loc] == decisions[prior] == RoutingDecision.SKIP
