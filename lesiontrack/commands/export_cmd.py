"""`lesiontrack export`: a patient's lesion timeline as CSV/JSON, or CDISC-style TU/TR/RS, without the HTTP server."""

from __future__ import annotations

from pathlib import Path

import typer

from lesiontrack.context import state

FORMATS = ("csv", "json", "tu", "tr", "rs", "cdisc-json")


def export(
    ctx: typer.Context,
    patient: int | None = typer.Option(None, help="internal patient id (see `lesiontrack export --list`)"),
    fmt: str = typer.Option("csv", "--format", help="csv, json, tu, tr, rs or cdisc-json"),
    out: Path | None = typer.Option(None, help="output file (default: standard output)"),
    study_id: str = typer.Option("LESIONTRACK", help="STUDYID of the CDISC records"),
    list_patients: bool = typer.Option(False, "--list", help="list patients with their internal ids"),
) -> None:
    """Export one patient's lesions × timepoints (measurements, status, RECIST) for a read centre."""
    from sqlalchemy import select  # lazy: CLI start-up

    from lesiontrack.db.models import Patient  # lazy: CLI start-up
    from lesiontrack.db.session import make_engine, make_session_factory, session_scope  # lazy: CLI start-up
    from lesiontrack.pipeline.views import exports  # lazy: CLI start-up
    from lesiontrack.pipeline.views.history import build_timeline  # lazy: CLI start-up

    sf = make_session_factory(make_engine(state(ctx).settings().effective_database_url))
    with session_scope(sf) as s:
        if list_patients:
            for p in s.scalars(select(Patient).order_by(Patient.id)):
                typer.echo(f"{p.id}\t{len(p.lesions)} lesion(s)\t{len(p.studies)} study(ies)")
            return
        if patient is None:
            raise typer.BadParameter("give --patient ID (or --list)")
        if fmt not in FORMATS:
            raise typer.BadParameter(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
        row = s.get(Patient, patient)
        if row is None:
            typer.secho(f"error: no patient with id {patient}", fg="red", err=True)
            raise typer.Exit(1)
        tl = build_timeline(s, patient)
        subject = row.patient_id
    if fmt == "csv":
        text = exports.lesions_csv(tl, subject)
    elif fmt == "json":
        text = exports.lesions_json(tl, subject)
    elif fmt == "cdisc-json":
        text = exports.cdisc_json(tl, subject, study_id)
    else:
        text = exports.cdisc_csv(tl, subject, fmt, study_id)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
