"""Log context: JSON log lines inside a job carry job / series_uid / step, inside an association the peer."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid

from lesiontrack.config.logging import current_log_context, log_context, setup_logging
from lesiontrack.db.session import make_engine, make_session_factory, upgrade
from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.pipeline.jobs.analysis import AnalysisService, JobContext, Step, StepOutput
from lesiontrack.pipeline.jobs.store import JobStore
from tests.support.dicom_node import Node, pynetdicom_store

log = logging.getLogger("lesiontrack.test.context")


class JsonLines:
    """``start()`` installs the JSON handler on the stderr that capsys captures during the test call."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def start(self) -> None:
        setup_logging("INFO", json_format=True)
        self.capsys.readouterr()

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.capsys.readouterr().err.splitlines() if x.startswith("{")]


@pytest.fixture
def json_lines(capsys: pytest.CaptureFixture[str]) -> Iterator[JsonLines]:
    try:
        yield JsonLines(capsys)
    finally:
        setup_logging("WARNING")


def test_context_nests_and_is_restored() -> None:
    with log_context(job=7, series_uid="1.2"):
        with log_context(step="track", series_uid=None):  # None leaves a field as it is
            assert current_log_context() == {"job": 7, "series_uid": "1.2", "step": "track"}
        assert current_log_context() == {"job": 7, "series_uid": "1.2"}
    assert current_log_context() == {}


def test_lines_inside_a_job_carry_job_series_and_step(json_lines: JsonLines, sqlite_url: str) -> None:
    upgrade(sqlite_url)
    sf = make_session_factory(make_engine(sqlite_url))

    def step(name: str) -> Step[Any, Any, StepOutput]:
        def fn(ctx: JobContext[Any, Any]) -> StepOutput:
            log.info("working in %s", name)
            return StepOutput()

        return Step(name, fn, StepOutput)

    job_id = JobStore(sf).create("1.2.826.0.1.3680043.10.99.1", reason="test", actor="test")
    json_lines.start()
    AnalysisService(sf, [step("register"), step("track")]).run(job_id)
    log.info("after the job")
    lines = json_lines.read()
    mine = {x["msg"]: x for x in lines if x["logger"] == log.name}
    for name in ("register", "track"):
        line = mine[f"working in {name}"]
        assert (line["job"], line["step"], line["series_uid"]) == (job_id, name, "1.2.826.0.1.3680043.10.99.1")
    summary = [
        x
        for x in lines
        if x["logger"] == "lesiontrack.pipeline.jobs.analysis" and x["msg"].startswith(f"job {job_id} done")
    ]
    assert summary, "the runner's own end-of-job line carries the job too"
    assert summary[0]["job"] == job_id, "the runner's own end-of-job line carries the job too"
    assert summary[0]["series_uid"] == "1.2.826.0.1.3680043.10.99.1"
    assert not {"job", "step", "series_uid"} & set(mine["after the job"])  # the context ends with the job


def test_lines_inside_an_association_carry_the_peer(json_lines: JsonLines, tmp_path: Path) -> None:
    ct = Volume(np.zeros((2, 8, 8), np.int16), spacing=np.array([1.0, 1.0, 2.0]))
    files = write_ct_series(
        ct,
        tmp_path / "ct",
        CTSeriesHeader(
            patient_id="P1",
            patient_name="TEST^LOG",
            study_uid=generate_uid(),
            series_uid=generate_uid(),
            frame_of_reference_uid=generate_uid(),
            study_date="20240101",
        ),
    )
    node = Node(tmp_path / "node", allowed_calling_aes=["PYSCU"])
    node.scp.start()
    json_lines.start()
    try:
        assert pynetdicom_store(node.port, files) == [0, 0]
    finally:
        node.scp.stop()
        node.engine.dispose()
    # per-instance lines are at DEBUG; the association's INFO summary is logged inside the association
    summary = [
        x
        for x in json_lines.read()
        if x["logger"] == "lesiontrack.dicom_node.inbound.scp" and "association from" in x["msg"]
    ]
    assert len(summary) == 1, summary
    assert "2 instances stored" in summary[0]["msg"], summary
    assert summary[0]["peer"].startswith("PYSCU@127.0.0.1"), summary
