"""A superseded job stops before it sends and its deliveries are never sent; a delivery interrupted after some
objects resumes with the rest only (issue 19). Real SQLite, our real Storage SCP as the destination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from sqlalchemy import select

from lesiontrack.config.settings import PacsPeer, Settings, load_settings
from lesiontrack.db.models import AuditEvent, Delivery, DeliveryState, JobState
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.dicom_node.outbound.sending import DeliveryError, DeliveryService, deliver_files
from lesiontrack.pipeline.jobs.analysis import AnalysisService, JobContext, Step, StepOutput
from tests.support.dicom_node import Node, ge_files


class Analysed(StepOutput):
    ok: bool = True


class Sent(StepOutput):
    deliveries: list[int] = Field(default_factory=list)


def _settings(tmp_path: Path, port: int = 11112) -> Settings:
    return load_settings(
        None,
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'lt.sqlite3'}",
        pacs=[{"name": "pacs", "ae_title": "LESIONTRACK", "host": "127.0.0.1", "port": port, "send": True}],
        sending={"destinations": ["pacs"], "retry_schedule_seconds": [60, 60], "claim_seconds": 600},
    )


def _service(settings: Settings, deliver: Any = deliver_files) -> DeliveryService:
    upgrade(settings.effective_database_url)
    return DeliveryService(
        settings, make_session_factory(make_engine(settings.effective_database_url)), deliver=deliver
    )


def _delivery(svc: DeliveryService, delivery_id: int) -> Delivery:
    with session_scope(svc.session_factory) as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        s.expunge(d)
        return d


def test_a_job_superseded_while_running_stops_before_send_and_sends_nothing(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    sent: list[list[Path]] = []

    def deliver(_settings: Any, _peer: Any, files: list[Path]) -> str:
        sent.append(files)
        return "ok"

    sender = _service(settings, deliver=deliver)
    steps_run: list[str] = []
    newer: list[int] = []

    def analyse(ctx: JobContext[Any, Any]) -> Analysed:
        steps_run.append("analyse")
        # while this job runs, the series is re-sent and completes again: a new job supersedes this one
        newer.append(svc.store.create(ctx.series_uid, reason="series complete (re-sent)"))
        return Analysed()

    def send(ctx: JobContext[Any, Any]) -> Sent:
        steps_run.append("send")
        return Sent(deliveries=sender.send([tmp_path / "seg.dcm"], job_id=ctx.job_id))

    svc = AnalysisService(
        sender.session_factory, [Step("analyse", analyse, Analysed), Step("send", send, Sent, durable=True)]
    )
    job = svc.store.create("1.2.826.0.1.3680043.8.498.77")
    assert svc.run(job) is JobState.SUPERSEDED
    assert steps_run == ["analyse"]
    assert sent == []
    view = svc.store.get(job)
    assert view.state is JobState.SUPERSEDED
    assert view.superseded_by == newer[0]
    with session_scope(sender.session_factory) as s:
        assert s.scalars(select(Delivery)).all() == []
    # the newer job runs normally and sends
    steps_run.clear()
    svc2 = AnalysisService(sender.session_factory, [Step("send", send, Sent, durable=True)])
    assert svc2.run(newer[0]) is JobState.DONE
    assert len(sent) == 1


def test_deliveries_of_a_superseded_job_are_never_sent_not_even_on_retry(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    sent: list[list[Path]] = []

    def failing_then_ok(_s: Settings, _p: PacsPeer, files: list[Path]) -> str:
        if not sent:
            sent.append([])
            raise DeliveryError("destination down")
        sent.append(files)
        return "ok"

    sender = _service(settings, deliver=failing_then_ok)
    svc = AnalysisService(sender.session_factory, [])
    old = svc.store.create("1.2.826.0.1.3680043.8.498.78")
    assert svc.store.claim(old, "worker-a")  # running (a queued job would be reused, not superseded)
    (delivery_id,) = sender.send([tmp_path / "seg.dcm"], job_id=old)  # first attempt fails: retry_wait
    assert _delivery(sender, delivery_id).state == DeliveryState.RETRY_WAIT
    svc.store.create("1.2.826.0.1.3680043.8.498.78")  # a newer job of the series supersedes the old one
    assert sender.retry(job_id=old) == [(delivery_id, DeliveryState.SUPERSEDED)]
    assert sender.run_due() == []
    assert sent == [[]], "nothing of the superseded job reached the destination"
    with session_scope(sender.session_factory) as s:
        assert s.scalars(select(AuditEvent).where(AuditEvent.action == "delivery.superseded")).all()


def test_an_interrupted_c_store_delivery_resumes_with_the_objects_not_yet_acknowledged(tmp_path: Path) -> None:
    dest = Node(tmp_path / "pacs", allowed_calling_aes=[])
    files = ge_files()[:4]
    broken = tmp_path / "broken.dcm"
    raw = files[2].read_bytes()
    broken.write_bytes(raw[: len(raw) - 4000])  # the destination refuses this one (0xC000)
    objects = [files[0], files[1], broken, files[3]]
    with dest.scp:
        settings = _settings(tmp_path / "sender", dest.port)
        sender = _service(settings)
        (delivery_id,) = sender.send(objects, job_id=None)
        d = _delivery(sender, delivery_id)
        assert d.state == DeliveryState.RETRY_WAIT
        assert "1 of 4 not stored" in (d.last_error or "")
        assert sorted(d.acknowledged or []) == sorted(str(f) for f in (files[0], files[1], files[3]))
        assert dest.count() == 3
        broken.write_bytes(raw)  # the object is repaired; the retry sends it alone
        stores: list[str] = []
        ingest = dest.scp.ingestor.receive

        def counting(meta: Any, data: bytes, *a: Any, **kw: Any) -> Any:
            stores.append(str(meta.get("MediaStorageSOPInstanceUID")))
            return ingest(meta, data, *a, **kw)

        dest.scp.ingestor.receive = counting  # type: ignore[method-assign, assignment]  # a counting wrapper
        assert sender.retry(delivery_ids=[delivery_id]) == [(delivery_id, DeliveryState.DELIVERED)]
        assert dest.count() == 4
        assert len(stores) == 1, "only the object not acknowledged before was sent again"
        with session_scope(sender.session_factory) as s:
            last = s.scalars(
                select(AuditEvent).where(AuditEvent.action == "delivery.attempt").order_by(AuditEvent.id.desc())
            ).first()
            assert last is not None
            assert "3 acknowledged earlier, skipped" in (last.details or {}).get("summary", "")
    dest.engine.dispose()
