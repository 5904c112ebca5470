"""Per-invocation CLI state: the config path given with --config and the settings loaded from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from config.settings import ConfigError, Settings, load_settings


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


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    if obj is None:
        obj = ctx.find_root().obj = CliState()
    return obj
