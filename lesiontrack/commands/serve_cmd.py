"""`lesiontrack serve`: Storage SCP, delivery retries, analysis jobs and HTTP API until Ctrl-C / SIGTERM."""

from __future__ import annotations

import typer

from lesiontrack.context import state


def serve(
    ctx: typer.Context,
    port: int | None = typer.Option(None, help="override dicom.port"),
    upgrade_db: bool = typer.Option(False, "--upgrade-db", help="apply database migrations first"),
    pipeline: str = typer.Option(
        "lesiontrack.pipeline.jobs.steps:build_pipeline",
        hidden=True,
        help="MODULE:FACTORY of the analysis steps (tests)",
    ),
) -> None:
    """Receive DICOM from the PACS, analyse completed follow-ups (jobs), serve the HTTP API; SIGTERM stops cleanly."""
    # SCP + delivery loop + job executor + HTTP API in one process (lesiontrack.service).
    from lesiontrack.config.logging import setup_logging
    from lesiontrack.config.settings import ConfigError  # lazy: CLI start-up
    from lesiontrack.dicom_node.database import DatabaseUnavailable, SchemaNotCurrent  # lazy: CLI start-up
    from lesiontrack.service import LesionTrackService  # lazy: CLI start-up

    settings = state(ctx).settings()
    if port is not None:
        settings.dicom.port = port
    setup_logging(settings.logging.level, settings.logging.json_format, settings.logging.library_level)
    try:
        service = LesionTrackService(settings, pipeline=pipeline, upgrade_db=upgrade_db).start()
    except (SchemaNotCurrent, ConfigError, DatabaseUnavailable) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    except (OSError, RuntimeError) as exc:  # e.g. a read-only data folder, a receiver process that did not start
        typer.secho(f"error: cannot start: {type(exc).__name__}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    http = f", HTTP on {settings.http.bind_address}:{service.http_port}" if service.http_port else ""
    assert service.scp is not None  # serve always runs the DICOM node (LesionTrackService(dicom=True))
    typer.echo(
        f"LesionTrack SCP {settings.dicom.ae_title} listening on {settings.dicom.bind_address}:"
        f"{service.scp.port}{http}, executor {settings.worker.executor}"
    )
    service.run_until_signal()  # SIGINT/SIGTERM: stop associations, finish or requeue the step, stop
    typer.echo("stopping")


def complete_series_cmd(
    ctx: typer.Context,
    series_uid: str = typer.Argument(..., help="SeriesInstanceUID"),
) -> None:
    """Force completion of a series now (skip the quiet period): routing is recorded, a job created if routed."""
    from lesiontrack.dicom_node.inbound.completion import complete_series  # lazy: CLI start-up

    settings = state(ctx).settings()
    sf = state(ctx).database()
    callback = None
    try:
        from lesiontrack.pipeline.jobs.store import JobStore  # lazy: CLI start-up

        store = JobStore(sf, actor="cli")

        def callback(uid: str) -> None:
            job = store.create(uid, reason="forced completion", actor="cli")
            typer.echo(f"job {job} queued for series {uid}")
    except ImportError:
        typer.secho("note: job layer not available; completion and routing are recorded only", err=True)
    route = complete_series(sf, settings.routing, series_uid, callback, forced=True, actor="cli")
    if route is None:
        typer.secho(f"error: series {series_uid} is not in the database", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"series {series_uid} complete: {route.decision.value} ({route.reason})")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("complete-series")(complete_series_cmd)
