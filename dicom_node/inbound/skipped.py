"""Skipped series after the fact: analyse one anyway (operator override) or re-run the routing rules over skipped
series after a rule change (``lesiontrack routing re-evaluate``). Both record the new decision on the series and
in the audit trail, and hand a routed series to the injected callback that queues its analysis job."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import RoutingSettings
from lesiontrack.db.models import RoutingDecision, Series, SeriesState
from lesiontrack.db.repository import audit
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.inbound.routing import OPERATOR_OVERRIDE_REASON, SkipCode, decide, series_facts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reevaluation:
    """One skipped series looked at again: the reason it had and the decision the current rules give."""

    series_uid: str
    old_reason: str | None
    decision: RoutingDecision
    reason: str
    code: str

    @property
    def now_routed(self) -> bool:
        return self.decision == RoutingDecision.ANALYSE


def analyse_anyway(session_factory: sessionmaker[Session], series_uid: str, actor: str) -> str | None:
    """Mark a skipped series as routed on an operator's request; returns the reason it had been skipped.

    Raises ``KeyError`` for an unknown series and ``ValueError`` for one that is not a skipped received series
    (our own SEG/SR, a series still receiving, or one already routed). The override survives later completions.
    """
    with session_scope(session_factory) as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            raise KeyError(series_uid)
        if series.created_by_us:
            raise ValueError(f"series {series_uid} is a LesionTrack result, not an input")
        if series.routing_decision != RoutingDecision.SKIP:
            raise ValueError(f"series {series_uid} is not skipped (routing: {series.routing_decision.value})")
        old = series.routing_reason
        series.routing_decision = RoutingDecision.ANALYSE
        series.routing_reason = f"{OPERATOR_OVERRIDE_REASON} {actor} (rules said: {old})"[:1000]
        audit(s, actor, "series.analyse_anyway", "series", series_uid, previous_reason=old)
    log.info("series %s: analysis requested by %s although skipped (%s)", series_uid, actor, old)
    return old


def reevaluate(
    session_factory: sessionmaker[Session],
    rules: RoutingSettings,
    on_routed: Callable[[str], object] | None = None,
    *,
    since: datetime | None = None,
    dry_run: bool = False,
    actor: str = "cli",
) -> list[Reevaluation]:
    """Re-run the routing rules over complete, skipped series (completed at or after ``since``).

    Series retrieved as priors and our own results are left alone. A series the rules now route gets the new
    decision and ``on_routed(series_uid)`` (which queues its job); one still skipped gets the current reason.
    """
    out: list[Reevaluation] = []
    with session_scope(session_factory) as s:
        q = select(Series).where(
            Series.routing_decision == RoutingDecision.SKIP,
            Series.state == SeriesState.COMPLETE,
            Series.created_by_us.is_(False),
        )
        if since is not None:
            q = q.where(Series.completed_at >= since)
        for series in s.scalars(q.order_by(Series.id)):
            route = decide(series_facts(s, series), rules)
            if route.code in (SkipCode.PRIOR, SkipCode.OWN_RESULT):
                continue
            out.append(
                Reevaluation(
                    series.series_instance_uid, series.routing_reason, route.decision, route.reason, route.code
                )
            )
            if dry_run or (route.decision == series.routing_decision and route.reason == series.routing_reason):
                continue
            old = series.routing_reason
            series.routing_decision, series.routing_reason = route.decision, route.reason
            audit(
                s,
                actor,
                "series.reevaluated",
                "series",
                series.series_instance_uid,
                decision=route.decision.value,
                reason=route.reason,
                reason_code=route.code,
                previous_reason=old,
            )
    routed = [r for r in out if r.now_routed]
    log.info("routing re-evaluated %d skipped series: %d now routed%s", len(out), len(routed), " (dry run)" * dry_run)
    if not dry_run and on_routed is not None:
        for r in routed:
            on_routed(r.series_uid)
    return out
