"""Result delivery: one Delivery row per destination, retried on the configured schedule, then dead-letter.

Implements :class:`pipeline.jobs.ports.ResultSender`. Methods per peer: C-STORE, Orthanc REST upload, STOW-RS.
Every attempt is written to the audit log. ``retry(job_id)`` is the operator's manual retry of dead letters.
An attempt first claims its row in the database (state ``sending`` with a lease), so two threads or two
processes (``serve`` and ``send --retry``, or several workers) never send the same delivery at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import PacsPeer, SendMethod, Settings
from lesiontrack.db.models import AnalysisJob, AuditEvent, Delivery, DeliveryState
from lesiontrack.db.repository import audit
from lesiontrack.db.session import affected_rows, session_scope
from lesiontrack.dicom_node.outbound.scu import store_files

log = logging.getLogger(__name__)


def _utc(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:  # SQLite returns naive datetimes
        return dt.replace(tzinfo=UTC)
    return dt


class DeliveryError(RuntimeError):
    """One delivery attempt failed (destination down, refused, or partially stored).

    ``acknowledged`` lists the files the destination did store in this attempt (the next attempt skips them).
    """

    def __init__(self, message: str, acknowledged: list[Path] | None = None) -> None:
        super().__init__(message)
        self.acknowledged = list(acknowledged or [])


def deliver_files(settings: Settings, peer: PacsPeer, files: list[Path]) -> str:
    """Send ``files`` to ``peer`` with its configured method; raises :class:`DeliveryError`; returns a summary."""
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise DeliveryError(f"files missing on disk: {missing[:3]}")
    try:
        if peer.send_method == SendMethod.C_STORE:
            outcomes = store_files(settings, peer, [Path(f) for f in files])
            bad = [o for o in outcomes if not o.ok]
            if bad or len(outcomes) != len(files):
                first = bad[0].error if bad else "association ended early"
                raise DeliveryError(
                    f"C-STORE to {peer.name}: {len(files) - len(outcomes) + len(bad)} of "
                    f"{len(files)} not stored ({first})",
                    acknowledged=[Path(o.path) for o in outcomes if o.ok],
                )
            return f"C-STORE {len(files)} objects"
        if peer.send_method == SendMethod.ORTHANC_REST:
            from orthanc_api_client import OrthancApiClient  # loads only for peers that use it

            if not peer.orthanc_url:
                raise DeliveryError(f"peer {peer.name}: send_method ORTHANC-REST needs orthanc_url")
            pwd = peer.orthanc_password.get_secret_value() if peer.orthanc_password else None
            client = OrthancApiClient(peer.orthanc_url, user=peer.orthanc_user, pwd=pwd)
            ids: list[str] = []
            done: list[Path] = []
            for f in files:
                try:
                    ids.extend(client.upload_file(str(f)))
                except Exception as exc:
                    raise DeliveryError(
                        f"ORTHANC-REST to {peer.name}: {type(exc).__name__}: {exc}", acknowledged=done
                    ) from exc
                done.append(Path(f))
            return f"Orthanc REST upload {len(ids)} instances"
        if peer.send_method == SendMethod.STOW_RS:
            from dicomweb_client.api import DICOMwebClient  # HTTP client stacks load only for peers that use them

            if not peer.dicomweb_url:
                raise DeliveryError(f"peer {peer.name}: send_method STOW-RS needs dicomweb_url")
            client = DICOMwebClient(url=peer.dicomweb_url)
            client.store_instances(datasets=[dcmread(f) for f in files])
            return f"STOW-RS {len(files)} instances"
    except DeliveryError:
        raise
    except Exception as exc:
        raise DeliveryError(f"{peer.send_method.value} to {peer.name}: {type(exc).__name__}: {exc}") from exc
    raise DeliveryError(f"unknown send method {peer.send_method}")


class DeliveryService:
    """Creates deliveries and runs attempts; thread-safe. ``start()`` runs due retries in the background."""

    actor = "sender"

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        deliver: Callable[[Settings, PacsPeer, list[Path]], str] = deliver_files,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.clock = clock
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- ResultSender ------------------------------------------------------------------------------------------
    def send(self, files: list[Path], job_id: int | None = None, attempt_now: bool = True) -> list[int]:
        """Queue ``files`` for every configured destination; the first attempt runs now unless told otherwise."""
        dests = self.settings.sending.destinations
        if not dests:
            raise ValueError("sending.destinations is empty: nowhere to send results")
        for name in dests:
            self.settings.peer(name)  # fail fast on a typo
        ids = []
        with session_scope(self.session_factory) as s:
            for name in dests:
                d = Delivery(
                    job_pk=job_id,
                    destination=name,
                    file_paths=[str(f) for f in files],
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=self.clock(),
                )
                s.add(d)
                s.flush()
                audit(
                    s,
                    self.actor,
                    "delivery.queued",
                    "delivery",
                    d.id,
                    destination=name,
                    job_id=job_id,
                    files=len(files),
                )
                ids.append(d.id)
        if attempt_now:
            for i in ids:
                self.attempt(i)
        return ids

    # -- attempts ----------------------------------------------------------------------------------------------
    def attempt(self, delivery_id: int) -> DeliveryState:
        """One attempt; on failure schedule the next one, or dead-letter once the schedule is used up.

        Only a delivery this call can claim is attempted; one that another sender holds (or that is delivered
        or dead-lettered) is left alone and its state returned.
        """
        if not self._claim(delivery_id):
            with session_scope(self.session_factory) as s:
                d = s.get(Delivery, delivery_id)
                if d is None:
                    raise KeyError(f"no delivery {delivery_id}")
                return d.state
        return self._attempt(delivery_id)

    def _claim(self, delivery_id: int) -> bool:
        """Atomically move a waiting delivery (or one whose previous claim has lapsed) to ``sending``."""
        now = self.clock()
        with session_scope(self.session_factory) as s:
            claimed = affected_rows(
                s.execute(
                    update(Delivery)
                    .where(
                        Delivery.id == delivery_id,
                        or_(
                            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.RETRY_WAIT]),
                            (Delivery.state == DeliveryState.SENDING) & (Delivery.next_attempt_at <= now),
                        ),
                    )
                    .values(
                        state=DeliveryState.SENDING,
                        next_attempt_at=now + timedelta(seconds=self.settings.sending.claim_seconds),
                    )
                    .execution_options(synchronize_session=False)
                )
            )
        return claimed == 1

    def _superseded(self, delivery_id: int) -> bool:
        """A delivery whose job was superseded is never sent (it is marked ``superseded`` instead)."""
        with session_scope(self.session_factory) as s:
            d = s.get(Delivery, delivery_id)
            if d is None or d.job_pk is None:
                return False
            newer = s.scalar(select(AnalysisJob.superseded_by).where(AnalysisJob.id == d.job_pk))
            if newer is None:
                return False
            d.state, d.next_attempt_at = DeliveryState.SUPERSEDED, None
            audit(s, self.actor, "delivery.superseded", "delivery", delivery_id, job_id=d.job_pk, superseded_by=newer)
        log.warning("delivery %d not sent: its job was superseded by job %d", delivery_id, newer)
        return True

    def _attempt(self, delivery_id: int) -> DeliveryState:
        if self._superseded(delivery_id):
            return DeliveryState.SUPERSEDED
        with session_scope(self.session_factory) as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                raise KeyError(f"no delivery {delivery_id}")
            name, files, attempt_no = d.destination, [Path(p) for p in d.file_paths], d.attempts + 1
            acked = {str(p) for p in (d.acknowledged or [])}
        # resume per object: what the destination acknowledged in an earlier attempt is not sent again
        todo = [f for f in files if str(f) not in acked]
        error = ""
        summary = ""
        newly: list[Path] = []
        try:
            summary = self._deliver(self.settings, self.settings.peer(name), todo) if todo else "nothing left"
            newly = todo
        except DeliveryError as exc:
            error, newly = str(exc), exc.acknowledged
        except KeyError as exc:
            error = str(exc)
        if acked:
            summary = f"{summary} ({len(acked)} acknowledged earlier, skipped)" if summary else summary
        now = self.clock()
        schedule = self.settings.sending.retry_schedule_seconds
        with session_scope(self.session_factory) as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                raise KeyError(f"no delivery {delivery_id}")
            d.attempts = attempt_no
            if newly:
                d.acknowledged = sorted(acked | {str(p) for p in newly})
            if not error:
                d.state, d.delivered_at, d.next_attempt_at, d.last_error = DeliveryState.DELIVERED, now, None, None
            else:
                d.last_error = error[:2000]
                # failures since queueing or the last manual retry pick the next delay
                idx = self._failures_since_reset(s, delivery_id)
                if idx < len(schedule):
                    d.state = DeliveryState.RETRY_WAIT
                    d.next_attempt_at = now + timedelta(seconds=schedule[idx])
                else:
                    d.state, d.next_attempt_at = DeliveryState.DEAD_LETTER, None
            audit(
                s,
                self.actor,
                "delivery.attempt",
                "delivery",
                delivery_id,
                destination=name,
                attempt=attempt_no,
                outcome="delivered" if not error else d.state.value,
                error=error or None,
                summary=summary or None,
                next_attempt_at=d.next_attempt_at.isoformat() if d.next_attempt_at else None,
            )
            state = d.state
        if error and state == DeliveryState.DEAD_LETTER:  # the schedule is used up: a person must act
            log.error(
                "delivery %d to %s attempt %d failed, no retry left (dead letter: lesiontrack send --delivery %d): %s",
                delivery_id, name, attempt_no, delivery_id, error,
            )  # fmt: skip
        elif error:
            log.warning(
                "delivery %d to %s attempt %d failed (%s): %s", delivery_id, name, attempt_no, state.value, error
            )
        else:
            log.info("delivery %d to %s delivered (%s)", delivery_id, name, summary)
        return state

    def _failures_since_reset(self, s: Session, delivery_id: int) -> int:
        """Failed attempts since the delivery was queued or last manually retried (this one not yet audited)."""
        events = list(
            s.scalars(
                select(AuditEvent)
                .where(
                    AuditEvent.object_type == "delivery",
                    AuditEvent.object_id == str(delivery_id),
                    AuditEvent.action.in_(["delivery.attempt", "delivery.manual_retry", "delivery.queued"]),
                )
                .order_by(AuditEvent.id)
            )
        )
        n = 0
        for e in events:
            if e.action in ("delivery.manual_retry", "delivery.queued"):
                n = 0
            elif (e.details or {}).get("outcome") != "delivered":
                n += 1
        return n

    def run_due(self) -> list[tuple[int, DeliveryState]]:
        """Attempt every delivery whose time has come (pending, waiting for a retry, or a lapsed claim)."""
        now = self.clock()
        with session_scope(self.session_factory) as s:
            due = [
                d.id
                for d in s.scalars(
                    select(Delivery)
                    .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.RETRY_WAIT, DeliveryState.SENDING]))
                    .order_by(Delivery.id)
                )
                if (due_at := _utc(d.next_attempt_at)) is None or due_at <= now
            ]
        return [(i, self.attempt(i)) for i in due]

    def retry(
        self, job_id: int | None = None, delivery_ids: list[int] | None = None, operator: str = "operator"
    ) -> list[tuple[int, DeliveryState]]:
        """Manual retry of dead-lettered (or waiting) deliveries of one job, attempted at once."""
        with session_scope(self.session_factory) as s:
            q = select(Delivery).where(
                Delivery.state.in_([DeliveryState.DEAD_LETTER, DeliveryState.RETRY_WAIT, DeliveryState.PENDING])
            )
            if job_id is not None:
                q = q.where(Delivery.job_pk == job_id)
            if delivery_ids:
                q = q.where(Delivery.id.in_(delivery_ids))
            ids = []
            for d in s.scalars(q.order_by(Delivery.id)):
                audit(
                    s,
                    operator,
                    "delivery.manual_retry",
                    "delivery",
                    d.id,
                    previous_state=d.state.value,
                    job_id=d.job_pk,
                )
                d.state, d.next_attempt_at = DeliveryState.PENDING, self.clock()
                ids.append(d.id)
        return [(i, self.attempt(i)) for i in ids]

    # -- background loop ---------------------------------------------------------------------------------------
    def start(self, interval: float = 5.0) -> None:
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.run_due()
                except Exception:
                    log.exception("delivery loop failed")

        self._thread = threading.Thread(target=loop, name="deliveries", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


#: The name the composition root (``lesiontrack.service``) imports.
ResultSenderService = DeliveryService
