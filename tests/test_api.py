"""HTTP API and dashboard: authentication and roles, every endpoint's content against the database, error codes,
Prometheus metrics, retry/re-analyse through the real job store, no patient identifiers in URLs or logs."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.config.settings import Settings
from lesiontrack.db.models import AnalysisJob, AuditEvent, JobState, Lesion, LesionObservation, Study
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from tests.support.patient import BuiltPatient, synthetic_patient

READ, OPERATOR = "read-key-0123456789", "operator-key-9876543210"


def _settings(tmp: Path) -> Settings:
    return Settings(
        data_dir=tmp,
        http={
            "api_keys": [
                {"name": "viewer", "key": READ, "role": "read"},
                {"name": "ops", "key": OPERATOR, "role": "operator"},
            ]
        },
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient

    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.web import JobStoreControl, create_app

    tmp = tmp_path_factory.mktemp("api")
    url = f"sqlite:///{tmp / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    built = synthetic_patient(sf, tmp)
    app = create_app(_settings(tmp), sf, JobStoreControl(JobStore(sf)))
    with TestClient(app) as client:
        yield client, sf, built, tmp


def rd(client, url: str, **kw):
    return client.get(url, headers={"X-API-Key": READ}, **kw)


def protected_urls(b: BuiltPatient) -> list[str]:
    tp = b.timepoints[1]
    lesion = next(iter(b.lesion_ids.values()))
    return [
        "/metrics",
        "/api/jobs",
        f"/api/jobs/{tp.job_id}",
        "/api/patients",
        f"/api/patients/{b.patient_pk}",
        f"/api/patients/{b.patient_pk}/studies",
        f"/api/studies/{tp.study_uid}",
        f"/api/studies/{tp.study_uid}/series",
        f"/api/series/{tp.series_uid}",
        f"/api/patients/{b.patient_pk}/lesions",
        f"/api/lesions/{lesion}",
        f"/api/patients/{b.patient_pk}/timeline",
        f"/api/lesions/{lesion}/plot.png",
        f"/api/patients/{b.patient_pk}/export/lesions.csv",
        f"/api/patients/{b.patient_pk}/export/lesions.json",
        f"/api/patients/{b.patient_pk}/export/cdisc/TU.csv",
        f"/api/patients/{b.patient_pk}/export/cdisc.json",
        "/api/audit",
    ]


# -- auth and roles ------------------------------------------------------------------------------------------
def test_health_and_ready_need_no_key(env) -> None:
    client, *_ = env
    assert client.get("/health").json()["status"] == "ok"
    r = client.get("/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"


def test_ready_is_503_on_an_unmigrated_database(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from lesiontrack.web import create_app

    sf = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}"))
    r = TestClient(create_app(_settings(tmp_path), sf)).get("/ready")
    assert r.status_code == 503
    assert "lesiontrack db upgrade" in r.json()["detail"]


def test_every_protected_endpoint_needs_a_key(env) -> None:
    client, _, built, _ = env
    for url in protected_urls(built):
        r = client.get(url)
        assert r.status_code == 401, url
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert client.get(url, headers={"X-API-Key": "wrong"}).status_code == 401, url
        assert client.get(url, headers={"X-API-Key": READ}).status_code == 200, url
        assert client.get(url, headers={"Authorization": f"Bearer {OPERATOR}"}).status_code == 200, url


def test_no_keys_configured_refuses_everything(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from lesiontrack.web import create_app

    url = f"sqlite:///{tmp_path / 'lt.sqlite3'}"
    upgrade(url)
    app = create_app(Settings(data_dir=tmp_path), make_session_factory(make_engine(url)))
    r = TestClient(app).get("/api/jobs", headers={"X-API-Key": ""})
    assert r.status_code == 401
    assert "no API keys configured" in r.json()["detail"]


def test_read_key_cannot_retry_or_reanalyse(env) -> None:
    client, sf, built, _ = env
    tp = built.timepoints[1]
    for url in (f"/api/jobs/{built.failed_job_id}/retry", f"/api/series/{tp.series_uid}/reanalyse"):
        assert client.post(url).status_code == 401
        r = client.post(url, headers={"X-API-Key": READ})
        assert r.status_code == 403
        assert "operator" in r.json()["detail"]
    with session_scope(sf) as s:
        assert s.get(AnalysisJob, built.failed_job_id).superseded_by is None


def test_operator_retries_a_failed_job(env) -> None:
    client, sf, built, _ = env
    with session_scope(sf) as s:
        before = s.scalar(select(AnalysisJob.id).order_by(AnalysisJob.id.desc()))
    r = client.post(f"/api/jobs/{built.failed_job_id}/retry", headers={"X-API-Key": OPERATOR})
    assert r.status_code == 202, r.text
    new_id = r.json()["job_id"]
    assert new_id > before
    with session_scope(sf) as s:
        new = s.get(AnalysisJob, new_id)
        old = s.get(AnalysisJob, built.failed_job_id)
        assert new.state is JobState.QUEUED
        assert new.followup_series_uid == old.followup_series_uid
        assert old.superseded_by == new_id
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "api.job_retry")).all()
        assert ev
        assert ev[-1].actor == "api:ops"
        assert ev[-1].details["new_job_id"] == new_id
    # the superseded job is hidden from the list by default, and listed when asked for
    assert built.failed_job_id not in [j["id"] for j in rd(client, "/api/jobs").json()["items"]]
    every = rd(client, "/api/jobs", params={"include_superseded": "true"}).json()["items"]
    assert built.failed_job_id in [j["id"] for j in every]
    # the queued job cannot be retried (409), unknown jobs are 404
    assert client.post(f"/api/jobs/{new_id}/retry", headers={"X-API-Key": OPERATOR}).status_code == 409
    assert client.post("/api/jobs/999999/retry", headers={"X-API-Key": OPERATOR}).status_code == 404


def test_operator_reanalyses_a_series(env) -> None:
    client, sf, built, _ = env
    uid = built.timepoints[1].series_uid
    r = client.post(f"/api/series/{uid}/reanalyse", headers={"X-API-Key": OPERATOR})
    assert r.status_code == 202, r.text
    with session_scope(sf) as s:
        job = s.get(AnalysisJob, r.json()["job_id"])
        assert job.followup_series_uid == uid
        assert job.state is JobState.QUEUED
    assert client.post("/api/series/1.2.3.404/reanalyse", headers={"X-API-Key": OPERATOR}).status_code == 404


def test_retry_without_job_control_is_503(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from lesiontrack.web import create_app

    url = f"sqlite:///{tmp_path / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    with session_scope(sf) as s:
        s.add(
            AnalysisJob(
                followup_series_uid="1.2.3", state=JobState.FAILED, attempts=1, step_timings={}, step_outputs={}
            )
        )
    r = TestClient(create_app(_settings(tmp_path), sf, None)).post("/api/jobs/1/retry", headers={"X-API-Key": OPERATOR})
    assert r.status_code == 503


# -- content -------------------------------------------------------------------------------------------------
def test_jobs_list_filters_and_detail(env) -> None:
    client, sf, built, _ = env
    body = rd(client, "/api/jobs").json()
    every = rd(client, "/api/jobs", params={"include_superseded": True}).json()
    with session_scope(sf) as s:  # superseded results are hidden unless asked for
        assert body["total"] == s.query(AnalysisJob).filter(AnalysisJob.superseded_by.is_(None)).count()
        assert every["total"] == s.query(AnalysisJob).count()
    ids = [j["id"] for j in body["items"]]
    assert ids == sorted(ids, reverse=True)
    assert sum(every["counts"].values()) == every["total"]
    assert set(body["counts"]) == {st.value for st in JobState}
    for state in {j["state"] for j in body["items"]}:
        some = rd(client, "/api/jobs", params={"state": state}).json()["items"]
        assert some
        assert all(j["state"] == state for j in some)
    by_series = rd(client, "/api/jobs", params={"series_uid": built.timepoints[1].series_uid}).json()["items"]
    assert by_series
    assert all(j["followup_series_uid"] == built.timepoints[1].series_uid for j in by_series)
    assert rd(client, "/api/jobs", params={"limit": 1}).json()["items"].__len__() == 1
    assert rd(client, "/api/jobs", params={"state": "bogus"}).status_code == 422
    assert rd(client, "/api/jobs", params={"limit": 0}).status_code == 422

    job_id = built.timepoints[1].job_id
    d = rd(client, f"/api/jobs/{job_id}").json()
    with session_scope(sf) as s:
        job = s.get(AnalysisJob, job_id)
        assert d["step_timings"] == job.step_timings
        assert [st["name"] for st in d["steps"]] == list(job.step_timings)
        assert d["total_seconds"] == pytest.approx(sum(job.step_timings.values()))
        assert d["step_outputs"] == job.step_outputs
    assert {e["action"] for e in d["events"]} >= {"job.created", "job.state"}
    assert rd(client, "/api/jobs/999999").status_code == 404
    assert rd(client, "/api/jobs/notanumber").status_code == 422


def test_patients_studies_series(env) -> None:
    client, _sf, built, _ = env
    patients = rd(client, "/api/patients").json()
    p = next(x for x in patients if x["id"] == built.patient_pk)
    assert p["study_count"] == len(built.timepoints)
    assert p["lesion_count"] == len(built.lesion_ids)
    assert rd(client, f"/api/patients/{built.patient_pk}").json() == p
    studies = rd(client, f"/api/patients/{built.patient_pk}/studies").json()
    assert [st["study_instance_uid"] for st in studies] == [tp.study_uid for tp in built.timepoints]
    ct = [se for se in studies[1]["series"] if se["modality"] == "CT"]
    assert ct[0]["series_instance_uid"] == built.timepoints[1].series_uid
    assert {se["modality"] for se in studies[1]["series"]} == {"CT", "SEG", "SR"}
    st = rd(client, f"/api/studies/{built.timepoints[1].study_uid}").json()
    assert st == studies[1]
    assert rd(client, f"/api/studies/{built.timepoints[1].study_uid}/series").json() == st["series"]
    se = rd(client, f"/api/series/{built.timepoints[1].series_uid}").json()
    assert se["instance_count"] == len(built.timepoints[1].ct_files)
    assert se["routing_decision"] == "analyse"
    assert built.timepoints[1].job_id in [j["id"] for j in se["jobs"]]
    for url in (
        "/api/patients/424242",
        "/api/patients/424242/studies",
        "/api/studies/1.2.404",
        "/api/studies/1.2.404/series",
        "/api/series/1.2.404",
        "/api/patients/424242/lesions",
        "/api/lesions/424242",
        "/api/patients/424242/timeline",
        "/api/lesions/424242/plot.png",
        "/api/observations/424242/thumbnail.png",
        "/api/patients/424242/export/lesions.csv",
        "/api/instances/1.2.404/file",
        "/api/lesions/by-tracking-uid/1.2.404",
    ):
        r = rd(client, url)
        assert r.status_code == 404, url
        assert "not found" in r.json()["detail"]


def test_lesions_with_all_observations(env) -> None:
    client, sf, built, _ = env
    lesions = rd(client, f"/api/patients/{built.patient_pk}/lesions").json()
    assert {l["tracking_uid"] for l in lesions} == set(built.lesion_ids)
    with session_scope(sf) as s:
        for l in lesions:
            rows = s.scalars(
                select(LesionObservation).where(LesionObservation.lesion_pk == l["id"]).order_by(LesionObservation.id)
            ).all()
            assert [o["id"] for o in l["observations"]] == [o.id for o in rows]
            for o, row in zip(l["observations"], rows, strict=True):
                assert o["volume_mm3"] == row.volume_mm3
                assert o["long_axis_mm"] == row.long_axis_mm
                assert o["status"] == row.status.value
                assert o["seg_sop_instance_uid"] == row.seg_sop_instance_uid
    one = lesions[0]
    assert rd(client, f"/api/lesions/{one['id']}").json() == one
    assert rd(client, f"/api/lesions/by-tracking-uid/{one['tracking_uid']}").json() == one


def test_timeline_matches_measurements_and_recist(env) -> None:
    client, _, built, _ = env
    tl = rd(client, f"/api/patients/{built.patient_pk}/timeline").json()
    assert [tp["series_uid"] for tp in tl["timepoints"]] == [tp.series_uid for tp in built.timepoints]
    for row in tl["lesions"]:
        for tp, cell in zip(built.timepoints, row["cells"], strict=True):
            m = tp.measurements.get(row["tracking_uid"])
            if m is None:
                assert cell is None
                continue
            assert cell["volume_mm3"] == m.volume_mm3
            assert cell["long_axis_mm"] == m.long_axis_mm
            assert cell["status"] == m.status
    assert tl["timepoints"][1]["overall_response"] in {"CR", "PR", "SD", "PD", "NE"}
    assert tl["timepoints"][1]["seg_uids"]
    assert tl["timepoints"][1]["sr_uids"]
    assert tl["best_overall_response"]


def test_images_are_pngs(env) -> None:
    from PIL import Image

    client, sf, _built, _ = env
    with session_scope(sf) as s:
        obs = s.scalars(select(LesionObservation).where(LesionObservation.seg_sop_instance_uid.is_not(None))).first()
        vanished = s.scalars(select(LesionObservation).where(LesionObservation.status == "vanished")).first()
    for url in (
        f"/api/observations/{obs.id}/thumbnail.png",
        f"/api/observations/{vanished.id}/thumbnail.png",
        f"/api/lesions/{obs.lesion_pk}/plot.png",
    ):
        r = rd(client, url)
        assert r.status_code == 200, url
        assert r.headers["content-type"] == "image/png", url
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "PNG"
        assert img.size[0] >= 160
    thumb = Image.open(io.BytesIO(rd(client, f"/api/observations/{obs.id}/thumbnail.png").content)).convert("RGB")
    import numpy as np

    px = np.asarray(thumb).reshape(-1, 3).astype(int)
    assert ((px[:, 0] > 200) & (px[:, 1] > 150) & (px[:, 2] < 80)).any(), "no yellow contour drawn"


def test_exports_endpoints(env) -> None:
    client, _, built, _ = env
    r = rd(client, f"/api/patients/{built.patient_pk}/export/lesions.csv")
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == sum(len(tp.measurements) for tp in built.timepoints)
    js = rd(client, f"/api/patients/{built.patient_pk}/export/lesions.json").json()
    assert len(js["rows"]) == len(rows)
    for dom in ("TU", "TR", "RS", "tu"):
        r = rd(client, f"/api/patients/{built.patient_pk}/export/cdisc/{dom}.csv")
        assert r.status_code == 200
        assert next(csv.DictReader(io.StringIO(r.text)))["DOMAIN"] == dom.upper()
    assert rd(client, f"/api/patients/{built.patient_pk}/export/cdisc/XX.csv").status_code == 404
    assert set(rd(client, f"/api/patients/{built.patient_pk}/export/cdisc.json").json()) == {"TU", "TR", "RS"}


def test_result_object_download(env) -> None:
    client, _, built, _ = env
    sr = pydicom.dcmread(built.timepoints[1].sr_path, stop_before_pixels=True)
    r = rd(client, f"/api/instances/{sr.SOPInstanceUID}/file")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID == sr.SOPInstanceUID


def test_audit_is_read_only_and_filterable(env) -> None:
    client, _sf, built, _ = env
    items = rd(client, "/api/audit").json()["items"]
    assert [e["id"] for e in items] == sorted(e["id"] for e in items)
    job_id = str(built.timepoints[1].job_id)
    mine = rd(client, "/api/audit", params={"object_type": "job", "object_id": job_id}).json()["items"]
    assert mine
    assert all(e["object_id"] == job_id for e in mine)
    page = rd(client, "/api/audit", params={"limit": 2}).json()
    assert len(page["items"]) == 2
    assert page["next_after_id"] == page["items"][-1]["id"]
    rest = rd(client, "/api/audit", params={"after_id": page["next_after_id"]}).json()["items"]
    assert rest[0]["id"] > page["next_after_id"]
    for method in ("post", "put", "delete", "patch"):
        assert getattr(client, method)("/api/audit", headers={"X-API-Key": OPERATOR}).status_code == 405


def test_metrics(env) -> None:
    client, sf, built, _ = env
    text = rd(client, "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    with session_scope(sf) as s:
        from lesiontrack.db.models import Instance, Series

        received = (
            s.query(Instance)
            .join(Series, Instance.series_pk == Series.id)
            .filter(Series.created_by_us.is_(False))
            .count()
        )
        assert received == sum(len(tp.ct_files) for tp in built.timepoints)
        assert values["lesiontrack_instances_received_total"] == received
        for state in JobState:
            assert (
                values[f'lesiontrack_jobs{{state="{state.value}"}}']
                == s.query(AnalysisJob).filter(AnalysisJob.state == state).count()
            )
        n_register = sum(1 for j in s.query(AnalysisJob) if "register" in (j.step_timings or {}))
    assert values['lesiontrack_job_step_duration_seconds_count{step="register"}'] == n_register
    assert values['lesiontrack_job_step_duration_seconds_sum{step="register"}'] == pytest.approx(31.4 * n_register)
    assert values["lesiontrack_send_failures_total"] == 5.0  # 1 failed attempt before delivery + 4 dead
    assert values['lesiontrack_deliveries{state="dead_letter"}'] == 1.0


def test_openapi_documents_the_endpoints(env) -> None:
    client, *_ = env
    paths = rd(client, "/openapi.json").json()["paths"]
    for p in (
        "/health",
        "/ready",
        "/metrics",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/retry",
        "/api/series/{series_uid}/reanalyse",
        "/api/patients",
        "/api/patients/{patient_pk}/studies",
        "/api/series/{series_uid}",
        "/api/lesions/{lesion_id}",
        "/api/audit",
        "/api/patients/{patient_pk}/export/lesions.csv",
    ):
        assert p in paths, p
    assert "post" in paths["/api/jobs/{job_id}/retry"]
    assert set(paths["/api/audit"]) == {"get"}
    assert client.get("/docs").status_code == 404  # Swagger UI would load a CDN; /api-docs is local
    page = _browser_login(client).get("/api-docs")
    assert page.status_code == 200
    assert "/api/jobs/{job_id}/retry" in page.text
    assert "https://" not in page.text
    assert "http://" not in page.text


# -- dashboard -------------------------------------------------------------------------------------------------
def test_dashboard_login_roles_and_csrf(env) -> None:
    from fastapi.testclient import TestClient

    client, sf, built, _ = env
    browser = TestClient(client.app)
    r = browser.get(f"/patients/{built.patient_pk}", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login?next=/patients/")
    r = browser.post("/login", data={"key": "nope", "next": "/"})
    assert "Unknown key" in r.text
    r = browser.post("/login", data={"key": READ, "next": "//evil.example"}, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/"
    assert "httponly" in r.headers["set-cookie"].lower()
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    page = browser.get("/")
    assert page.status_code == 200
    assert 'id="jobs"' in page.text
    assert "Retry</button>" not in page.text  # read role: no retry buttons
    assert browser.get("/api/jobs").status_code == 200  # the session cookie works for the API
    with session_scope(sf) as s:
        job = AnalysisJob(
            followup_series_uid=built.timepoints[2].series_uid,
            patient_pk=built.patient_pk,
            state=JobState.FAILED,
            attempts=5,
            error="PermanentError: test",
            step_timings={},
            step_outputs={},
        )
        s.add(job)
        s.flush()
        failed = job.id
    assert browser.post(f"/jobs/{failed}/retry", data={"csrf": "x"}).status_code == 403

    ops = TestClient(client.app)
    ops.post("/login", data={"key": OPERATOR, "next": "/"})
    page = ops.get("/").text
    assert "Retry</button>" in page
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert ops.post(f"/jobs/{failed}/retry", data={"csrf": "forged"}).status_code == 403
    r = ops.post(f"/jobs/{failed}/retry", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert "re-queued" in r.headers["location"]
    with session_scope(sf) as s:
        assert s.get(AnalysisJob, failed).superseded_by is not None
    # the queue hides the superseded job by default; shown on request and in its series' history
    assert f'data-job-id="{failed}"' not in ops.get("/").text
    assert f'data-job-id="{failed}"' in ops.get("/?superseded=true").text
    assert f'data-job-id="{failed}"' in ops.get("/", params={"series": built.timepoints[2].series_uid}).text
    tl = ops.get(f"/patients/{built.patient_pk}")
    assert tl.status_code == 200
    assert 'id="timeline"' in tl.text
    assert ops.get("/patients").status_code == 200
    assert ops.get(f"/jobs/{built.timepoints[1].job_id}").status_code == 200
    assert ops.get("/?state=bogus").status_code == 400
    ops.post("/logout")
    assert ops.get("/", follow_redirects=False).status_code == 303


def test_no_patient_identifier_in_urls_or_logs(env, caplog: pytest.LogCaptureFixture) -> None:
    client, sf, built, _ = env
    caplog.set_level(logging.DEBUG)
    with session_scope(sf) as s:
        studies = s.scalars(select(Study)).all()
        lesions = s.scalars(select(Lesion)).all()
        assert studies
        assert lesions
    for url in protected_urls(built):
        assert built.patient_id not in url
        rd(client, url)
    client.post(f"/api/series/{built.timepoints[2].series_uid}/reanalyse", headers={"X-API-Key": OPERATOR})
    for rec in caplog.records:
        assert built.patient_id not in rec.getMessage()
    html = _browser_login(client).get("/").text
    assert built.patient_id not in [a.split('"')[0] for a in html.split('href="')[1:]]


def _browser_login(client):
    from fastapi.testclient import TestClient

    c = TestClient(client.app)
    c.post("/login", data={"key": READ, "next": "/"})
    return c


def test_thumbnail_finds_the_segment_by_tracking_uid(env) -> None:
    """A baseline SEG from a radiologist has no recorded segment number: the lesion's Tracking UID finds it."""
    import numpy as np
    from PIL import Image

    client, sf, _built, _ = env
    with session_scope(sf) as s:
        src = s.scalars(select(LesionObservation).where(LesionObservation.segment_number.is_not(None))).first()
        copy = LesionObservation(
            lesion_pk=src.lesion_pk,
            series_instance_uid=src.series_instance_uid,
            seg_sop_instance_uid=src.seg_sop_instance_uid,
            segment_number=None,
            volume_mm3=src.volume_mm3,
            status=src.status,
        )
        s.add(copy)
        s.flush()
        obs_id = copy.id
    px = (
        np.asarray(
            Image.open(io.BytesIO(rd(client, f"/api/observations/{obs_id}/thumbnail.png").content)).convert("RGB")
        )
        .reshape(-1, 3)
        .astype(int)
    )
    assert ((px[:, 0] > 200) & (px[:, 1] > 150) & (px[:, 2] < 80)).any(), "segment not found by Tracking UID"


@pytest.mark.services
def test_api_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """The same queries (enum filters, JSON columns, aggregates) on the scale-out database."""
    from fastapi.testclient import TestClient

    from lesiontrack.web import create_app

    upgrade(postgres_url)
    sf = make_session_factory(make_engine(postgres_url))
    built = synthetic_patient(sf, tmp_path, patient_id="LT-PG-1")
    client = TestClient(create_app(_settings(tmp_path), sf))
    for url in protected_urls(built):
        assert rd(client, url).status_code == 200, url
    assert rd(client, "/api/jobs", params={"state": "failed"}).json()["items"][0]["id"] == built.failed_job_id
    tl = rd(client, f"/api/patients/{built.patient_pk}/timeline").json()
    assert len(tl["timepoints"]) == len(built.timepoints)
    assert tl["best_overall_response"]
    assert client.get("/ready").status_code == 200


def test_thumbnail_of_a_seg_without_tracking_uids() -> None:
    """A radiologist's SEG without Tracking UIDs: the lesion UID is the one seg_reader derives from the segment."""
    import highdicom as hd

    from lesiontrack.pipeline.dicom.seg.reader import derived_tracking_uid
    from lesiontrack.pipeline.views.thumbnails import lesion_slice_from_seg
    from tests.support.tools import require_shared_data

    path = require_shared_data("interop", "seg_sr", "dcmqi_segmentations_liver.dcm")
    seg = hd.seg.segread(str(path))
    sl = lesion_slice_from_seg(path, None, derived_tracking_uid(str(seg.SOPInstanceUID), 1))
    assert sl.mask.sum() > 30000
    assert sl.source_sop_instance_uid in {u[2] for u in seg.get_source_image_uids()}


def test_a_baseline_annotated_with_lines_is_named_so_and_has_no_thumbnail(env) -> None:
    """Issue 29 item 6: a result prompted from a baseline that has only RECIST lines (an SR, no SEG) says "SR lines"
    where it names the prompt source, lists the object as that SR (never as "SEG"), and shows no thumbnail for the
    baseline (no "SEG unreadable" card for a SEG that does not exist). An SR of ours with its RECIST polylines stands
    in for the radiologist's lines; the database is restored afterwards."""
    client, sf, built, _ = env
    base, fu = built.timepoints[0], built.timepoints[1]
    assert base.sr_path is not None
    original = base.sr_path.read_bytes()
    lines = pydicom.dcmread(base.sr_path)
    lines_uid = str(lines.SOPInstanceUID)
    lines.Manufacturer = "Reading workstation"  # a person's RECIST lines (our own reports are named plain "SR")
    lines.save_as(base.sr_path)
    with session_scope(sf) as s:
        rows = s.scalars(
            select(LesionObservation).where(LesionObservation.series_instance_uid.in_([base.series_uid, fu.series_uid]))
        ).all()
        saved = {o.id: (o.seg_sop_instance_uid, o.propagated_from_sop_uid, o.propagated_from_series_uid) for o in rows}
        base_ids = [o.id for o in rows if o.series_instance_uid == base.series_uid]
        for o in rows:
            if o.series_instance_uid == base.series_uid:
                o.seg_sop_instance_uid = lines_uid
            else:
                o.propagated_from_sop_uid, o.propagated_from_series_uid = lines_uid, base.series_uid
    try:
        tl = rd(client, f"/api/patients/{built.patient_pk}/timeline").json()
        first = [r["cells"][0] for r in tl["lesions"] if r["cells"][0]]
        assert first
        assert all(c["object_kind"] == "SR lines" for c in first)
        prompted = [r["cells"][1] for r in tl["lesions"] if r["cells"][1] and r["cells"][1]["propagated_from_sop_uid"]]
        assert prompted
        assert all(c["prompt_kind"] == "SR lines" for c in prompted)
        tp0 = tl["timepoints"][0]
        assert lines_uid not in tp0["seg_uids"]
        assert lines_uid in tp0["sr_uids"]
        assert tp0["object_kinds"][lines_uid] == "SR lines"

        html = _browser_login(client).get(f"/patients/{built.patient_pk}").text
        for obs_id in base_ids:
            assert f"/api/observations/{obs_id}/thumbnail.png" not in html
        assert "annotated as SR lines" in html
        assert '<span class="prompt-kind">SR lines</span>' in html
        assert f'title="structured report {lines_uid}">SR lines</a>' in html
        assert f'title="DICOM-SEG {lines_uid}"' not in html
        # asked for anyway, the thumbnail says what the object is instead of "SEG unreadable"
        png = rd(client, f"/api/observations/{base_ids[0]}/thumbnail.png")
        assert png.status_code == 200
        assert png.headers["content-type"] == "image/png"
    finally:
        base.sr_path.write_bytes(original)
        with session_scope(sf) as s:
            for o in s.scalars(select(LesionObservation).where(LesionObservation.id.in_(list(saved)))):
                o.seg_sop_instance_uid, o.propagated_from_sop_uid, o.propagated_from_series_uid = saved[o.id]


def test_a_reissued_result_names_the_revision_it_supersedes() -> None:
    """The old instances are never changed, so the new series description carries the mark (issue 29)."""
    from lesiontrack.pipeline.jobs.steps.results import revision_label

    assert revision_label(1) == "rev1"
    assert revision_label(2) == "rev2 supersedes rev1"
    assert revision_label(3, verified=True) == "rev3 verified supersedes rev2"
    assert len(f"LesionTrack RECIST for OHIF {revision_label(99, verified=True)}") <= 64  # a DICOM LO
