"""`lesiontrack config show|check`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from lesiontrack.context import state

app = typer.Typer(help="Show or check the effective configuration.", no_args_is_help=True)


@app.command("show")
def show(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Print every setting with its value (secrets masked) and source: default, file or environment."""
    from lesiontrack.config.introspect import explain  # lazy: CLI start-up

    settings = state(ctx).settings()
    entries = explain(settings)
    if as_json:
        typer.echo(
            json.dumps([{"key": e.key, "value": e.value, "source": e.source} for e in entries], default=str, indent=1)
        )
        return
    table = Table(title=f"LesionTrack configuration ({settings._toml_file or 'no file'})")
    for col in ("key", "value", "source"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.key, str(e.value), e.source)
    Console(width=160).print(table)


@app.command("check")
def check(ctx: typer.Context) -> None:
    """Validate the configuration (and the engines it names); exits non-zero with a message naming the bad key."""
    from lesiontrack.models.engines import check_engines  # lazy: CLI start-up

    settings = state(ctx).settings()
    problems = check_engines(settings.engines)
    for p in problems:
        typer.secho(f"error: {p}", fg="red", err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"configuration OK ({settings._toml_file or 'defaults and environment'})")
