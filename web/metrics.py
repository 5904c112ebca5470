"""Prometheus metrics computed from the database at scrape time (so every process — receiver, workers, sender —
is counted, whichever one serves ``/metrics``).

Exposed: ``lesiontrack_instances_received_total``, ``lesiontrack_jobs{state}``,
``lesiontrack_job_step_duration_seconds{step}`` (summary: sum and count over recorded steps),
``lesiontrack_send_failures_total`` (failed delivery attempts), ``lesiontrack_deliveries{state}``,
``lesiontrack_series_skipped_total{reason}`` (skip decisions of the routing rules by reason code, from the audit
trail: every completion or re-evaluation that skipped a series counts once),
``lesiontrack_new_lesion_candidates{state}`` (unconfirmed ones await an operator),
``lesiontrack_lesion_results{review}`` (the latest result of every lesion on every series, by review flag:
``flagged`` ones have a confidence below ``tracking.review_threshold`` or disagree with their neighbour).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from lesiontrack.db.models import (
    AnalysisJob,
    AuditEvent,
    CandidateState,
    Delivery,
    DeliveryState,
    Instance,
    JobState,
    LesionObservation,
    NewLesionCandidate,
    Series,
)
from lesiontrack.db.session import session_scope


@dataclass(frozen=True)
class _Snapshot:
    """What one scrape reads from the database."""

    instances: int
    jobs: Mapping[JobState, int]
    timings: list[Mapping[str, object]]
    deliveries: Mapping[DeliveryState, int]
    attempts: list[tuple[DeliveryState, int]]
    candidates: Mapping[CandidateState, int]
    reviews: Mapping[bool, int]
    skipped: Mapping[str, int]


K = TypeVar("K")


def _count_by(s: Session, key: InstrumentedAttribute[K], pk: InstrumentedAttribute[int]) -> dict[K, int]:
    return {k: v for k, v in s.execute(select(key, func.count(pk)).group_by(key))}


def _received_instances(s: Session) -> int:
    return (
        s.scalar(
            select(func.count(Instance.id))
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.created_by_us.is_(False))
        )
        or 0
    )


def _latest_reviews(s: Session) -> dict[bool, int]:
    """The latest observation of every lesion on every series, counted by review flag."""
    latest = (
        select(func.max(LesionObservation.id))
        .group_by(LesionObservation.lesion_pk, LesionObservation.series_instance_uid)
        .scalar_subquery()
    )
    return {
        bool(k): v
        for k, v in s.execute(
            select(LesionObservation.review, func.count(LesionObservation.id))
            .where(LesionObservation.id.in_(latest))
            .group_by(LesionObservation.review)
        )
    }


def _skips_by_reason(s: Session) -> dict[str, int]:
    skipped: dict[str, int] = {}
    for (details,) in s.execute(
        select(AuditEvent.details).where(AuditEvent.action.in_(("series.complete", "series.reevaluated")))
    ):
        if details and details.get("decision") == "skip":
            code = str(details.get("reason_code") or "other")
            skipped[code] = skipped.get(code, 0) + 1
    return skipped


def _snapshot(s: Session) -> _Snapshot:
    return _Snapshot(
        instances=_received_instances(s),
        jobs=_count_by(s, AnalysisJob.state, AnalysisJob.id),
        timings=[t for (t,) in s.execute(select(AnalysisJob.step_timings)) if t],
        deliveries=_count_by(s, Delivery.state, Delivery.id),
        attempts=[(st, n) for st, n in s.execute(select(Delivery.state, Delivery.attempts))],
        candidates=_count_by(s, NewLesionCandidate.state, NewLesionCandidate.id),
        reviews=_latest_reviews(s),
        skipped=_skips_by_reason(s),
    )


def _instances_metric(snap: _Snapshot) -> Metric:
    c = CounterMetricFamily(
        "lesiontrack_instances_received", "DICOM instances received and stored (our own SEG/SR not counted)"
    )
    c.add_metric([], float(snap.instances))
    return c


def _jobs_metric(snap: _Snapshot) -> Metric:
    g = GaugeMetricFamily("lesiontrack_jobs", "Analysis jobs by state", labels=["state"])
    for state in JobState:
        g.add_metric([state.value], float(snap.jobs.get(state, 0)))
    return g


def _step_durations_metric(snap: _Snapshot) -> Metric:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for t in snap.timings:
        for step, seconds in t.items():
            if isinstance(seconds, (int, float)):
                sums[step] = sums.get(step, 0.0) + float(seconds)
                counts[step] = counts.get(step, 0) + 1
    sm = SummaryMetricFamily("lesiontrack_job_step_duration_seconds", "Duration of analysis steps", labels=["step"])
    for step in sorted(sums):
        sm.add_metric([step], count_value=counts[step], sum_value=sums[step])
    return sm


def _send_failures_metric(snap: _Snapshot) -> Metric:
    failures = sum(max(0, (n or 0) - (1 if st == DeliveryState.DELIVERED else 0)) for st, n in snap.attempts)
    f = CounterMetricFamily("lesiontrack_send_failures", "Failed attempts to deliver results to a destination")
    f.add_metric([], float(failures))
    return f


def _skipped_metric(snap: _Snapshot) -> Metric:
    sk = CounterMetricFamily(
        "lesiontrack_series_skipped", "Series the routing rules skipped, by reason code", labels=["reason"]
    )
    for code in sorted(snap.skipped):
        sk.add_metric([code], float(snap.skipped[code]))
    return sk


def _deliveries_metric(snap: _Snapshot) -> Metric:
    d = GaugeMetricFamily("lesiontrack_deliveries", "Result deliveries by state", labels=["state"])
    for dstate in DeliveryState:
        d.add_metric([dstate.value], float(snap.deliveries.get(dstate, 0)))
    return d


def _candidates_metric(snap: _Snapshot) -> Metric:
    nc = GaugeMetricFamily(
        "lesiontrack_new_lesion_candidates", "New-lesion candidates by operator decision", labels=["state"]
    )
    for cstate in CandidateState:
        nc.add_metric([cstate.value], float(snap.candidates.get(cstate, 0)))
    return nc


def _lesion_results_metric(snap: _Snapshot) -> Metric:
    lr = GaugeMetricFamily(
        "lesiontrack_lesion_results",
        "Latest result of every lesion on every series, by review flag (pipeline.science.confidence)",
        labels=["review"],
    )
    lr.add_metric(["flagged"], float(snap.reviews.get(True, 0)))
    lr.add_metric(["not_flagged"], float(snap.reviews.get(False, 0)))
    return lr


#: the exposed families, in exposition order
_FAMILIES: tuple[Callable[[_Snapshot], Metric], ...] = (
    _instances_metric,
    _jobs_metric,
    _step_durations_metric,
    _send_failures_metric,
    _skipped_metric,
    _deliveries_metric,
    _candidates_metric,
    _lesion_results_metric,
)


class DatabaseCollector:
    """A prometheus-client custom collector over the LesionTrack tables."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.sf = session_factory

    def describe(self) -> list[Metric]:
        return []  # no eager collection at registration time

    def collect(self) -> Iterator[Metric]:
        with session_scope(self.sf) as s:
            snap = _snapshot(s)
        for family in _FAMILIES:
            yield family(snap)


def make_registry(session_factory: sessionmaker[Session]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session_factory))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
