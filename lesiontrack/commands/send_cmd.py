"""`lesiontrack send`: queue files for the configured destinations, list deliveries, or retry dead letters."""

from __future__ import annotations

from pathlib import Path

import typer

from lesiontrack.context import state


def send(
    ctx: typer.Context,
    files: list[Path] = typer.Argument(None, help="DICOM files to send to sending.destinations"),
    retry: int | None = typer.Option(
        None, "--retry", metavar="JOB", help="retry the dead-lettered / waiting deliveries of analysis job JOB"
    ),
    delivery: list[int] = typer.Option([], "--delivery", help="retry these delivery ids"),
    job: int | None = typer.Option(None, "--job", help="analysis job the sent files belong to"),
    list_: bool = typer.Option(False, "--list", help="list deliveries (of --job / --retry JOB if given)"),
    operator: str = typer.Option("cli", help="who is retrying (written to the audit log)"),
) -> None:
    """Send results to the PACS with retries; `send --retry JOB` re-attempts a job's failed deliveries now."""
    from sqlalchemy import select  # lazy: CLI start-up

    from lesiontrack.db.models import Delivery, DeliveryState  # lazy: CLI start-up
    from lesiontrack.db.session import session_scope  # lazy: CLI start-up
    from lesiontrack.dicom_node.outbound.sending import DeliveryService  # lazy: CLI start-up

    settings = state(ctx).settings()
    sf = state(ctx).database()
    svc = DeliveryService(settings, sf)
    if list_:
        with session_scope(sf) as s:
            q = select(Delivery).order_by(Delivery.id)
            if job is not None or retry is not None:
                q = q.where(Delivery.job_pk == (job if job is not None else retry))
            for d in s.scalars(q):
                typer.echo(
                    f"delivery {d.id} job {d.job_pk} → {d.destination}: {d.state.value}, "
                    f"{d.attempts} attempt(s), {len(d.file_paths)} file(s)"
                    f"{', last error: ' + d.last_error if d.last_error else ''}"
                )
        return
    if retry is not None or delivery:
        results = svc.retry(job_id=retry, delivery_ids=list(delivery) or None, operator=operator)
        if not results:
            typer.secho("nothing to retry (no dead-lettered or waiting deliveries)", fg="yellow", err=True)
            raise typer.Exit(1)
        for did, st in results:
            typer.echo(f"delivery {did}: {st.value}")
        if any(st != DeliveryState.DELIVERED for _, st in results):
            raise typer.Exit(1)
        return
    if not files:
        typer.secho("error: give FILES to send, or --retry JOB / --delivery ID / --list", fg="red", err=True)
        raise typer.Exit(2)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        typer.secho(f"error: not a file: {', '.join(missing)}", fg="red", err=True)
        raise typer.Exit(2)
    try:
        ids = svc.send(list(files), job_id=job)
    except (ValueError, KeyError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    with session_scope(sf) as s:
        states: list[tuple[int, DeliveryState]] = []
        for i in ids:
            row = s.get(Delivery, i)
            if row is None:
                raise RuntimeError(f"delivery {i} was created but is no longer in the database")
            states.append((i, row.state))
    for did, st in states:
        typer.echo(f"delivery {did}: {st.value}")
    if any(st != DeliveryState.DELIVERED for _, st in states):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("send")(send)
