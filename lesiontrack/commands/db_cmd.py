"""`lesiontrack db upgrade|current`."""

from __future__ import annotations

import typer

from lesiontrack.context import state

app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


def _url(ctx: typer.Context, url: str | None) -> str:
    return url or state(ctx).settings().effective_database_url


@app.command("upgrade")
def upgrade(
    ctx: typer.Context,
    revision: str = typer.Argument("head"),
    url: str | None = typer.Option(None, help="database URL (default: from configuration)"),
) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from lesiontrack.config.introspect import mask  # lazy: CLI start-up
    from lesiontrack.db.session import current_revision  # lazy: CLI start-up
    from lesiontrack.db.session import upgrade as do_upgrade  # lazy: CLI start-up

    target = _url(ctx, url)
    do_upgrade(target, revision)
    typer.echo(f"database {mask('database_url', target)} at revision {current_revision(target)}")


@app.command("current")
def current(ctx: typer.Context, url: str | None = typer.Option(None, help="database URL")) -> None:
    """Print the schema revision of the database and whether it is at head."""
    from lesiontrack.db.session import current_revision, head_revision  # lazy: CLI start-up

    rev = current_revision(_url(ctx, url))
    head = head_revision()
    typer.echo(f"{rev or '(empty)'}{' (head)' if rev == head else f' (head is {head})'}")
    if rev != head:
        raise typer.Exit(1)
