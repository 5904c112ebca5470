"""Explain the effective configuration: every dotted key, its value (secrets masked) and its source."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, SecretStr

from lesiontrack.config.settings import ENV_PREFIX, Settings

Source = Literal["default", "file", "environment"]
_SECRET_WORDS = ("password", "secret", "key", "token")
# scheme://[user]:password@host — the user name may be empty (redis://:password@host/0)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@/\s]+)(?P<tail>@)", re.I)


@dataclass(frozen=True)
class ConfigEntry:
    key: str
    value: object
    source: Source


def mask(key: str, value: object) -> object:
    """Mask secrets: SecretStr values, keys that look secret, passwords inside URLs."""
    if isinstance(value, SecretStr):
        return "********" if value.get_secret_value() else ""
    last = key.rsplit(".", 1)[-1].lower()
    if isinstance(value, str):
        if any(w in last for w in _SECRET_WORDS) and not last.endswith(("_file", "_weights")):
            return "********" if value else value
        return _URL_PASSWORD.sub(r"\g<head>********\g<tail>", value)
    return value


def _flatten(prefix: str, value: object) -> list[tuple[str, object]]:
    if isinstance(value, BaseModel):
        out: list[tuple[str, object]] = []
        for name in type(value).model_fields:
            out.extend(_flatten(f"{prefix}.{name}" if prefix else name, getattr(value, name)))
        return out
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        out = []
        for i, item in enumerate(value):
            out.extend(_flatten(f"{prefix}[{i}]", item))
        return out
    return [(prefix, value)]


def _in_file(data: dict[str, object], key: str) -> bool:
    node: object = data
    for part in re.split(r"\.", key):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        name, idx = (m.group(1), int(m.group(2))) if m else (part, None)
        if not isinstance(node, dict) or name not in node:
            return False
        node = node[name]
        if idx is not None:
            if not isinstance(node, list) or idx >= len(node):
                return False
            node = node[idx]
    return True


def _in_env(key: str) -> bool:
    top = re.sub(r"\[\d+\]", "", key).split(".")
    env = {k.upper() for k in os.environ if k.upper().startswith(ENV_PREFIX)}
    return any((ENV_PREFIX + "__".join(top[:depth])).upper() in env for depth in range(1, len(top) + 1))


def explain(settings: Settings) -> list[ConfigEntry]:
    """One entry per leaf key, in model order."""
    path: Path | None = settings._toml_file
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path else {}
    entries = []
    for key, value in _flatten("", settings):
        source: Source = "environment" if _in_env(key) else "file" if _in_file(data, key) else "default"
        shown = value.value if hasattr(value, "value") and not isinstance(value, (str, int, float)) else value
        if isinstance(shown, Path):
            shown = str(shown)
        entries.append(ConfigEntry(key, mask(key, shown), source))
    entries.insert(
        1,
        ConfigEntry(
            "database_url (effective)",
            mask("database_url", settings.effective_database_url),
            "environment" if _in_env("database_url") else "file" if _in_file(data, "database_url") else "default",
        ),
    )
    return entries
