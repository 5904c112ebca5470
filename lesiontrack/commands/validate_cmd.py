"""`lesiontrack validate FILE...`: run dciodvfy (and, for SRs, pixelmed DicomSRValidator + dsrdump) on DICOM files."""

from __future__ import annotations

from pathlib import Path

import typer


def validate(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="DICOM files (SEG, SR, ...)"),
    no_pixelmed: bool = typer.Option(False, "--no-pixelmed", help="skip the (slow) SR template check"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print warnings too"),
) -> None:
    """Exit 1 when any validator reports an error; each finding is printed with the tool and the file."""
    import pydicom  # lazy: CLI start-up

    # lazy: CLI start-up (see lesiontrack/commands/__init__.py)
    from lesiontrack.pipeline.dicom.validate import ToolMissing, run_dciodvfy, run_dsrdump, run_sr_validator

    failed = False
    for f in files:
        try:
            sop_class = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
        except Exception as exc:
            typer.secho(f"{f}: not readable as DICOM ({exc})", fg="red", err=True)
            failed = True
            continue
        try:
            reports = [run_dciodvfy(f)]
            if sop_class.startswith("1.2.840.10008.5.1.4.1.1.88."):
                reports.append(run_dsrdump(f))
                if not no_pixelmed:
                    reports += run_sr_validator(f)
        except ToolMissing as exc:
            typer.secho(f"{f}: {exc}", fg="red", err=True)
            raise typer.Exit(2) from exc
        for rep in reports:
            status = "OK" if rep.ok else "FAILED"
            typer.echo(f"{rep.tool}: {status} — {len(rep.errors)} error(s), {len(rep.warnings)} warning(s) — {f}")
            for e in rep.errors:
                typer.echo(f"  {e}")
            if verbose:
                for w in rep.warnings:
                    typer.echo(f"  {w}")
            failed = failed or not rep.ok
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
