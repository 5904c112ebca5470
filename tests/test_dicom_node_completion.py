"""Series completion and routing: quiet period across associations, open associations hold completion,
late instances re-open and re-trigger, forced completion, recorded routing decisions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread

from lesiontrack.config.settings import RoutingSettings
from lesiontrack.db.models import RoutingDecision, SeriesState
from lesiontrack.dicom_node.inbound.routing import PRIOR_RETRIEVAL_REASON, SeriesFacts, decide
from tests.support.dicom_node import Node, ge_files, storescu, wait_until

# the running DICOM node (fixture `node`, tests/conftest.py) as these tests need it
pytestmark = pytest.mark.dicom_node(series_quiet_seconds=3.0, min_slices=10)


def _uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def test_series_over_three_associations_inside_quiet_period_triggers_once(node: Node) -> None:
    files = ge_files()
    uid = _uid(files)
    parts = [files[:10], files[10:20], files[20:]]
    for i, part in enumerate(parts):
        t0 = time.monotonic()
        storescu(node.port, part)
        if i < 2:
            # the next association starts well inside the 3 s quiet period
            assert node.series_state(uid) in (None, SeriesState.RECEIVING)
            while time.monotonic() - t0 < 1.0:
                time.sleep(0.05)
    wait_until(lambda: node.series_state(uid) == SeriesState.COMPLETE, what="completion")
    assert node.triggers == [uid]
    s = node.series(uid)
    assert s is not None
    assert s.instance_count == 28
    assert s.routing_decision == RoutingDecision.ANALYSE
    assert len(node.audits("series.complete")) == 1


def test_open_association_holds_completion(node: Node) -> None:
    from pynetdicom import AE

    files = ge_files()[:12]
    uid = _uid(files)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LESIONTRACK")
    assert assoc.is_established
    for f in files:
        assert assoc.send_c_store(dcmread(f)).Status == 0
    # quiet for longer than the quiet period, but the sender's association is still open
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.5:
        assert node.series_state(uid) in (None, SeriesState.RECEIVING)
        time.sleep(0.25)
    assoc.release()
    wait_until(lambda: node.triggers == [uid], what="trigger after release")


def test_late_instance_reopens_and_retriggers(node: Node) -> None:
    files = ge_files()
    uid = _uid(files)
    storescu(node.port, files[:-1])
    wait_until(lambda: node.triggers == [uid], what="first trigger")
    storescu(node.port, files[-1:])
    wait_until(
        lambda: node.series_state(uid) == SeriesState.RECEIVING or len(node.triggers) == 2,
        what="re-open",
    )
    wait_until(lambda: len(node.triggers) == 2, what="re-trigger")
    assert node.triggers == [uid, uid]
    assert len(node.audits("series.reopened")) == 1
    done = node.audits("series.complete")
    assert [e.details["retrigger"] for e in done] == [False, True]
    assert node.series(uid).instance_count == 28
    # a duplicate of an already stored instance is not new data: no re-open
    storescu(node.port, files[:1])
    assert node.series(uid).state == SeriesState.COMPLETE


def test_forced_completion_and_skip_decision_recorded(tmp_path: Path) -> None:
    n = Node(tmp_path, series_quiet_seconds=3600)
    with n.scp:
        files = ge_files()[:5]
        uid = _uid(files)
        storescu(n.port, files)
        route = n.scp.force_complete(uid)
        assert route is not None
        assert route.decision == RoutingDecision.SKIP
        s = n.series(uid)
        assert s is not None
        assert s.state == SeriesState.COMPLETE
        assert s.routing_decision == RoutingDecision.SKIP
        assert "min_slices" in (s.routing_reason or "")
        assert n.triggers == []
        assert n.audits("series.complete")[0].details["forced"] is True


def test_restart_resumes_receiving_series(tmp_path: Path) -> None:
    n = Node(tmp_path, series_quiet_seconds=3600)
    with n.scp:
        storescu(n.port, ge_files())
    n2 = Node(tmp_path, series_quiet_seconds=0.5)
    n2.settings.routing.min_slices = 10
    with n2.scp:
        wait_until(lambda: len(n2.triggers) == 1, what="completion after restart")


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (
            dict(
                modality="CT",
                series_description="Abdomen",
                body_part="CHEST",
                instance_count=100,
                slice_thickness_mm=1.0,
            ),
            "analyse",
        ),
        (dict(modality="MR", series_description="T1", body_part=None, instance_count=100), "modality"),
        (dict(modality="CT", series_description="Topogram 0.6", body_part=None, instance_count=1), "exclude"),
        (
            dict(
                modality="CT",
                series_description="x",
                body_part=None,
                instance_count=100,
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            ),
            "LOCALIZER",
        ),
        (dict(modality="CT", series_description="x", body_part=None, instance_count=5), "min_slices"),
        (
            dict(modality="CT", series_description="x", body_part=None, instance_count=50, slice_thickness_mm=8.0),
            "thickness",
        ),
        (
            dict(modality="CT", series_description="x", body_part=None, instance_count=50, created_by_us=True),
            "LesionTrack",
        ),
        (
            dict(
                modality="CT",
                series_description="x",
                body_part=None,
                instance_count=50,
                previous_reason=PRIOR_RETRIEVAL_REASON + " from PACS",
            ),
            "prior",
        ),
    ],
)
def test_routing_rules(facts: dict, expected: str) -> None:
    route = decide(SeriesFacts(**facts), RoutingSettings())
    if expected == "analyse":
        assert route.decision == RoutingDecision.ANALYSE
    else:
        assert route.decision == RoutingDecision.SKIP
        assert expected in route.reason


def test_routing_include_and_body_part() -> None:
    rules = RoutingSettings(series_description_include=["(?i)venous"], body_parts=["CHEST"])
    base = dict(modality="CT", instance_count=100, slice_thickness_mm=1.0)
    assert (
        decide(SeriesFacts(series_description="Arterial", body_part="CHEST", **base), rules).decision
        == RoutingDecision.SKIP
    )
    assert (
        decide(SeriesFacts(series_description="Venous", body_part="HEAD", **base), rules).decision
        == RoutingDecision.SKIP
    )
    assert (
        decide(SeriesFacts(series_description="Venous", body_part="chest", **base), rules).decision
        == RoutingDecision.ANALYSE
    )


def test_aborted_association_does_not_hold_completion_but_holds_analysis(node: Node) -> None:
    """An aborted sender does not keep the series receiving forever: it completes after the quiet period, but
    is held (not analysed) as an incomplete transfer until re-sent over a released association (issue 19)."""
    from tests.support.dicom_node import pynetdicom_store

    files = ge_files()[:12]
    uid = _uid(files)
    assert pynetdicom_store(node.port, files, abort_after=11) == [0] * 11
    wait_until(lambda: node.series_state(uid) == SeriesState.COMPLETE, what="completion after the sender aborted")
    s = node.series(uid)
    assert s is not None
    assert s.instance_count == 11
    assert s.routing_decision == RoutingDecision.SKIP
    assert (s.routing_reason or "").startswith("incomplete transfer")
    assert node.triggers == []
    storescu(node.port, files)  # the sender re-sends the series and releases: now analysed
    wait_until(lambda: node.triggers == [uid], what="analysis after the re-send")
