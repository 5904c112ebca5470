"""Association-level defences (issue 19): idle, slow and malformed peers cannot hold the DICOM port, every
malformed request gets an A-ASSOCIATE-RJ or A-ABORT, the called AE title is checked, per-peer limits hold,
and malformed-PDU noise is one WARNING per connection (no pynetdicom traceback at ERROR)."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dicom_node import Node, running_node
from tests.support.pdu import ATTACKER, associate_rq, connect, echo, reply_type


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Node]:
    with running_node(
        tmp_path, allowed_calling_aes=["STORESCU", "PYSCU"], pdu_read_seconds=2.0, acse_timeout_seconds=5.0
    ) as n:
        yield n


def test_twenty_idle_and_slow_connections_do_not_stop_a_legitimate_echo(guarded: Node) -> None:
    """The issue's attack (max_associations + 1 connections declaring 4 GB, then a trickle), idle ones and
    half-sent headers, 20 in all from one peer: a C-ECHO from another peer succeeds within its own timeouts."""
    held: list[socket.socket] = []
    try:
        for i in range(20):
            s = connect(guarded.port)
            kind = i % 4
            if kind == 1:
                s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFA) + b"x" * 100)  # 4 GB declared
            elif kind == 2:
                s.sendall(b"\x01\x00\x00")  # half a PDU header, then nothing
            elif kind == 3:
                s.sendall(associate_rq()[:50])  # a plausible A-ASSOCIATE-RQ, never finished
            held.append(s)
        assert echo(guarded.port) == 0
        assert echo(guarded.port) == 0
        # what the node did with them: the 4 GB ones refused at once (A-ASSOCIATE-RJ); every other one (beyond
        # dicom.max_connections_per_peer too: admitted only to be rejected) ended by the node within the ACSE / PDU
        # deadlines (A-ABORT, or closed when it never started a PDU)
        answers = [reply_type(s) for s in held]
        for i, a in enumerate(answers):
            assert a in ({0x03, None} if i % 4 == 1 else {0x07, None}), (i, a)
        assert 0x03 in answers
        assert 0x07 in answers
    finally:
        for s in held:
            s.close()
    assert echo(guarded.port) == 0


def read_reject(s: socket.socket) -> tuple[int, int, int] | None:
    """(result, source, reason) of the A-ASSOCIATE-RJ the node answers with (None: anything else or nothing)."""
    data = b""
    while len(data) < 10:
        try:
            chunk = s.recv(10 - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    if data[0] != 0x03:
        return None
    return data[7], data[8], data[9]


LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local-limit-exceeded


def test_per_peer_limit_and_pending_connections_do_not_hold_association_slots(tmp_path: Path) -> None:
    n = Node(tmp_path, allowed_calling_aes=["STORESCU"], max_associations=2, max_connections_per_peer=3)
    with n.scp:
        idle = [connect(n.port) for _ in range(3)]
        try:
            extra = connect(n.port)
            extra.sendall(associate_rq())
            assert read_reject(extra) == LOCAL_LIMIT  # over the per-peer limit: A-ASSOCIATE-RJ, not a dropped TCP
            extra.close()
            # three idle connections from one peer, max_associations = 2: a real peer still associates
            assert echo(n.port) == 0
        finally:
            for s in idle:
                s.close()


def test_over_limit_associations_are_rejected_transient_local_limit(tmp_path: Path) -> None:
    """The sender (a pynetdicom AE) reads an A-ASSOCIATE-RJ, rejected-transient, "local limit exceeded", at
    dicom.max_associations and at dicom.max_connections_per_peer, and associates again once a slot is free."""
    from pynetdicom import AE

    n = Node(tmp_path, allowed_calling_aes=["PYSCU"], max_associations=2, max_connections_per_peer=3)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 10

    def associate(source: str = "127.0.0.1") -> Any:
        return ae.associate("127.0.0.1", n.port, ae_title="LESIONTRACK", bind_address=(source, 0))

    def rejection(assoc: Any) -> tuple[int, int, int]:
        assert assoc.is_rejected, "the sender must see a rejection, not an abort"
        assert not assoc.is_aborted, "the sender must see a rejection, not an abort"
        p = assoc.acceptor.primitive
        return int(p.result), int(p.result_source), int(p.diagnostic)

    with n.scp:
        held = [associate(), associate(ATTACKER)]
        try:
            assert all(a.is_established for a in held)
            assert rejection(associate("127.0.0.3")) == LOCAL_LIMIT  # max_associations reached
            held[0].release()
            again = associate()
            assert again.is_established  # the slot is free again
            held[0] = again
            held[1].release()
            idle = [connect(n.port, ATTACKER) for _ in range(3)]  # the peer's three connections, not associated
            try:
                assert rejection(associate(ATTACKER)) == LOCAL_LIMIT  # max_connections_per_peer reached
            finally:
                for s in idle:
                    s.close()
        finally:
            for a in held:
                if a.is_established:
                    a.release()


def test_malformed_requests_each_get_a_reply(guarded: Node) -> None:
    cases = {
        "even presentation context id": (associate_rq(context_id=2), 0x03),
        "presentation context id 0": (associate_rq(context_id=0), 0x03),
        "A-ASSOCIATE-RQ declaring 4 GB": (struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF) + b"\x00" * 64, 0x03),
        "A-ASSOCIATE-RQ that does not decode": (struct.pack(">BBL", 0x01, 0, 40) + b"\xff" * 40, 0x03),
        "P-DATA before association": (
            struct.pack(">BBL", 0x04, 0, 12) + b"\x00\x00\x00\x08\x01\x03" + b"\x00" * 6,
            0x07,
        ),
        "unknown PDU type": (b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00", 0x07),
        "A-RELEASE-RQ declaring 1 MB": (struct.pack(">BBL", 0x05, 0, 1 << 20), 0x07),
    }
    for name, (payload, expected) in cases.items():
        with connect(guarded.port, "127.0.0.1") as s:
            s.sendall(payload)
            assert reply_type(s) == expected, name
    assert echo(guarded.port) == 0


def test_slow_pdu_is_aborted_at_the_deadline(guarded: Node) -> None:
    rq = associate_rq()
    with connect(guarded.port) as s:
        s.sendall(rq[:-10])  # header complete, body 10 bytes short: the PDU never completes
        assert reply_type(s) == 0x07  # A-ABORT once dicom.pdu_read_seconds ran out
    with connect(guarded.port) as s:
        s.sendall(rq)  # the same request sent whole is accepted
        assert reply_type(s) == 0x02


def test_called_ae_title_is_checked(guarded: Node) -> None:
    assert echo(guarded.port, aec="WRONGAE") != 0
    with connect(guarded.port, "127.0.0.1") as s:
        s.sendall(associate_rq(called="WRONGAE"))
        assert reply_type(s) == 0x03
    assert echo(guarded.port) == 0


def test_malformed_pdu_noise_is_one_warning_per_connection(guarded: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with connect(guarded.port, "127.0.0.1") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 100)
        assert reply_type(s) == 0x07
    with connect(guarded.port, "127.0.0.1") as s:
        s.sendall(associate_rq(context_id=4))
        assert reply_type(s) == 0x03
    assert echo(guarded.port) == 0
    guard = [
        r
        for r in caplog.records
        if r.name == "lesiontrack.dicom_node.inbound.association_guard" and r.levelno == logging.WARNING
    ]
    assert len(guard) == 2
    assert not [r for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.name.startswith("pynetdicom") and r.exc_info]
