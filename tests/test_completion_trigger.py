"""The explicit completion trigger fits how PACSes send (issue 29): a trigger that reaches us before the receivers
indexed the series is remembered and answered once the count the PACS gave is indexed, never earlier; a count
met completes a series whose association the PACS keeps open; without a count the trigger waits for the
association to end; an association that ends without A-RELEASE after the whole series is whole when the PACS's
count (NumberOfSeriesRelatedInstances) says so — and held, with a true reason, when it does not. Real Storage SCP
(receiver processes, journals), real SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from lesiontrack.db.models import CompletionRequest, RoutingDecision, SeriesState
from lesiontrack.db.session import session_scope
from tests.support.dicom_node import Node, ge_files, wait_until

# the running DICOM node (fixture `node`, tests/conftest.py) as these tests need it
pytestmark = pytest.mark.dicom_node(series_quiet_seconds=3600.0, receiver_processes=2, min_slices=10)


def _uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


class Sender:
    """One association of a PACS pushing CT instances; it may stay open, release or abort."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE

        ae = AE(ae_title="PYSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300  # a loaded machine answers slowly
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2")
        self.assoc = ae.associate("127.0.0.1", port, ae_title="LESIONTRACK")
        assert self.assoc.is_established

    def send(self, files: list[Path]) -> None:
        for f in files:
            assert self.assoc.send_c_store(f).Status == 0


def _requests(node: Node) -> int:
    with session_scope(node.sf) as s:
        return len(list(s.scalars(CompletionRequest.__table__.select())))


def test_a_trigger_before_the_series_arrives_is_remembered_and_waits_for_the_count(node: Node) -> None:
    files = ge_files()
    uid = _uid(files)
    early = node.scp.completion.trigger(uid, expected_instances=len(files))
    assert early.pending
    assert not early.known
    assert early.route is None
    first = Sender(node.port)
    first.send(files[:10])
    first.assoc.release()
    node.settle()
    node.scp.completion.poll_once()  # 10 of 28 indexed: the trigger must not complete the series
    assert node.series_state(uid) == SeriesState.RECEIVING
    assert node.triggers == []
    second = Sender(node.port)
    second.send(files[10:])
    second.assoc.release()
    wait_until(lambda: node.triggers == [uid], what="completion once all 28 are indexed")
    s = node.series(uid)
    assert s is not None
    assert s.routing_decision == RoutingDecision.ANALYSE
    assert s.expected_instances == len(files)
    assert _requests(node) == 0


def test_a_count_met_completes_although_the_pacs_keeps_its_association_open(node: Node) -> None:
    files = ge_files()[:12]
    uid = _uid(files)
    sender = Sender(node.port)  # Orthanc keeps its association open a few seconds after a store
    sender.send(files)
    outcome = node.scp.completion.trigger(uid, expected_instances=12)
    assert outcome.route is not None, outcome
    assert outcome.route.decision == RoutingDecision.ANALYSE, outcome
    assert node.triggers == [uid]
    sender.assoc.release()


def test_without_a_count_the_trigger_waits_for_the_association_to_end(node: Node) -> None:
    files = ge_files()[:12]
    uid = _uid(files)
    sender = Sender(node.port)
    sender.send(files)
    outcome = node.scp.completion.trigger(uid)
    assert outcome.pending
    assert outcome.known
    assert outcome.indexed == 12
    assert node.triggers == []
    sender.assoc.release()
    wait_until(lambda: node.triggers == [uid], what="completion after the release")
    s = node.series(uid)
    assert s is not None
    assert s.routing_decision == RoutingDecision.ANALYSE, s.routing_reason


@pytest.mark.parametrize("reported", [12, 20])
def test_an_abort_after_the_whole_series_is_whole_when_the_pacs_count_says_so(tmp_path: Path, reported: int) -> None:
    n = Node(tmp_path, series_quiet_seconds=1.0, receiver_processes=2)
    n.settings.routing.min_slices = 10
    n.scp.completion.count_source = lambda _uid: reported  # what the sender's C-FIND would answer
    n.scp.start()
    try:
        files = ge_files()[:12]
        uid = _uid(files)
        sender = Sender(n.port)
        sender.send(files)
        sender.assoc.abort()  # a stable-study push that ends without A-RELEASE
        wait_until(lambda: n.series_state(uid) == SeriesState.COMPLETE, what="completion after the quiet period")
        s = n.series(uid)
        assert s is not None
        if reported == 12:
            assert s.routing_decision == RoutingDecision.ANALYSE, s.routing_reason
            assert n.triggers == [uid], s.routing_reason
        else:
            assert s.routing_decision == RoutingDecision.SKIP
            assert n.triggers == []
            assert s.routing_reason is not None
            assert "12 of the 20 instances the PACS reports" in s.routing_reason, s.routing_reason
    finally:
        n.scp.stop()
        n.engine.dispose()
