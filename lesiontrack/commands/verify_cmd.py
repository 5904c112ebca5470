"""`lesiontrack verify list|as-is|reanalyse`: verified tracking from the command line (docs/verified-tracking.md).

Corrections arrive as DICOM (a reader's SEG/SR routed from the PACS, or uploaded on the dashboard); here an
operator lists a patient's verifications, accepts a follow-up's result as is, or starts the re-analysis of later
follow-ups when ``verification.reanalyse_later = "operator"``. Every action is audited.
"""

from __future__ import annotations

import typer

from lesiontrack.context import state

app = typer.Typer(
    help="Verified tracking: list verifications, verify a result as is, re-analyse.", no_args_is_help=True
)


@app.command("list")
def list_verifications(
    ctx: typer.Context, patient_pk: int = typer.Argument(..., help="patient id (dashboard/API)")
) -> None:
    """Every verification of the patient: timepoint, how, by whom, when, state, re-analyses."""
    from rich.console import Console  # lazy: CLI start-up
    from rich.table import Table  # lazy: CLI start-up

    from lesiontrack.db.session import session_scope  # lazy: CLI start-up
    from lesiontrack.pipeline.jobs.verification import verifications  # lazy: CLI start-up

    sf = state(ctx).database()
    with session_scope(sf) as s:
        rows = verifications(s, patient_pk)
    table = Table(title=f"verifications of patient {patient_pk}")
    for col in ("id", "series", "method", "verified by", "at", "state", "adopted by job", "re-analyses"):
        table.add_column(col, overflow="fold")
    for v in rows:
        table.add_row(
            str(v.id),
            v.series_uid,
            v.method.value,
            v.verified_by,
            v.verified_at.isoformat(timespec="seconds"),
            v.state.value,
            str(v.job_id or ""),
            ", ".join(map(str, v.reanalysis_jobs)),
        )
    Console(width=180).print(table)


@app.command("as-is")
def as_is(
    ctx: typer.Context,
    series_uid: str = typer.Argument(..., help="the analysed follow-up CT series"),
    operator: str = typer.Option(..., "--operator", help="who verifies (recorded, audited)"),
) -> None:
    """Accept our latest result of a follow-up unchanged; later follow-ups are re-analysed from it."""
    from lesiontrack.pipeline.jobs.verification import VerificationError, verify_as_is  # lazy: CLI start-up

    try:
        vid, jobs = verify_as_is(state(ctx).database(), series_uid, operator=f"cli:{operator}")
    except VerificationError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"verification {vid}; {len(jobs)} later follow-up(s) queued for re-analysis: {jobs}")


@app.command("reanalyse")
def reanalyse(
    ctx: typer.Context, verification_id: int = typer.Argument(..., help="verification id (`verify list`)")
) -> None:
    """Re-analyse the follow-ups after a verified timepoint (when re-analysis waits for an operator)."""
    from lesiontrack.pipeline.jobs.verification import VerificationError, reanalyse_later  # lazy: CLI start-up

    try:
        jobs = reanalyse_later(state(ctx).database(), verification_id, actor="cli")
    except VerificationError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{len(jobs)} later follow-up(s) queued for re-analysis: {jobs}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="verify")
