"""`lesiontrack candidates list|confirm|reject`: review new-lesion candidates of a patient's follow-ups.

A confirmation is audited and queues a re-analysis of the follow-up (a new job: the lesion is tracked as new,
RECIST is recomputed and a new SEG + SR are issued); a rejection is audited and leaves RECIST as it was.
"""

from __future__ import annotations

import typer

from lesiontrack.context import state

app = typer.Typer(help="New-lesion candidates: list, confirm, reject.", no_args_is_help=True)


@app.command("list")
def list_candidates(
    ctx: typer.Context, patient_pk: int = typer.Argument(..., help="patient id (dashboard/API)")
) -> None:
    """The candidates of the patient's follow-ups (latest search of each) with their state."""
    from rich.console import Console  # lazy: CLI start-up
    from rich.table import Table  # lazy: CLI start-up

    from lesiontrack.db.session import session_scope  # lazy: CLI start-up
    from lesiontrack.pipeline.views.history import build_timeline  # lazy: CLI start-up

    sf = state(ctx).database()
    with session_scope(sf) as s:
        try:
            tl = build_timeline(s, patient_pk)
        except KeyError as exc:
            typer.secho(f"error: {exc.args[0]}", fg="red", err=True)
            raise typer.Exit(1) from exc
    labels = {tp.series_uid: tp.label for tp in tl.timepoints}
    table = Table(title=f"new-lesion candidates of patient {patient_pk}")
    for col in ("id", "candidate", "timepoint", "diameter (mm)", "volume (mL)", "confidence", "state"):
        table.add_column(col, overflow="fold")
    for c in tl.candidates:
        table.add_row(
            str(c.id),
            c.tracking_id,
            labels.get(c.series_uid, c.series_uid),
            f"{c.diameter_mm:.1f}",
            f"{c.volume_mm3 / 1000.0:.2f}",
            f"{c.confidence:.2f}",
            c.state.value + (f" by {c.decided_by}" if c.decided_by else ""),
        )
    Console(width=160).print(table)
    for tp in tl.timepoints[1:]:
        typer.echo(f"{tp.label}: new lesions {tp.new_lesions_text or 'not assessed'}")


def _decide(ctx: typer.Context, candidate_id: int, confirm: bool, reason: str) -> None:
    # lazy: CLI start-up (see lesiontrack/commands/__init__.py)
    from lesiontrack.pipeline.jobs.candidates import CandidateDecisionError, CandidateNotFound, decide
    from lesiontrack.pipeline.jobs.store import JobStore  # lazy: CLI start-up

    sf = state(ctx).database()
    try:
        view = decide(sf, candidate_id, confirm, actor="cli", reason=reason)
    except (CandidateNotFound, CandidateDecisionError) as exc:
        typer.secho(f"error: {exc.args[0]}", fg="red", err=True)
        raise typer.Exit(1) from exc
    if confirm:
        job = JobStore(sf, actor="cli").create(
            view.series_uid, reason=f"new-lesion candidate {view.tracking_id} confirmed"
        )
        typer.echo(f"{view.tracking_id} confirmed; follow-up re-analysed as job {job} (new SEG + SR)")
    else:
        typer.echo(f"{view.tracking_id} rejected; RECIST unchanged")


@app.command("confirm")
def confirm(
    ctx: typer.Context,
    candidate_id: int = typer.Argument(..., help="candidate id (`candidates list`)"),
    reason: str = typer.Option("", help="recorded in the audit trail"),
) -> None:
    """Confirm a candidate: it becomes a tracked new lesion and the follow-up's SEG + SR are re-issued."""
    _decide(ctx, candidate_id, True, reason)


@app.command("reject")
def reject(
    ctx: typer.Context,
    candidate_id: int = typer.Argument(..., help="candidate id (`candidates list`)"),
    reason: str = typer.Option("", help="recorded in the audit trail"),
) -> None:
    """Reject a candidate (audited); RECIST stays as it was."""
    _decide(ctx, candidate_id, False, reason)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="candidates")
