"""`lesiontrack routing re-evaluate [--since DATE]`: re-run the routing rules over skipped series after a rule
change; series now routed get an analysis job (picked up by the running service's workers)."""

from __future__ import annotations

from datetime import UTC, datetime

import typer

from lesiontrack.context import state

routing_app = typer.Typer(help="Routing decisions: which received series are analysed.", no_args_is_help=True)


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date or date-time (e.g. 2026-05-01)") from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@routing_app.command("re-evaluate")
def reevaluate_cmd(
    ctx: typer.Context,
    since: str | None = typer.Option(None, help="only series completed at or after this (ISO 8601, UTC if no zone)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what the current rules decide; change nothing"),
) -> None:
    r"""Apply the current \[routing] rules to every skipped series again (priors and our own results excepted)."""
    from lesiontrack.dicom_node.inbound.skipped import reevaluate  # lazy: CLI start-up
    from lesiontrack.pipeline.jobs.store import JobStore  # lazy: CLI start-up

    settings = state(ctx).settings()
    sf = state(ctx).database()
    store = JobStore(sf, actor="cli")
    jobs: dict[str, int] = {}

    def queue(uid: str) -> None:
        jobs[uid] = store.create(uid, reason="routed on re-evaluation of the routing rules", actor="cli")

    results = reevaluate(sf, settings.routing, queue, since=_since(since), dry_run=dry_run, actor="cli")
    for r in results:
        verdict = f"ANALYSE (job {jobs[r.series_uid]})" if r.series_uid in jobs else r.decision.value.upper()
        typer.echo(f"{r.series_uid}: {verdict} - {r.reason}")
    routed = sum(r.now_routed for r in results)
    typer.echo(f"{len(results)} skipped series re-evaluated, {routed} now routed{' (dry run)' if dry_run else ''}")


def register(app: typer.Typer) -> None:
    app.add_typer(routing_app, name="routing")
