"""In-process executor: worker thread(s) inside ``lesiontrack serve`` claiming jobs from the database.

Threads poll the database (and are woken by :meth:`submit`), so jobs created while the process was down,
retries whose back-off has ended and jobs orphaned by a crashed process are all picked up without a broker.
The default of one thread keeps one GPU job at a time.
"""

from __future__ import annotations

import logging
import threading

from lesiontrack.pipeline.jobs.analysis import AnalysisService

log = logging.getLogger(__name__)


class InProcessExecutor:
    def __init__(self, service: AnalysisService, threads: int = 1, poll_seconds: float = 2.0) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.service = service
        self.n_threads = threads
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        requeued = self.service.store.recover_orphans(self.service.worker)
        if requeued:
            log.warning("requeued %d job(s) left running by a dead process: %s", len(requeued), requeued)
        for n in range(self.n_threads):
            t = threading.Thread(target=self._loop, name=f"lesiontrack-job-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job_id: int) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.service.store.recover_orphans(self.service.worker)
                ran = self.service.run_next()
            except Exception:
                log.exception("job loop error")
                ran = None
            if ran is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def stop(self, timeout: float = 30.0) -> None:
        self.service.request_stop()
        self._stopping.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning(
                "job threads still busy after %.0fs: %s (their job is requeued when its lease expires)", timeout, alive
            )
        self._threads.clear()
