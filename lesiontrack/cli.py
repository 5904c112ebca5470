"""The ``lesiontrack`` console command: one Typer app; each command group lives in ``lesiontrack/commands``."""

from __future__ import annotations

from pathlib import Path

import typer

from lesiontrack import __version__
from lesiontrack.commands import config_cmd, db_cmd, register_commands
from lesiontrack.config.logging import setup_logging
from lesiontrack.context import CliState

app = typer.Typer(
    name="lesiontrack",
    help="LesionTrack — DICOM-native longitudinal lesion tracking on CT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", envvar="LESIONTRACK_CONFIG", help="TOML configuration file"
    ),
    log_level: str | None = typer.Option(None, "--log-level", help="override logging.level"),
    _version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the LesionTrack version and exit"
    ),
) -> None:
    ctx.obj = CliState(config_file=config)
    setup_logging(log_level or "WARNING")


@app.command()
def version() -> None:
    """Print the LesionTrack version."""
    typer.echo(__version__)


app.add_typer(config_cmd.app, name="config")
app.add_typer(db_cmd.app, name="db")

# Command groups added by later layers register here (every lesiontrack/commands/*_cmd.py).
register_commands(app)


def main() -> None:
    app()
