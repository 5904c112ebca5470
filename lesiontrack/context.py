"""Per-invocation CLI state: the config path given with --config, the settings loaded from it, the database."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lesiontrack.config.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker


@dataclass
class CliState:
    config_file: Path | None = None
    _settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config_file)
            except ConfigError as exc:
                typer.secho(f"error: {exc}", fg="red", err=True)
                raise typer.Exit(2) from exc
        return self._settings

    def database(self, upgrade_db: bool = False) -> sessionmaker[Session]:
        """Session factory of the configured database; a schema behind the code exits 2 saying so."""
        from lesiontrack.dicom_node.database import SchemaNotCurrent, open_database  # lazy: CLI start-up

        try:
            return open_database(self.settings(), upgrade_db=upgrade_db)
        except SchemaNotCurrent as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from exc


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    if obj is None:
        obj = ctx.find_root().obj = CliState()
    return obj
