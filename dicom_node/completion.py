"""Series completion: quiet period with no open association still sending, forced completion, re-open on late data.

DICOM has no "series done" signal, so (like mercure, MONAI Informatics Gateway and Orthanc's StableAge) a series
is complete once ``series_quiet_seconds`` passed without a new instance *and* no association that sent part of it
is still open. Completing a series records the routing decision on it and, when the decision is ANALYSE, calls
the injected ``on_series_complete(series_uid)``. A later instance re-opens the series (see ``dicom_node.ingest``)
and its next completion triggers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import RoutingSettings
from db.models import Instance, RoutingDecision, Series, SeriesState, TransferOutcome
from db.repository import audit
from db.session import session_scope
from dicom_node.integrity import INCOMPLETE, first_header, hold_reason
from dicom_node.routing import Route, decide, series_facts

log = logging.getLogger(__name__)

SeriesCallback = Callable[[str], None]


def complete_series(
    session_factory: sessionmaker[Session],
    rules: RoutingSettings,
    series_uid: str,
    on_series_complete: SeriesCallback | None = None,
    forced: bool = False,
    actor: str = "dicom-node",
    analyse_incomplete: bool = False,
    validate: bool = True,
    on_annotation_complete: SeriesCallback | None = None,
) -> Route | None:
    """Mark one series complete, record the routing decision and trigger analysis when routed.

    A SEG/SR series that is not ours goes to ``on_annotation_complete`` (a reader's correction of a follow-up we
    analysed is verified tracking, :mod:`pipeline.verification`) whatever the routing rules say of CT analysis.

    A series routed to ANALYSE is held (SKIP, with the reason) when its transfer looks incomplete or an instance
    is invalid (:mod:`dicom_node.integrity`). Returns None when the series is unknown, or (unless ``forced``) when
    it is already complete with nothing received since, e.g. because an operator forced its completion from
    another process.
    """
    with session_scope(session_factory) as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            return None
        if not forced and series.state == SeriesState.COMPLETE:
            return None
        retrigger = series.completed_at is not None
        route = decide(series_facts(s, series), rules)
        if route.decision == RoutingDecision.ANALYSE:
            hold = hold_reason(
                s, series, first_header(s, series), forced=forced, analyse_incomplete=analyse_incomplete,
                validate=validate,
            )  # fmt: skip
            if hold:
                route = Route(RoutingDecision.SKIP, hold)
        annotation = (series.modality or "").upper() in ("SEG", "SR") and not series.created_by_us
        series.state = SeriesState.COMPLETE
        series.completed_at = datetime.now(UTC)
        series.routing_decision = route.decision
        series.routing_reason = route.reason
        audit(
            s,
            actor,
            "series.complete",
            "series",
            series_uid,
            decision=route.decision.value,
            reason=route.reason,
            reason_code=route.code,
            forced=forced,
            instance_count=series.instance_count,
            retrigger=retrigger,
        )
    log.info(
        "series %s complete (%s%s): %s - %s",
        series_uid,
        "forced, " if forced else "",
        "re-trigger" if retrigger else "first",
        route.decision.value,
        route.reason,
    )
    callback = on_series_complete if route.decision == RoutingDecision.ANALYSE else None
    if callback is None and annotation and on_annotation_complete is not None:
        callback = on_annotation_complete
    if callback is not None:
        try:
            callback(series_uid)
        except Exception as exc:
            log.exception("series-complete callback (%s) failed", series_uid)
            with session_scope(session_factory) as s:
                audit(s, actor, "series.trigger_failed", "series", series_uid, error=str(exc)[:500])
    return route


@dataclass
class _Pending:
    last_seen: float
    senders: set[int] = field(default_factory=set)


class SeriesCompletion:
    """In-memory view of series being received; a background thread completes the quiet ones."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        rules: RoutingSettings,
        quiet_seconds: float,
        on_series_complete: SeriesCallback | None = None,
        actor: str = "dicom-node",
        clock: Callable[[], float] = time.monotonic,
        analyse_incomplete: bool = False,
        validate: bool = True,
        on_annotation_complete: SeriesCallback | None = None,
    ) -> None:
        self.on_annotation_complete = on_annotation_complete
        self.analyse_incomplete = analyse_incomplete
        self.validate = validate
        self._touched: dict[int, set[str]] = {}  # association -> series it delivered instances of
        self.session_factory = session_factory
        self.rules = rules
        self.quiet_seconds = quiet_seconds
        self.on_series_complete = on_series_complete
        self.actor = actor
        self.clock = clock
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- events from the SCP -----------------------------------------------------------------------------------
    def instance_received(self, series_uid: str, association: int) -> None:
        with self._lock:
            p = self._pending.setdefault(series_uid, _Pending(self.clock()))
            p.last_seen = self.clock()
            p.senders.add(association)
        self.series_touched(series_uid, association)

    def series_touched(self, series_uid: str, association: int) -> None:
        """``association`` delivered (or re-delivered, as a duplicate) an instance of ``series_uid``."""
        with self._lock:
            seen = self._touched.setdefault(association, set())
            first = series_uid not in seen
            seen.add(series_uid)
        if first:
            self._set_outcome({series_uid}, TransferOutcome.OPEN)

    def association_released(self, association: int) -> None:
        """The peer asked to release (A-RELEASE-RQ): its transfer is complete. Recorded before our A-RELEASE-RP
        goes out, so a node killed right after the sender finished does not count the transfer as dropped."""
        with self._lock:
            touched = self._touched.pop(association, set())
        if touched:
            try:
                self._set_outcome(touched, TransferOutcome.RELEASED)
                self._requeue_held(touched)
            except Exception:
                log.exception("recording a released association failed")

    def association_closed(
        self, association: int, released: bool | None = None, association_uid: str | None = None
    ) -> None:
        """The association ended; ``released`` False = A-ABORT or dropped connection (None: not known)."""
        with self._lock:
            for p in self._pending.values():
                p.senders.discard(association)
            touched = self._touched.pop(association, set())
        if not touched or released is None:
            return
        try:
            if released:
                self._set_outcome(touched, TransferOutcome.RELEASED)
                self._requeue_held(touched)
            else:
                self._mark_aborted(touched, association_uid)
        except Exception:
            log.exception("recording how an association ended failed")

    def _set_outcome(self, series_uids: set[str], outcome: TransferOutcome) -> None:
        try:
            with session_scope(self.session_factory) as s:
                s.execute(
                    update(Series)
                    .where(Series.series_instance_uid.in_(sorted(series_uids)))
                    .values(last_transfer=outcome)
                    .execution_options(synchronize_session=False)
                )
        except Exception as exc:
            log.error("cannot record transfer state %s of %d series: %s", outcome.value, len(series_uids), exc)

    def _mark_aborted(self, series_uids: set[str], association_uid: str | None) -> None:
        with session_scope(self.session_factory) as s:
            s.execute(
                update(Series)
                .where(Series.series_instance_uid.in_(sorted(series_uids)))
                .values(last_transfer=TransferOutcome.ABORTED)
                .execution_options(synchronize_session=False)
            )
            marked = 0
            if association_uid:
                marked = s.execute(
                    update(Instance)
                    .where(Instance.association_uid == association_uid)
                    .values(transfer_incomplete=True)
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]  # an UPDATE returns a CursorResult; stubs say Result
            for uid in sorted(series_uids):
                audit(s, self.actor, "series.transfer_aborted", "series", uid, instances_marked=marked)
        log.warning(
            "association ended without A-RELEASE: %d series marked as incompletely transferred", len(series_uids)
        )

    def _requeue_held(self, series_uids: set[str]) -> None:
        """Series held for an incomplete transfer and now re-sent (even as duplicates only) over a released
        association are re-opened, so they complete again after the quiet period."""
        with session_scope(self.session_factory) as s:
            held = list(
                s.scalars(
                    select(Series).where(
                        Series.series_instance_uid.in_(sorted(series_uids)),
                        Series.state == SeriesState.COMPLETE,
                        Series.routing_reason.like(f"{INCOMPLETE}%"),
                    )
                )
            )
            uids = [h.series_instance_uid for h in held]
            for h in held:
                h.state = SeriesState.RECEIVING
                audit(s, self.actor, "series.reopened", "series", h.series_instance_uid,
                      reason="re-sent over an association that ended with A-RELEASE")  # fmt: skip
        with self._lock:
            for uid in uids:
                self._pending.setdefault(uid, _Pending(self.clock()))

    def pending(self) -> dict[str, tuple[float, int]]:
        with self._lock:
            return {k: (v.last_seen, len(v.senders)) for k, v in self._pending.items()}

    # -- completion --------------------------------------------------------------------------------------------
    def due(self) -> list[str]:
        now = self.clock()
        with self._lock:
            return [
                uid for uid, p in self._pending.items() if not p.senders and now - p.last_seen >= self.quiet_seconds
            ]

    def poll_once(self) -> list[str]:
        done = []
        for uid in self.due():
            with self._lock:
                p = self._pending.get(uid)
                if p is None or p.senders or self.clock() - p.last_seen < self.quiet_seconds:
                    continue
                del self._pending[uid]
            try:
                complete_series(
                    self.session_factory,
                    self.rules,
                    uid,
                    self.on_series_complete,
                    actor=self.actor,
                    analyse_incomplete=self.analyse_incomplete,
                    validate=self.validate,
                    on_annotation_complete=self.on_annotation_complete,
                )
                done.append(uid)
            except Exception:
                log.exception("completing series %s failed; will retry", uid)
                with self._lock:
                    self._pending.setdefault(uid, _Pending(self.clock()))
        return done

    def force_complete(self, series_uid: str) -> Route | None:
        with self._lock:
            self._pending.pop(series_uid, None)
        return complete_series(
            self.session_factory,
            self.rules,
            series_uid,
            self.on_series_complete,
            forced=True,
            actor=self.actor,
            analyse_incomplete=self.analyse_incomplete,
            validate=self.validate,
            on_annotation_complete=self.on_annotation_complete,
        )

    def trigger(self, series_uid: str, actor: str = "pacs-trigger") -> Route | None:
        """An explicit "series is stable" signal (a PACS's OnStableSeries, ``POST /api/series/{uid}/complete``):
        complete now instead of after the quiet period. Idempotent: None when the series is unknown or already
        complete with nothing received since (then no second job is queued)."""
        with self._lock:
            self._pending.pop(series_uid, None)
        return complete_series(
            self.session_factory,
            self.rules,
            series_uid,
            self.on_series_complete,
            actor=actor,
            on_annotation_complete=self.on_annotation_complete,
        )

    def resume_from_db(self) -> int:
        """After a restart: series left RECEIVING get a fresh quiet period; a transfer the node's stop cut off
        (``open``) counts as dropped."""
        with session_scope(self.session_factory) as s:
            s.execute(
                update(Series)
                .where(Series.last_transfer == TransferOutcome.OPEN)
                .values(last_transfer=TransferOutcome.ABORTED)
                .execution_options(synchronize_session=False)
            )
            uids = list(
                s.scalars(
                    select(Series.series_instance_uid).where(
                        Series.state == SeriesState.RECEIVING, Series.instance_count > 0
                    )
                )
            )
        with self._lock:
            for uid in uids:
                self._pending.setdefault(uid, _Pending(self.clock()))
        return len(uids)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        interval = min(1.0, max(0.05, self.quiet_seconds / 5))

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll_once()
                except Exception:
                    log.exception("series completion poll failed")

        self._thread = threading.Thread(target=loop, name="series-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
