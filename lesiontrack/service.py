"""Composition root of the running service: DICOM SCP + job executor + HTTP API in one process.

``LesionTrackService(settings).start()`` migrates the database, builds the prior source and result sender
(``dicom_node``), the analysis service with its steps (``pipeline.jobs.steps``), the executor (in-process threads,
or Celery publishing when ``worker.executor = "celery"``), the Storage SCP whose completed series become jobs,
and the HTTP API when ``web`` provides ``create_app``. ``stop()`` shuts down gracefully: first stop
accepting associations, then let the running step finish and requeue its job, then stop sending and HTTP.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import ConfigError, Settings

if TYPE_CHECKING:  # the analysis stack loads when the service starts (see build_analysis_service), not on import
    import uvicorn

    from lesiontrack.dicom_node.inbound.scp import StorageSCP
    from lesiontrack.pipeline.jobs.analysis import AnalysisService
    from lesiontrack.pipeline.jobs.executors import Executor
    from lesiontrack.pipeline.jobs.ports import PriorSource, ResultSender
    from lesiontrack.pipeline.jobs.store import JobStore
    from lesiontrack.web.jobcontrol import Completion, CorrectionTaken

# The layers are imported where they are used, not here: each is optional in a process (a worker runs no DICOM node,
# a read-only deployment no web server, Celery only with worker.executor = "celery"; build_ports falls back when
# dicom_node cannot be imported), and the analysis stack costs seconds that `lesiontrack --help` must not pay.
log = logging.getLogger(__name__)

PipelineFactory = Callable[..., tuple[list[Any], Any]]
DEFAULT_PIPELINE = "lesiontrack.pipeline.jobs.steps:build_pipeline"


def load_pipeline(spec: str) -> PipelineFactory:
    """``MODULE:FACTORY`` → the factory; ``factory(settings, session_factory, prior_source, sender)``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"pipeline must look like MODULE:FACTORY, got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def check_engine_settings(settings: Settings) -> None:
    """Fail start-up (ConfigError naming the key) when a configured engine is unknown, not installed or lacks
    its weights, instead of failing every job later at the register/track step."""
    # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
    from lesiontrack.models.engines import check_engines

    problems = check_engines(settings.engines)
    if problems:
        raise ConfigError("; ".join(str(p) for p in problems), key=problems[0].key)


def build_ports(settings: Settings, session_factory: sessionmaker[Session]) -> tuple[PriorSource, ResultSender]:
    """The dicom_node implementations of ``pipeline.jobs.ports.PriorSource`` and ``ResultSender``."""
    # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
    from lesiontrack.dicom_node.outbound.priors import PriorFinder
    from lesiontrack.dicom_node.outbound.sending import DeliveryService  # lazy, as above

    return PriorFinder(settings, session_factory), DeliveryService(settings, session_factory)


def build_analysis_service(
    settings: Settings,
    session_factory: sessionmaker[Session],
    factory: PipelineFactory,
    *,
    kind: str = "worker",
    ports: tuple[PriorSource | None, ResultSender | None] | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> AnalysisService:
    # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
    from lesiontrack.pipeline.jobs.analysis import AnalysisService, RetryPolicy
    from lesiontrack.pipeline.jobs.store import worker_identity  # lazy, as above

    if ports is None:
        ports = _ports_or_none(settings, session_factory)
    steps, services = factory(settings, session_factory, *ports)
    # A pipeline's services may say how to make the in-memory state of one attempt (PipelineServices.new_state).
    new_state = getattr(services, "new_state", None)
    return AnalysisService(
        session_factory,
        steps,
        services,
        state_factory=new_state if callable(new_state) else (lambda: None),
        retry=RetryPolicy.from_settings(settings.worker),
        worker=worker_identity(kind),
        device=settings.compute.device,
        progress=progress,
        lease_seconds=settings.worker.lease_seconds,
    )


def _ports_or_none(
    settings: Settings, session_factory: sessionmaker[Session]
) -> tuple[PriorSource | None, ResultSender | None]:
    try:
        return build_ports(settings, session_factory)
    except ImportError as exc:
        log.warning("DICOM prior source / sender unavailable (%s); only pipelines without them can run", exc)
        return None, None


@dataclass
class JobControl:
    """What the HTTP API may ask of the job machinery (retry a job, re-analyse a series) and of the DICOM node
    (complete a series on the PACS's signal, analyse a skipped series anyway)."""

    store: JobStore
    submit: Callable[[int], None]
    settings: Settings | None = None
    session_factory: sessionmaker[Session] | None = None
    scp: StorageSCP | None = None
    on_series_complete: Callable[[str], None] | None = None
    on_annotation_complete: Callable[[str], None] | None = None

    def complete_series(self, series_uid: str, expected_instances: int | None = None) -> Completion | None:
        # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
        from lesiontrack.dicom_node.inbound.completion import answer_request, request_completion

        # lazy: the web app, ~10 s at import; only HTTP needs it
        from lesiontrack.web.jobcontrol import Completion

        if self.scp is not None:
            outcome = self.scp.completion.trigger(series_uid, expected_instances=expected_instances)
        else:  # the DICOM node runs in another process: its completion poll answers the request if not done now
            assert self.settings is not None
            assert self.session_factory is not None
            request_completion(
                self.session_factory, series_uid, expected_instances, self.settings.dicom.trigger_wait_seconds
            )
            answered = answer_request(
                self.session_factory,
                self.settings.routing,
                series_uid,
                self.on_series_complete,
                analyse_incomplete=self.settings.dicom.analyse_incomplete_transfers,
                on_annotation_complete=self.on_annotation_complete,
            )
            assert answered is not None
            outcome = answered
        if outcome.pending:
            return Completion(
                "pending",
                "waiting for the instances the PACS sent to be indexed",
                pending=True,
                indexed=outcome.indexed,
                expected_instances=outcome.expected,
            )
        route = outcome.route
        if route is None:
            return None
        latest = self.store.latest_for_series(series_uid) if not route.skipped else None
        return Completion(
            route.decision.value,
            route.reason,
            latest.id if latest is not None else None,
            indexed=outcome.indexed,
            expected_instances=outcome.expected,
        )

    def analyse_anyway(self, series_uid: str, actor: str) -> int:
        # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
        from lesiontrack.dicom_node.inbound.skipped import analyse_anyway

        assert self.session_factory is not None
        analyse_anyway(self.session_factory, series_uid, actor)
        job = self.store.create(series_uid, reason=f"analysis requested by {actor} although skipped", actor=actor)
        self.submit(job)
        return int(job)

    def take_correction(self, data: bytes, actor: str) -> CorrectionTaken:
        """An uploaded corrected SEG/SR: stored like a received instance (durably, de-duplicated), its series
        completed, and taken in as a verification (the operator is the verifier unless ContentCreatorName says)."""
        # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
        from lesiontrack.dicom_node.inbound.completion import complete_series
        from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_part10  # lazy, as above
        from lesiontrack.dicom_node.inbound.scp import storage_root  # lazy, as above
        from lesiontrack.dicom_node.inbound.storage import InstanceStore  # lazy, as above
        from lesiontrack.pipeline.jobs.verification import take_in_series  # lazy, as above

        # lazy: the web app, ~10 s at import; only HTTP needs it
        from lesiontrack.web.jobcontrol import CorrectionTaken

        if self.settings is None or self.session_factory is None:
            raise RuntimeError("corrections are taken in by the process that runs the DICOM node")
        ingestor = Ingestor(
            InstanceStore(storage_root(self.settings), fsync=self.settings.dicom.fsync), self.session_factory
        )
        try:
            result = ingest_part10(ingestor, data, None)
        finally:
            ingestor.close()
        if not result.ok or result.series_uid is None or result.sop_instance_uid is None:
            raise ValueError(f"upload not stored: {result.comment or f'status 0x{result.status:04X}'}")
        complete_series(self.session_factory, self.settings.routing, result.series_uid, None, forced=True, actor=actor)
        jobs = take_in_series(
            self.session_factory, self.settings.verification, result.series_uid, actor=actor, operator=actor
        )
        for job in jobs:
            self.submit(job)
        if jobs:
            detail = f"correction {result.sop_instance_uid} taken in; adoption job(s) {', '.join(map(str, jobs))}"
        else:
            detail = (
                f"stored {result.sop_instance_uid}; no correction of an analysed follow-up taken in (see the series)"
            )
        return CorrectionTaken(result.series_uid, result.sop_instance_uid, jobs, detail)

    def retry(self, job_id: int) -> int:
        new = int(self.store.retry(job_id, actor="api"))
        self.submit(new)
        return new

    def reanalyse(self, series_uid: str) -> int:
        latest = self.store.latest_for_series(series_uid)
        job = self.store.create(
            series_uid,
            reason="re-analysis requested",
            actor="api",
            supersedes=latest.id if latest is not None else None,
        )
        self.submit(job)
        return int(job)


class LesionTrackService:
    """Everything ``lesiontrack serve`` runs; also used by the demo, the tests and the benchmark."""

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: str | PipelineFactory = DEFAULT_PIPELINE,
        dicom: bool = True,
        http: bool | None = None,
        jobs: bool = True,
        progress: Callable[[int, str], None] | None = None,
        upgrade_db: bool = True,
    ) -> None:
        self.settings = settings
        self.upgrade_db = upgrade_db
        self.pipeline = load_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        self.enable_dicom = dicom
        self.enable_http = settings.http.enabled if http is None else http
        self.enable_jobs = jobs
        self.progress = progress
        self.session_factory: sessionmaker[Session] | None = None
        self.scp: StorageSCP | None = None
        self.executor: Executor | None = None
        self.analysis: AnalysisService | None = None
        self.sender: ResultSender | None = None
        self.job_store: JobStore | None = None
        self._http_server: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> LesionTrackService:
        # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
        from lesiontrack.dicom_node.database import open_database
        from lesiontrack.pipeline.jobs.store import JobStore  # lazy, as above

        check_engine_settings(self.settings)
        Path(self.settings.data_dir).mkdir(parents=True, exist_ok=True)
        self.session_factory = open_database(self.settings, upgrade_db=self.upgrade_db, require_writable=True)
        self.job_store = JobStore(self.session_factory, actor="service")
        prior_source, self.sender = _ports_or_none(self.settings, self.session_factory)
        if self.settings.worker.executor == "celery":
            # lazy: Celery (2 s at import) only for the scale-out executor
            from lesiontrack.pipeline.jobs.executors.celery_app import CeleryExecutor

            self.executor = CeleryExecutor(self.settings)
        elif self.enable_jobs:
            # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
            from lesiontrack.pipeline.jobs.executors.inprocess import InProcessExecutor

            self.analysis = build_analysis_service(
                self.settings,
                self.session_factory,
                self.pipeline,
                kind="serve",
                ports=(prior_source, self.sender),
                progress=self.progress,
            )
            self.executor = InProcessExecutor(self.analysis)
        if self.executor is not None:
            self.executor.start()
        if self.sender is not None and hasattr(self.sender, "start"):
            self.sender.start()
        if self.enable_dicom:
            # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
            from lesiontrack.dicom_node.inbound.scp import StorageSCP

            self.scp = StorageSCP(
                self.settings, self.session_factory, self.on_series_complete, self.on_annotation_complete
            ).start()
        if self.enable_http:
            self._start_http()
        return self

    def on_series_complete(self, series_uid: str) -> None:
        """The SCP's callback: a routed series becomes a job (a re-trigger supersedes a finished one)."""
        if self.job_store is None:
            raise RuntimeError("a series completed before the service opened its job store")
        job_id = self.job_store.create(series_uid, reason="series complete", actor="dicom-node")
        log.debug("series %s → job %s", series_uid, job_id)
        if self.executor is not None:
            self.executor.submit(job_id)

    def on_annotation_complete(self, series_uid: str) -> None:
        """An annotation series (SEG, SR, GSPS, RTSTRUCT) that is not ours completed: a reader's correction of a
        follow-up we analysed is taken in and its adoption job queued (verified tracking), an annotation arriving
        after results it changes queues their re-analysis; any other annotation stays a prior annotation."""
        # lazy: DICOM node and job runner, ~5 s at import (pynetdicom, pipeline)
        from lesiontrack.pipeline.jobs.verification import take_in_series

        if self.session_factory is None:
            raise RuntimeError("a series completed before the service opened its database")
        for job_id in take_in_series(self.session_factory, self.settings.verification, series_uid):
            if self.executor is not None:
                self.executor.submit(job_id)

    def jobs(self) -> JobStore:
        """The job store of the started service."""
        if self.job_store is None:
            raise RuntimeError("the service has not been started")
        return self.job_store

    def job_control(self) -> JobControl:
        return JobControl(
            self.jobs(),
            self.executor.submit if self.executor else (lambda _id: None),
            settings=self.settings,
            session_factory=self.session_factory,
            scp=self.scp,
            on_series_complete=self.on_series_complete,
            on_annotation_complete=self.on_annotation_complete,
        )

    def _start_http(self) -> None:
        try:
            # lazy: the web app, ~10 s at import; only HTTP needs it
            from lesiontrack.web import create_app
        except ImportError as exc:
            log.warning("HTTP API not available (%s); running without it", exc)
            return
        # lazy: the web app, ~10 s at import; only HTTP needs it
        import uvicorn

        if self.session_factory is None:
            raise RuntimeError("the HTTP API starts after the database is open")
        app = create_app(self.settings, self.session_factory, self.job_control())
        cfg = uvicorn.Config(
            app,
            host=self.settings.http.bind_address,
            port=self.settings.http.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._http_server = server = uvicorn.Server(cfg)
        server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]  # serve() runs off the main thread
        self._http_thread = threading.Thread(target=self._http_server.run, name="http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + 30
        while not self._http_server.started and time.monotonic() < deadline and self._http_thread.is_alive():
            time.sleep(0.02)

    @property
    def http_port(self) -> int | None:
        srv = self._http_server
        if srv is None or not srv.started:
            return None
        for server in srv.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return None

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting associations, finish (or requeue) the running step, stop sending and HTTP."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.scp is not None:
            self.scp.stop()
        if self.executor is not None:
            self.executor.stop(timeout)
        if self.sender is not None and hasattr(self.sender, "stop"):
            self.sender.stop()
        if self._http_server is not None:
            self._http_server.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(10)
        log.info("LesionTrack service stopped")

    def run_until_signal(self) -> None:
        """Block until SIGINT/SIGTERM, then shut down gracefully."""
        stop = threading.Event()

        def _handler(signum: int, _frame: FrameType | None) -> None:
            log.warning("received signal %s, shutting down", signum)
            stop.set()

        old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)

    def __enter__(self) -> LesionTrackService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
