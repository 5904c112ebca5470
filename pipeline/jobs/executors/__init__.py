"""Executors run analysis jobs; all of them share one small interface and treat the database as the truth.

* :class:`pipeline.jobs.executors.inprocess.InProcessExecutor` — worker thread(s) inside ``lesiontrack serve``
  (embedded default, one GPU job at a time).
* :class:`pipeline.jobs.executors.celery_app.CeleryExecutor` — publishes job ids to Celery/Redis; any number of
  ``lesiontrack worker`` processes (sharing the PostgreSQL database and storage path) run them.

Submitting a job id only *wakes* an executor: whoever claims the job in the database first runs it, so a
duplicate message, a redelivery after a crash or a sweep after restart can never run a job twice.
"""

from __future__ import annotations

from typing import Protocol


class Executor(Protocol):
    def start(self) -> None:
        """Requeue jobs left running by dead processes, then begin taking work."""
        ...

    def submit(self, job_id: int) -> None:
        """A job was created or became due; run it when possible."""
        ...

    def stop(self, timeout: float = 30.0) -> None:
        """Claim nothing new; let the running step finish, requeue the job, return."""
        ...
