"""The deployment's compose file and example environment, read as the tests and the packaging check need them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lesiontrack.config.settings import ENV_PREFIX

REPO = Path(__file__).resolve().parents[2]


COMPOSE = REPO / "deploy" / "compose.yaml"


EXAMPLE_ENV = REPO / "deploy" / "example.env"


_SETTING = re.compile(rf"\b{ENV_PREFIX}[A-Z0-9_]+")


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@dataclass
class Service:
    name: str
    command: list[str]
    environment: dict[str, str]  # interpolated with deploy/example.env
    spec: dict[str, Any]


def example_env() -> dict[str, str]:
    out = {}
    for line in EXAMPLE_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in values and (values[name] or not (op or "").startswith(":")):
            return values[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise AssertionError(f"{name} is required ({arg}) and deploy/example.env does not set it")
        return ""

    return _INTERPOLATION.sub(one, text).replace("$$", "$")


def load_compose() -> dict[str, Any]:
    """The compose file as compose sees it: YAML first, then variables interpolated in its strings."""
    values = example_env()

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return interpolate(node, values)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return dict(walk(yaml.safe_load(COMPOSE.read_text())))


def lesiontrack_services() -> list[Service]:
    """The services that run the LesionTrack image (ENTRYPOINT ``lesiontrack``), their command and environment."""
    compose = load_compose()
    out = []
    for name, spec in compose["services"].items():
        if "build" not in spec:  # the LesionTrack image is the one compose builds from this repository
            continue
        env = spec.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        out.append(Service(name, [str(c) for c in spec["command"]], {k: str(v) for k, v in env.items()}, spec))
    return out


def named_settings() -> set[str]:
    """Every ``LESIONTRACK_*`` name in the compose file and its example .env."""
    return set(_SETTING.findall(COMPOSE.read_text())) | set(_SETTING.findall(EXAMPLE_ENV.read_text()))
