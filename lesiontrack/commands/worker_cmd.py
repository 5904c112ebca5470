"""`lesiontrack worker`: a Celery worker that runs analysis jobs (scale-out mode, Redis broker, shared database)."""

from __future__ import annotations

import socket

import typer

from lesiontrack.context import state


def worker(
    ctx: typer.Context,
    pipeline: str = typer.Option(
        "lesiontrack.pipeline.jobs.steps:build_pipeline", help="MODULE:FACTORY returning (steps, services)"
    ),
    sweep_seconds: float = typer.Option(10.0, help="how often to look for orphaned or due jobs"),
    loglevel: str = typer.Option("INFO", help="Celery worker log level"),
) -> None:
    """Run analysis jobs from the broker, one at a time (acks late, prefetch 1); Ctrl-C / SIGTERM requeues."""
    from celery import signals  # lazy: CLI start-up

    from lesiontrack.config.settings import ConfigError  # lazy: CLI start-up

    # lazy: CLI start-up
    from lesiontrack.db.session import (
        current_revision,
        head_revision,
        make_engine,
        make_session_factory,
    )
    from lesiontrack.pipeline.jobs.executors import celery_app  # lazy: CLI start-up
    from lesiontrack.service import build_analysis_service, check_engine_settings, load_pipeline  # lazy: CLI start-up

    settings = state(ctx).settings()
    try:
        check_engine_settings(settings)
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    url = settings.effective_database_url
    rev = current_revision(url)
    if rev != head_revision():
        typer.secho(
            f"error: database schema is at {rev or '(empty)'}, not {head_revision()}: "
            "run `lesiontrack db upgrade` first",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    session_factory = make_session_factory(make_engine(url))
    factory = load_pipeline(pipeline)
    service = build_analysis_service(settings, session_factory, factory, kind="celery")
    celery_app._service = service
    app = celery_app.make_celery(settings)
    sweeper = celery_app.Sweeper(app, service, interval=sweep_seconds)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        sweeper.start()
        typer.echo(f"lesiontrack worker {service.worker} ready", err=True)

    @signals.worker_shutting_down.connect(weak=False)
    def _shutdown(**_: object) -> None:
        service.request_stop()
        sweeper.stop()

    w = app.Worker(
        pool="solo",
        concurrency=1,
        loglevel=loglevel,
        queues=[celery_app.QUEUE],
        hostname=f"lesiontrack-{socket.gethostname()}-{service.worker.split(':')[1]}",
        without_mingle=True,
        without_gossip=True,
        optimization="fair",
    )
    w.start()
    raise typer.Exit(w.exitcode or 0)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
