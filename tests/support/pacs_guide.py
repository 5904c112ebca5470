"""The configuration docs/pacs/orthanc.md gives a site, read from the guide itself (Lua, JSON, TOML blocks), and
:class:`GuideSite`: Orthanc and ``lesiontrack serve`` (a subprocess) set up from it on loopback."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pydicom

from tests.support.services import LESIONTRACK, OrthancServer, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "pacs" / "orthanc.md"


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


# -- a site set up from the guide ---------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_body(prefix: str, table: dict[str, Any], out: list[str]) -> None:
    """The table's own keys, then its sub-tables (``prefix.key``) and arrays of tables."""
    nested = []
    for k, v in table.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            nested.append((f"{prefix}{k}", v))
        else:
            out.append(f"{k} = {_toml_value(v)}")
    for name, v in nested:
        for item, array in [(v, False)] if isinstance(v, dict) else [(x, True) for x in v]:
            out.append(f"[[{name}]]" if array else f"[{name}]")
            _toml_body(f"{name}.", item, out)


def dump_toml(cfg: dict[str, Any]) -> str:
    out: list[str] = []
    _toml_body("", cfg, out)
    return "\n".join(out) + "\n"


class GuideSite:
    """Orthanc and ``lesiontrack serve`` configured from docs/pacs/orthanc.md. ``dicomweb``: Orthanc loads its
    DICOMweb plugin (as Debian's default configuration does), configured by the guide's ``DicomWeb`` section.
    ``analysis``: LesionTrack settings of the analysis itself a test needs (``{"engines": {"registration": "none"}}``),
    merged into those tables; nothing of the PACS connection."""

    def __init__(
        self, root: Path, *, dicomweb: bool = False, analysis: dict[str, dict[str, Any]] | None = None
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        cfg = guide_toml()
        self.key = str(cfg["http"]["api_keys"][0]["key"])  # the key the guide's Lua script sends too
        self.http = f"http://127.0.0.1:{self.http_port}"
        lua = root / "lesiontrack.lua"
        lua.write_text(guide_lua(self.http, self.key))
        self.orthanc = OrthancServer(
            root / "orthanc", enable_dicomweb=dicomweb, extra_config=guide_json("127.0.0.1", self.dicom_port, lua)
        )
        self.orthanc.start()
        cfg["data_dir"] = str(root / "data")
        cfg["dicom"] |= {"port": self.dicom_port, "bind_address": "127.0.0.1"}
        cfg["http"] |= {"port": self.http_port, "bind_address": "127.0.0.1"}
        [peer] = cfg["pacs"]
        peer["host"], peer["port"] = "127.0.0.1", self.orthanc.dicom_port
        # the small phantom is registered at 4 mm (the demo: 3 mm; clinical CT: the default 2 mm) — not a site setting
        cfg["engines"] = {"working_spacing_mm": 4.0}
        for table, values in (analysis or {}).items():
            assert table in ("engines", "detection", "tracking", "recist"), f"{table} is no analysis table"
            cfg[table] = cfg.get(table, {}) | values
        self.config = root / "lesiontrack.toml"
        self.config.write_text(dump_toml(cfg))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONTRACK_")}
        self.env |= {"PYTHONPATH": str(REPO), "LESIONTRACK_CONFIG": str(self.config)}
        up = subprocess.run([*LESIONTRACK, "db", "upgrade"], env=self.env, capture_output=True, text=True, cwd=root)
        assert up.returncode == 0, up.stderr + up.stdout
        with open(root / "serve.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*LESIONTRACK, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=root
            )
        wait_for_port(self.dicom_port, timeout=120)
        wait_for_port(self.http_port, timeout=120)
        from lesiontrack.config.settings import load_settings
        from lesiontrack.db.session import make_engine, make_session_factory

        settings = load_settings(self.config)
        self.engine = make_engine(settings.effective_database_url)
        self.sf = make_session_factory(self.engine)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.engine.dispose()
        self.orthanc.stop()

    def api(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.http}{path}", headers={"X-API-Key": self.key})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def upload(self, files: list[Path]) -> None:
        for f in files:
            self.orthanc.upload(f)

    def jobs(self, series_uid: str) -> list[Any]:
        from lesiontrack.pipeline.jobs.store import JobStore

        return [v for v in JobStore(self.sf).list() if v.followup_series_uid == series_uid]

    def finished(self, series_uid: str) -> Any:
        jobs = self.jobs(series_uid)
        return bool(jobs) and all(j.finished for j in jobs) and jobs

    def results_in_orthanc(self, study_uid: str) -> dict[int, list[pydicom.Dataset]]:
        """Our objects in the follow-up study, by series number (901 SEG, 902 TID 1500 SR, 903 OHIF SR)."""
        found = self.orthanc.post("/tools/lookup", study_uid)
        out: dict[int, list[pydicom.Dataset]] = {}
        for series in self.orthanc.get_json(f"/studies/{found[0]['ID']}/series"):
            if series["MainDicomTags"].get("Modality") not in ("SEG", "SR"):
                continue
            for inst in series["Instances"]:
                with urllib.request.urlopen(f"{self.orthanc.url}/instances/{inst}/file", timeout=60) as r:
                    ds = pydicom.dcmread(io.BytesIO(r.read()))
                out.setdefault(int(ds.SeriesNumber), []).append(ds)
        return out

    def delivered(self, study_uid: str) -> bool:
        objs = self.results_in_orthanc(study_uid)
        return bool(objs.get(901)) and bool(objs.get(902))
