"""The configuration docs/pacs/orthanc.md gives a site, read from the guide itself (Lua, JSON, TOML blocks)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "pacs" / "orthanc.md"


def guide_lua(url: str, key: str, modality: str = "lesiontrack") -> str:
    """The ```lua block of the guide with its three site settings filled in (nothing else changed)."""
    [block] = re.findall(r"```lua\n(.*?)```", GUIDE.read_text(), flags=re.S)
    for name, value in (("LESIONTRACK_MODALITY", modality), ("LESIONTRACK_URL", url), ("LESIONTRACK_KEY", key)):
        block, n = re.subn(rf"^local {name} = '[^']*'", f"local {name} = '{value}'", block, flags=re.M)
        assert n == 1, name
    return block


def guide_json(lesiontrack_host: str, lesiontrack_port: int, lua: Path) -> dict[str, Any]:
    """The ```json block of the guide (Orthanc's configuration) with the site values replaced: where LesionTrack
    listens and where the Lua script lies. Every permission and setting stays as the guide writes it."""
    [block] = re.findall(r"```json\n(.*?)```", GUIDE.read_text(), flags=re.S)
    cfg: dict[str, Any] = json.loads(block)
    entry = cfg["DicomModalities"]["lesiontrack"]
    entry["Host"], entry["Port"] = lesiontrack_host, lesiontrack_port
    cfg["LuaScripts"] = [str(lua)]
    for key in ("DicomAet", "DicomPort"):  # OrthancServer's (free loopback port, same AE title)
        cfg.pop(key, None)
    return cfg


def guide_toml() -> dict[str, Any]:
    """The ```toml block of the guide (LesionTrack's configuration), parsed."""
    import tomllib

    [block] = re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return tomllib.loads(block)
