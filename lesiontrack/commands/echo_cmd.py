"""`lesiontrack echo PEER`: C-ECHO a configured PACS peer."""

from __future__ import annotations

import typer

from lesiontrack.context import state


def echo(
    ctx: typer.Context, peer: str = typer.Argument(..., help=r"name of a \[\[pacs]] peer (configuration section)")
) -> None:
    """Verify the DICOM connection to PEER (C-ECHO); exit 1 when it fails."""
    from lesiontrack.dicom_node.outbound.scu import DimseError  # lazy: CLI start-up
    from lesiontrack.dicom_node.outbound.scu import echo as do_echo  # lazy: CLI start-up

    settings = state(ctx).settings()
    try:
        p = settings.peer(peer)
    except KeyError as exc:
        typer.secho(f"error: {exc.args[0]}", fg="red", err=True)
        raise typer.Exit(2) from exc
    try:
        status = do_echo(settings, p)
    except DimseError as exc:
        typer.secho(f"C-ECHO {p.name}: FAILED ({exc})", fg="red", err=True)
        raise typer.Exit(1) from exc
    ok = status == 0
    typer.echo(f"C-ECHO {p.name} ({p.ae_title}@{p.host}:{p.port}): {'OK' if ok else f'status 0x{status:04X}'}")
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("echo")(echo)
