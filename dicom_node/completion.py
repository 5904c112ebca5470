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

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import RoutingSettings
from db.models import RoutingDecision, Series, SeriesState
from db.repository import audit
from db.session import session_scope
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
) -> Route | None:
    """Mark one series complete, record the routing decision and trigger analysis when routed.

    Returns None when the series is unknown, or (unless ``forced``) when it is already complete with nothing
    received since, e.g. because an operator forced its completion from another process.
    """
    with session_scope(session_factory) as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            return None
        if not forced and series.state == SeriesState.COMPLETE:
            return None
        retrigger = series.completed_at is not None
        route = decide(series_facts(s, series), rules)
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
    if route.decision == RoutingDecision.ANALYSE and on_series_complete is not None:
        try:
            on_series_complete(series_uid)
        except Exception as exc:
            log.exception("on_series_complete(%s) failed", series_uid)
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
    ) -> None:
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

    def association_closed(self, association: int) -> None:
        with self._lock:
            for p in self._pending.values():
                p.senders.discard(association)

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
                complete_series(self.session_factory, self.rules, uid, self.on_series_complete, actor=self.actor)
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
            self.session_factory, self.rules, series_uid, self.on_series_complete, forced=True, actor=self.actor
        )

    def trigger(self, series_uid: str, actor: str = "pacs-trigger") -> Route | None:
        """An explicit "series is stable" signal (a PACS's OnStableSeries, ``POST /api/series/{uid}/complete``):
        complete now instead of after the quiet period. Idempotent: None when the series is unknown or already
        complete with nothing received since (then no second job is queued)."""
        with self._lock:
            self._pending.pop(series_uid, None)
        return complete_series(self.session_factory, self.rules, series_uid, self.on_series_complete, actor=actor)

    def resume_from_db(self) -> int:
        """After a restart: series left RECEIVING get a fresh quiet period."""
        with session_scope(self.session_factory) as s:
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
