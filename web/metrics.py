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

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

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


class DatabaseCollector:
    """A prometheus-client custom collector over the LesionTrack tables."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.sf = session_factory

    def describe(self) -> list[Metric]:
        return []  # no eager collection at registration time

    def collect(self) -> Iterator[Metric]:
        with session_scope(self.sf) as s:
            instances = (
                s.scalar(
                    select(func.count(Instance.id))
                    .join(Series, Instance.series_pk == Series.id)
                    .where(Series.created_by_us.is_(False))
                )
                or 0
            )
            jobs = {
                k: v
                for k, v in s.execute(select(AnalysisJob.state, func.count(AnalysisJob.id)).group_by(AnalysisJob.state))
            }
            timings = [t for (t,) in s.execute(select(AnalysisJob.step_timings)) if t]
            deliveries = {
                k: v for k, v in s.execute(select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state))
            }
            attempts = list(s.execute(select(Delivery.state, Delivery.attempts)))
            candidates = {
                k: v
                for k, v in s.execute(
                    select(NewLesionCandidate.state, func.count(NewLesionCandidate.id)).group_by(
                        NewLesionCandidate.state
                    )
                )
            }
            latest = (
                select(func.max(LesionObservation.id))
                .group_by(LesionObservation.lesion_pk, LesionObservation.series_instance_uid)
                .scalar_subquery()
            )
            reviews = {
                bool(k): v
                for k, v in s.execute(
                    select(LesionObservation.review, func.count(LesionObservation.id))
                    .where(LesionObservation.id.in_(latest))
                    .group_by(LesionObservation.review)
                )
            }
            skipped: dict[str, int] = {}
            for (details,) in s.execute(
                select(AuditEvent.details).where(AuditEvent.action.in_(("series.complete", "series.reevaluated")))
            ):
                if details and details.get("decision") == "skip":
                    code = str(details.get("reason_code") or "other")
                    skipped[code] = skipped.get(code, 0) + 1

        c = CounterMetricFamily(
            "lesiontrack_instances_received", "DICOM instances received and stored (our own SEG/SR not counted)"
        )
        c.add_metric([], float(instances))
        yield c

        g = GaugeMetricFamily("lesiontrack_jobs", "Analysis jobs by state", labels=["state"])
        for state in JobState:
            g.add_metric([state.value], float(jobs.get(state, 0)))
        yield g

        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for t in timings:
            for step, seconds in t.items():
                if isinstance(seconds, (int, float)):
                    sums[step] = sums.get(step, 0.0) + float(seconds)
                    counts[step] = counts.get(step, 0) + 1
        sm = SummaryMetricFamily("lesiontrack_job_step_duration_seconds", "Duration of analysis steps", labels=["step"])
        for step in sorted(sums):
            sm.add_metric([step], count_value=counts[step], sum_value=sums[step])
        yield sm

        failures = sum(max(0, (n or 0) - (1 if st == DeliveryState.DELIVERED else 0)) for st, n in attempts)
        f = CounterMetricFamily("lesiontrack_send_failures", "Failed attempts to deliver results to a destination")
        f.add_metric([], float(failures))
        yield f

        sk = CounterMetricFamily(
            "lesiontrack_series_skipped", "Series the routing rules skipped, by reason code", labels=["reason"]
        )
        for code in sorted(skipped):
            sk.add_metric([code], float(skipped[code]))
        yield sk

        d = GaugeMetricFamily("lesiontrack_deliveries", "Result deliveries by state", labels=["state"])
        for dstate in DeliveryState:
            d.add_metric([dstate.value], float(deliveries.get(dstate, 0)))
        yield d

        nc = GaugeMetricFamily(
            "lesiontrack_new_lesion_candidates", "New-lesion candidates by operator decision", labels=["state"]
        )
        for cstate in CandidateState:
            nc.add_metric([cstate.value], float(candidates.get(cstate, 0)))
        yield nc

        lr = GaugeMetricFamily(
            "lesiontrack_lesion_results",
            "Latest result of every lesion on every series, by review flag (pipeline.confidence)",
            labels=["review"],
        )
        lr.add_metric(["flagged"], float(reviews.get(True, 0)))
        lr.add_metric(["not_flagged"], float(reviews.get(False, 0)))
        yield lr


def make_registry(session_factory: sessionmaker[Session]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session_factory))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
