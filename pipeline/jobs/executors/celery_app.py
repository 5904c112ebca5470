"""Celery executor for scale-out: Redis broker, ``lesiontrack worker`` processes sharing PostgreSQL and storage.

Messages carry only a job id. Workers acknowledge late (after the job), prefetch one message and run one job at a
time (solo pool); the broker's visibility timeout (``worker.visibility_timeout_seconds``) is longer than the longest
job, so a message of a killed worker is redelivered. Whether a job runs is decided by the atomic claim in the
database (``pipeline.jobs.store``), never by the broker: duplicates and redeliveries are harmless. Each worker also
sweeps the database: at start-up it requeues jobs of dead processes and publishes every claimable job, and while
running it republishes jobs whose lease expired or whose retry back-off has ended.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from lesiontrack.config.settings import Settings
from lesiontrack.db.models import JobState
from lesiontrack.pipeline.jobs.store import utcnow

log = logging.getLogger(__name__)

TASK_NAME = "lesiontrack.run_job"
QUEUE = "lesiontrack.jobs"

# The AnalysisService of this worker process (set by ``lesiontrack worker`` before the worker starts).
_service: Any = None


def make_celery(settings: Settings) -> Celery:
    app = Celery("lesiontrack", broker=settings.worker.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.worker.visibility_timeout_seconds},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    @app.task(name=TASK_NAME, bind=True)
    def run_job(task: Any, job_id: int) -> str | None:

        if _service is None:
            raise RuntimeError("no analysis service in this worker process (start it with `lesiontrack worker`)")
        outcome = _service.run(int(job_id))
        if outcome is JobState.QUEUED:  # requeued by a warm shutdown: hand it to the other workers
            task.app.send_task(TASK_NAME, args=[int(job_id)])
        elif outcome is JobState.RETRY_WAIT:
            view = _service.store.get(int(job_id))

            delay = max(0.0, (view.next_retry_at - utcnow()).total_seconds()) if view.next_retry_at else 0.0
            task.app.send_task(TASK_NAME, args=[int(job_id)], countdown=delay)
        return outcome.value if outcome is not None else None

    return app


class CeleryExecutor:
    """Publishing side (``serve`` with ``worker.executor = "celery"``, ``jobs retry``)."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.app = app or make_celery(settings)

    def start(self) -> None:
        pass

    def submit(self, job_id: int) -> None:
        self.app.send_task(TASK_NAME, args=[int(job_id)])

    def stop(self, timeout: float = 30.0) -> None:
        pass


class Sweeper:
    """Publishes jobs the broker may not know about (orphans, ended back-offs); duplicates are harmless."""

    def __init__(self, app: Celery, service: Any, interval: float = 10.0) -> None:
        self.app, self.service, self.interval = app, service, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._published: dict[int, Any] = {}

    def sweep(self, everything: bool = False) -> list[int]:

        store = self.service.store
        ids = set(store.recover_orphans(self.service.worker))
        if everything:
            for j in store.claimable_ids(limit=1000):
                self._published[j] = store.get(j).next_retry_at
                ids.add(j)
        else:
            for j in store.claimable_ids(limit=1000):
                view = store.get(j)
                if j in self._published and (view.state is JobState.QUEUED or self._published[j] == view.next_retry_at):
                    continue  # queued jobs once (e.g. created by `complete-series`), each back-off end once
                self._published[j] = view.next_retry_at
                ids.add(j)
        for job_id in sorted(ids):
            self.app.send_task(TASK_NAME, args=[job_id])
        return sorted(ids)

    def start(self) -> None:
        published = self.sweep(everything=True)
        if published:
            log.info("published %d claimable job(s) at start-up: %s", len(published), published)
        self._thread = threading.Thread(target=self._loop, name="lesiontrack-sweeper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")

    def stop(self) -> None:
        self._stop.set()
