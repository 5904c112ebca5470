"""`lesiontrack jobs list|show|retry`: look at analysis jobs and re-run one (a new job supersedes the old)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

import typer

from lesiontrack.context import state

if TYPE_CHECKING:
    from lesiontrack.pipeline.jobs.store import JobStore

app = typer.Typer(help="Analysis jobs: list, show, retry.", no_args_is_help=True)


def _store(ctx: typer.Context) -> JobStore:
    from lesiontrack.db.session import make_engine, make_session_factory, upgrade  # lazy: CLI start-up
    from lesiontrack.pipeline.jobs.store import JobStore  # lazy: CLI start-up

    url = state(ctx).settings().effective_database_url
    upgrade(url)
    return JobStore(make_session_factory(make_engine(url)), actor="cli")


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    job_state: str | None = typer.Option(None, "--state", help="queued, running, failed, ..."),
    limit: int = typer.Option(50, help="most recent N"),
) -> None:
    """The most recent jobs with state, step, attempts and error."""
    from rich.console import Console  # lazy: CLI start-up
    from rich.table import Table  # lazy: CLI start-up

    from lesiontrack.db.models import JobState  # lazy: CLI start-up

    try:
        st = JobState(job_state) if job_state else None
    except ValueError:
        raise typer.BadParameter(f"unknown state {job_state!r}; one of {[s.value for s in JobState]}") from None
    table = Table(title="analysis jobs")
    for col in ("id", "series", "state", "step", "attempts", "created", "error"):
        table.add_column(col, overflow="fold")
    for j in _store(ctx).list(state=st, limit=limit):
        table.add_row(
            str(j.id),
            j.followup_series_uid,
            j.state.value,
            j.step or "",
            str(j.attempts),
            j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "",
            j.error or "",
        )
    Console(width=200).print(table)


@app.command("show")
def show(ctx: typer.Context, job_id: int = typer.Argument(..., help="job id")) -> None:
    """One job as JSON: state, steps with timings and outputs, error, supersession."""
    from lesiontrack.pipeline.jobs.store import JobNotFound  # lazy: CLI start-up

    try:
        view = _store(ctx).get(job_id)
    except JobNotFound as exc:
        typer.secho(f"error: {exc.args[0]}", fg="red", err=True)
        raise typer.Exit(1) from exc
    data = asdict(view)
    data["state"] = view.state.value
    typer.echo(json.dumps(data, indent=1, default=str))


@app.command("retry")
def retry(ctx: typer.Context, job_id: int = typer.Argument(..., help="job id of a finished job")) -> None:
    """Re-run a finished job's series as a NEW job; its SEG/SR supersede the old ones (never overwritten)."""
    from lesiontrack.pipeline.jobs.store import JobNotFound  # lazy: CLI start-up

    store = _store(ctx)
    try:
        new = store.retry(job_id, actor="cli")
    except (JobNotFound, ValueError) as exc:
        typer.secho(f"error: {exc.args[0]}", fg="red", err=True)
        raise typer.Exit(1) from exc
    _notify(ctx, new)
    typer.echo(f"job {new} queued (supersedes job {job_id})")


def _notify(ctx: typer.Context, job_id: int) -> None:
    """With the Celery executor, publish the job; the embedded executor polls the database itself."""
    settings = state(ctx).settings()
    if settings.worker.executor == "celery":
        from lesiontrack.pipeline.jobs.executors.celery_app import CeleryExecutor  # lazy: CLI start-up

        CeleryExecutor(settings).submit(job_id)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="jobs")
