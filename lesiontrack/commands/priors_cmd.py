"""`lesiontrack find-priors --patient ID`: list (and optionally retrieve) a patient's annotated prior CTs."""

from __future__ import annotations

import json
from typing import Any

import typer

from lesiontrack.context import state


def find_priors(
    ctx: typer.Context,
    patient: str = typer.Option(..., "--patient", help="PatientID"),
    issuer: str | None = typer.Option(None, help="IssuerOfPatientID"),
    before: str | None = typer.Option(None, help="only studies before this date (YYYYMMDD[HHMMSS])"),
    local_only: bool = typer.Option(False, "--local-only", help="do not query the PACS peers"),
    retrieve: bool = typer.Option(False, "--retrieve", help="also fetch the CT series to local disk"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Priors = earlier studies whose CT series a DICOM SEG or TID 1500 SR references (local DB, then peers)."""
    from lesiontrack.dicom_node.outbound.priors import PriorFinder, PriorLookupError  # lazy: CLI start-up

    settings = state(ctx).settings()
    sf = state(ctx).database()
    finder = PriorFinder(settings, sf, query_peers=not local_only)
    ref = (before[:8], before[8:] or None) if before else None
    try:
        priors = finder.find_for_patient(patient, issuer, before=ref)
        if retrieve:
            priors = [finder.retrieve(p) for p in priors]
    except PriorLookupError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    rows: list[dict[str, Any]] = [
        {
            "study_uid": p.study_uid,
            "study_date": p.study_date,
            "study_time": p.study_time,
            "ct_series_uid": p.ct_series_uid,
            "source": p.source,
            "ct_files": len(p.ct_files),
            "annotations": [{"modality": a.modality, "sop_instance_uid": a.sop_instance_uid} for a in p.annotations],
        }
        for p in priors
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no prior timepoints found")
    for r in rows:
        anns = ", ".join(f"{a['modality']} {a['sop_instance_uid']}" for a in r["annotations"])
        typer.echo(
            f"{r['study_date'] or '????????'} study {r['study_uid']} CT {r['ct_series_uid']} "
            f"[{r['source']}] files={r['ct_files']} annotations: {anns}"
        )


def register(app: typer.Typer) -> None:
    app.command("find-priors")(find_priors)
