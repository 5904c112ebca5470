"""Dashboard in a real browser: a real HTTP server (uvicorn) over a database filled with a measured, RECIST-assessed
longitudinal patient (SEG + SR written by the pipeline's writers); headless Chromium (playwright-core) logs in, reads
the job queue and the patient's lesion timeline. Values shown must equal the database, every thumbnail and plot must
load, and the screenshots are saved under ``tests/artifacts/dashboard/``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from lesiontrack.config.settings import Settings
from lesiontrack.db.models import AnalysisJob, LesionObservation
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from tests.support.services import free_port, wait_for_port
from tests.support.tools import REPO, require_tool

BROWSER_DIR = REPO / "tests" / "browser"
ARTIFACTS = Path(os.environ.get("LESIONTRACK_TEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "dashboard"
KEY = "dashboard-operator-key"

pytestmark = [pytest.mark.slow, pytest.mark.services]


def _fmt(v: float | None, digits: int, suffix: str) -> str:
    return "—" if v is None else f"{v:.{digits}f}{suffix}"


def _skipped_series(sf: Any, beside_series_uid: str) -> str:
    """A scout series the routing rules skipped, in the study of ``beside_series_uid``."""
    from lesiontrack.db.models import RoutingDecision, Series, SeriesState

    uid = "1.2.826.0.1.3680043.8.498.777"
    with session_scope(sf) as s:
        study_pk = s.scalar(select(Series.study_pk).where(Series.series_instance_uid == beside_series_uid))
        s.add(
            Series(
                series_instance_uid=uid,
                study_pk=study_pk,
                modality="CT",
                series_description="Topogram 0.6",
                state=SeriesState.COMPLETE,
                routing_decision=RoutingDecision.SKIP,
                routing_reason="ImageType LOCALIZER",
                instance_count=2,
            )
        )
    return uid


def test_dashboard_shows_the_database(tmp_path: Path) -> None:
    require_tool("node", "/usr/bin/chromium", str(BROWSER_DIR / "node_modules" / "playwright-core"))
    from tests.support.patient import build_patient, phantom_timepoints

    url = f"sqlite:///{tmp_path / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    # six timepoints (baseline + 5 follow-ups): the timeline must hold them, and 10, without overflowing (issue 29)
    built = build_patient(sf, phantom_timepoints(tmp_path, n_followups=5), tmp_path, patient_id="LT-DEMO-7")
    scout = _skipped_series(sf, built.timepoints[0].series_uid)
    result, live_id = _run_dashboard_check(sf, tmp_path, built, scout)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "result.json").write_text(json.dumps(result, indent=1))
    for shot in result["screenshots"]:
        shutil.copy(shot, ARTIFACTS / Path(shot).name)
    assert "error" not in result, result.get("error")
    assert result["blocked"] == []
    assert result["pageErrors"] == []

    assert result["liveNewJob"] == {"id": live_id, "state": "queued"}, "queue did not refresh by itself"

    # "Analyse anyway" in the browser: the operator's click queues a job for the skipped series, says so, and the
    # series leaves the skipped list (the reason the rules gave is kept in the audit trail)
    assert result["skippedReason"] == "ImageType LOCALIZER"
    assert "queued for analysis as job" in result["analyseFlash"], result["analyseFlash"]
    assert result["stillListed"] == 0
    with session_scope(sf) as s:
        queued = s.scalars(select(AnalysisJob).where(AnalysisJob.followup_series_uid == scout)).all()
        assert len(queued) == 1
        assert f"job {queued[0].id}" in result["analyseFlash"]

    # job queue = database (as it was when the page was read)
    with session_scope(sf) as s:
        jobs = s.scalars(
            select(AnalysisJob)
            .where(AnalysisJob.id != live_id, AnalysisJob.followup_series_uid != scout)
            .where(AnalysisJob.superseded_by.is_(None))  # the queue hides superseded jobs by default
            .order_by(AnalysisJob.id.desc())
        ).all()
        assert [(j["id"], j["state"]) for j in result["jobs"]] == [(j.id, j.state.value) for j in jobs]
        failed = [j for j in result["jobs"] if j["state"] == "failed"]
        assert failed
        assert failed[0]["retryButton"]
        assert "registration diverged" in failed[0]["error"]
        assert result["counts"]["done"] == sum(j.state.value == "done" for j in jobs)
    _assert_timeline_equals_database(sf, built, result)
    for name in ("dashboard-jobs.png", "dashboard-timeline.png"):
        assert (ARTIFACTS / name).stat().st_size > 20_000, name


@contextmanager
def _serving(sf: Any, tmp_path: Path) -> Iterator[int]:
    """The dashboard on a real uvicorn server over ``sf``; yields its port."""
    import uvicorn

    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.service import JobControl
    from lesiontrack.web import create_app

    settings = Settings(data_dir=tmp_path, http={"api_keys": [{"name": "ops", "key": KEY, "role": "operator"}]})
    app = create_app(settings, sf, JobControl(JobStore(sf), lambda _job: None, settings=settings, session_factory=sf))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port, timeout=30)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def _check_command(port: int, patient_pk: int, out: Path, *extra: str) -> list[str]:
    return [
        "node",
        str(BROWSER_DIR / "dashboard-check.mjs"),
        "--url",
        f"http://127.0.0.1:{port}",
        "--key",
        KEY,
        "--patient",
        str(patient_pk),
        "--out",
        str(out),
        *extra,
    ]


def _run_dashboard_check(sf: Any, tmp_path: Path, built: Any, scout: str) -> tuple[dict[str, Any], int]:
    """Serve the dashboard and run the browser check on it; a job is queued while the page watches the queue.
    Returns the check's result and the id of that live job."""
    with _serving(sf, tmp_path) as port:
        node = subprocess.Popen(
            _check_command(port, built.patient_pk, tmp_path / "shots", "--live", "--analyse", scout),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=BROWSER_DIR,
        )
        # once the page watches the queue, a job appears in the database; the page must show it without a reload
        assert node.stderr is not None
        seen = []
        for line in node.stderr:
            seen.append(line)
            if line.strip() == "WATCHING-QUEUE":
                break
        with session_scope(sf) as s:
            live = AnalysisJob(
                followup_series_uid=built.timepoints[1].series_uid,
                patient_pk=built.patient_pk,
                step_timings={},
                step_outputs={},
            )
            s.add(live)
            s.flush()
            live_id = live.id
        stdout, stderr = node.communicate(timeout=300)
        proc = subprocess.CompletedProcess(node.args, node.returncode, stdout, "".join(seen) + stderr)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout), live_id


def _assert_timeline_fits(layout: dict[str, Any], timepoints: int) -> None:
    """Measured in the browser: the timeline of ``timepoints`` columns fits its container and the 1500 px window
    (nothing to scroll sideways), and no header or cell has content wider than itself (spilling over its neighbour)."""
    assert layout["timepoints"] == timepoints, layout
    assert layout["scrollWidth"] <= layout["containerWidth"] + 1, layout
    assert layout["tableWidth"] <= layout["containerWidth"] + 1, layout
    assert layout["pageScrollWidth"] <= layout["windowWidth"] + 1, layout
    assert layout["overflowingCells"] == [], layout["overflowingCells"]


def _assert_timeline_equals_database(sf: Any, built: Any, result: dict[str, Any]) -> None:
    """The timeline shown is the database's: timepoints, lesions, every cell's values, RECIST, images, layout."""
    from lesiontrack.pipeline.views.history import build_timeline

    with session_scope(sf) as s:
        # timeline = database
        tl = build_timeline(s, built.patient_pk)
        obs = {o.id: o for o in s.scalars(select(LesionObservation))}
    shown = result["timeline"]
    assert [tp["series"] for tp in shown["timepoints"]] == [tp.series_uid for tp in built.timepoints]
    assert all("SEG" in tp["objects"] and "SR" in tp["objects"] for tp in shown["timepoints"])
    assert [row["trackingUid"] for row in shown["lesions"]] == [r.tracking_uid for r in tl.lesions]
    n_cells = 0
    for row in shown["lesions"]:
        for cell in row["cells"]:
            if cell is None:
                continue
            o = obs[cell["observationId"]]
            assert o.volume_mm3 is not None
            assert cell["volume"] == _fmt(o.volume_mm3 / 1000.0, 2, " mL")
            assert cell["longAxis"] == _fmt(o.long_axis_mm, 1, " mm")
            assert cell["shortAxis"] == _fmt(o.short_axis_mm, 1, " mm")
            assert cell["status"] == o.status.value
            n_cells += 1
    assert n_cells == sum(len(tp.measurements) for tp in built.timepoints)
    assert shown["overall"][1:] == [tp.overall_response for tp in tl.timepoints[1:]]
    assert shown["best"] == tl.best_overall_response

    # every thumbnail and plot loaded as an image of the expected size
    thumbs = [i for i in result["images"] if "thumbnail" in i["src"]]
    plots = [i for i in result["images"] if "plot" in i["src"]]
    assert len(thumbs) == n_cells
    assert len(plots) == len(tl.lesions)
    assert all(i["naturalWidth"] == 160 and i["naturalHeight"] == 160 for i in thumbs), thumbs
    assert all(i["naturalWidth"] == 360 and i["naturalHeight"] == 200 for i in plots), plots
    # the timeline of 6 timepoints fits its container (10: test_timeline_holds_ten_timepoints)
    _assert_timeline_fits(result["layout"], 6)


def test_timeline_holds_ten_timepoints(tmp_path: Path) -> None:
    """Issue 29: a trial patient has up to 10 timepoints (baseline + 9 follow-ups); the timeline shows all ten
    columns in a 1500 px window without sideways scrolling and without any cell's content overflowing it — measured
    on the rendered page (element widths), with as many lesions as the phantom grows (new ones appear over time)."""
    require_tool("node", "/usr/bin/chromium", str(BROWSER_DIR / "node_modules" / "playwright-core"))
    from tests.support.patient import build_patient, phantom_timepoints

    url = f"sqlite:///{tmp_path / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    # a smaller phantom than the 6-timepoint test's: the layout does not depend on the CT's size
    tps = phantom_timepoints(tmp_path, n_followups=9, shape=(32, 112, 112), patient_id="LT-TEN-1")
    built = build_patient(sf, tps, tmp_path, patient_id="LT-TEN-1", with_failed_job=False)
    with _serving(sf, tmp_path) as port:
        proc = subprocess.run(
            _check_command(port, built.patient_pk, tmp_path / "shots"),
            capture_output=True,
            text=True,
            cwd=BROWSER_DIR,
            timeout=300,
            check=False,
        )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "shots" / "dashboard-timeline.png", ARTIFACTS / "dashboard-timeline-10.png")
    assert "error" not in result, result.get("error")
    assert result["pageErrors"] == []
    shown = result["timeline"]
    assert [tp["series"] for tp in shown["timepoints"]] == [tp.series_uid for tp in built.timepoints]
    assert len(shown["timepoints"]) == 10
    _assert_timeline_fits(result["layout"], 10)
