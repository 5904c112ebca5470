"""Delivery claims: one sender at a time per delivery, across threads and processes; lapsed claims are retried."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lesiontrack.config.settings import PacsPeer, Settings, load_settings
from lesiontrack.db.models import Delivery, DeliveryState
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.dicom_node.outbound.sending import DeliveryService


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'lt.sqlite3'}",
        pacs=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112, "send": True}],
        sending={"destinations": ["pacs"], "retry_schedule_seconds": [60], "claim_seconds": 600},
    )


def _two_senders(tmp_path: Path, deliver_a, deliver_b, clock: Clock):
    """Two services with their own engines on one database file, as two processes would have."""
    settings = _settings(tmp_path)
    upgrade(settings.database_url)
    a = DeliveryService(settings, make_session_factory(make_engine(settings.database_url)), clock, deliver_a)
    b = DeliveryService(settings, make_session_factory(make_engine(settings.database_url)), clock, deliver_b)
    return a, b


def _state(svc: DeliveryService, delivery_id: int) -> DeliveryState:
    with session_scope(svc.session_factory) as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        return d.state


def test_a_delivery_being_sent_is_not_sent_again_by_another_sender(tmp_path: Path) -> None:
    sending, release = threading.Event(), threading.Event()
    sent: list[str] = []

    def slow(settings: Settings, peer: PacsPeer, files: list[Path]) -> str:
        sent.append("a")
        sending.set()
        assert release.wait(30)
        return "ok"

    def fast(settings: Settings, peer: PacsPeer, files: list[Path]) -> str:
        sent.append("b")
        return "ok"

    a, b = _two_senders(tmp_path, slow, fast, Clock())
    (delivery_id,) = a.send([tmp_path / "seg.dcm"], attempt_now=False)
    worker = threading.Thread(target=a.attempt, args=(delivery_id,))
    worker.start()
    assert sending.wait(30)
    assert b.attempt(delivery_id) == DeliveryState.SENDING  # held by a: b leaves it alone
    assert b.run_due() == []  # nor is it due while the claim holds
    release.set()
    worker.join(30)
    assert _state(a, delivery_id) == DeliveryState.DELIVERED
    assert b.attempt(delivery_id) == DeliveryState.DELIVERED
    assert sent == ["a"]


def test_a_lapsed_claim_is_retried_by_another_sender(tmp_path: Path) -> None:
    clock = Clock()
    sent: list[str] = []

    def deliver_b(*_: object) -> str:
        sent.append("b")
        return "ok"

    a, b = _two_senders(tmp_path, lambda *_: "unused", deliver_b, clock)
    (delivery_id,) = a.send([tmp_path / "seg.dcm"], attempt_now=False)
    assert a._claim(delivery_id)  # a claims it, then its process dies
    assert b.run_due() == []
    assert sent == []
    clock.now += timedelta(seconds=601)  # the claim's lease has lapsed
    assert b.run_due() == [(delivery_id, DeliveryState.DELIVERED)]
    assert sent == ["b"]
