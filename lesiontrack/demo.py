"""The demo run (``lesiontrack demo`` / ``make demo``): the whole service on free ports with a synthetic patient.

Starts :class:`lesiontrack.service.LesionTrackService` with a temporary data directory, generates a phantom patient
(baseline with lesions as a DICOM-SEG, two follow-ups with growth, shrinkage and one vanished lesion), sends the
baseline + SEG and then each follow-up over DICOM (pynetdicom C-STORE), waits for each analysis job while showing
its progress, and returns what the database then knows: per timepoint, each lesion's tracking ID, volume, long axis,
change from baseline, status and the RECIST response, plus the SEG/SR files written.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import PacsPeer, Settings, load_settings
from lesiontrack.db.models import Lesion, LesionObservation, Series, Study
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.outbound.scu import store_files
from lesiontrack.pipeline.jobs.candidates import latest_candidates
from lesiontrack.pipeline.jobs.store import JobStore, JobView


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_settings(data_dir: Path, *, http: bool = True, **overrides: Any) -> Settings:
    """Embedded defaults on loopback, free ports, short series-completion quiet period."""
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "dicom": {
            "ae_title": "LESIONTRACK",
            "bind_address": "127.0.0.1",
            "port": free_port(),
            "series_quiet_seconds": 1.5,
            "fsync": False,
        },
        "http": {
            "enabled": http,
            "bind_address": "127.0.0.1",
            "port": free_port() if http else 0,
            "api_keys": [{"name": "demo", "key": "demo", "role": "operator"}],
        },
        "worker": {"executor": "inprocess", "retry_backoff_seconds": [2, 5, 10]},
        # the demo's small phantom is registered at 3 mm (the default 2 mm is for clinical CTs)
        "engines": {"working_spacing_mm": 3.0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(None, **base)


def write_demo_config(settings: Settings, path: Path) -> Path:
    """A TOML file to browse the demo's results later with ``lesiontrack --config PATH serve`` (same data folder,
    database, ports and the ``demo`` API key)."""
    key = settings.http.api_keys[0] if settings.http.api_keys else None
    lines = [
        "# written by `lesiontrack demo`: serve this demo's data folder again",
        f'data_dir = "{Path(settings.data_dir).resolve()}"',
        "[dicom]",
        f'ae_title = "{settings.dicom.ae_title}"',
        'bind_address = "127.0.0.1"',
        f"port = {settings.dicom.port}",
        "[http]",
        'bind_address = "127.0.0.1"',
        f"port = {settings.http.port}",
        "[engines]",
        f"working_spacing_mm = {settings.engines.working_spacing_mm}",
    ]
    if key is not None:
        lines += [
            "[[http.api_keys]]",
            f'name = "{key.name}"',
            f'key = "{key.key.get_secret_value()}"',
            f'role = "{key.role}"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def self_peer(settings: Settings) -> PacsPeer:
    return PacsPeer(
        name="lesiontrack", ae_title=settings.dicom.ae_title, host="127.0.0.1", port=settings.dicom.port, query=False
    )


def send_files(settings: Settings, files: list[Path], peer: PacsPeer | None = None) -> None:
    """C-STORE ``files`` to our own SCP (or ``peer``) as a modality would; raises if any is refused."""
    outcomes = store_files(settings, peer or self_peer(settings), files)
    bad = [o for o in outcomes if not o.ok]
    if bad or len(outcomes) != len(files):
        raise RuntimeError(f"{len(bad)} of {len(files)} instances refused: {bad[:3]}")


def wait_for_job(
    store: JobStore, series_uid: str, timeout: float, on_update: Callable[[JobView], None] | None = None
) -> JobView:
    """Poll the database until the newest job of ``series_uid`` is finished; returns its view."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        view = store.latest_for_series(series_uid)
        if view is not None:
            if on_update is not None and (last is None or (view.state, view.step) != (last.state, last.step)):
                on_update(view)
            last = view
            if view.finished and view.superseded_by is None:
                return view
        time.sleep(0.2)
    raise TimeoutError(
        f"no finished analysis of series {series_uid} after {timeout:.0f}s "
        f"(last state: {last.state.value if last else 'no job'}, step {last.step if last else '-'})"
    )


@dataclass
class DemoLesionRow:
    tracking_id: str
    tracking_uid: str
    status: str
    volume_ml: float | None
    long_axis_mm: float | None
    change_pct: float | None
    response: str | None
    review: bool = False  # flagged for review (low confidence)
    confidence: float | None = None


@dataclass
class CandidateRow:
    """A new-lesion candidate of the timepoint's latest search (unconfirmed until an operator decides)."""

    tracking_id: str
    tissue: str
    diameter_mm: float
    confidence: float
    state: str


@dataclass
class TimepointRows:
    label: str
    series_uid: str
    study_date: str | None
    rows: list[DemoLesionRow] = field(default_factory=list)
    response: str | None = None
    files: list[str] = field(default_factory=list)
    candidates: list[CandidateRow] = field(default_factory=list)


def lesion_table(session_factory: sessionmaker[Session], patient_pk: int) -> list[TimepointRows]:
    """What the database knows about the patient's lesions, per timepoint (oldest first, latest job per series)."""
    with session_scope(session_factory) as s:
        rows = s.execute(
            select(LesionObservation, Lesion, Study.study_date, Study.study_time)
            .join(Lesion, LesionObservation.lesion_pk == Lesion.id)
            .join(Series, Series.series_instance_uid == LesionObservation.series_instance_uid)
            .join(Study, Series.study_pk == Study.id)
            .where(Lesion.patient_pk == patient_pk)
        ).all()
        latest: dict[tuple[str, str], tuple[LesionObservation, Lesion, str | None, str | None]] = {}
        for obs, les, date, tm in rows:
            key = (obs.series_instance_uid, les.tracking_uid)
            if key not in latest or obs.id > latest[key][0].id:
                latest[key] = (obs, les, date, tm)
        by_series: dict[str, TimepointRows] = {}
        order: dict[str, str] = {}
        for (series_uid, _uid), (obs, les, date, tm) in latest.items():
            tp = by_series.setdefault(series_uid, TimepointRows("", series_uid, date))
            order[series_uid] = f"{date or ''}{tm or ''}"
            m = obs.measurements or {}
            change = (((m.get("changes") or {}).get("metrics") or {}).get("volume_mm3") or {}).get("baseline") or {}
            rec = m.get("recist") or {}
            tp.rows.append(
                DemoLesionRow(
                    les.tracking_id,
                    les.tracking_uid,
                    obs.status.value,
                    None if obs.volume_mm3 is None else obs.volume_mm3 / 1000.0,
                    obs.long_axis_mm,
                    change.get("percent"),
                    rec.get("role"),
                    review=bool(obs.review),
                    confidence=obs.confidence,
                )
            )
            if rec.get("overall_response"):
                tp.response = rec["overall_response"]
        for c in latest_candidates(s, list(by_series)):
            by_series[c.series_uid].candidates.append(
                CandidateRow(c.tracking_id, c.tissue, c.diameter_mm, c.confidence, c.state.value)
            )
    out = [by_series[k] for k in sorted(by_series, key=lambda k: order[k])]
    for i, tp in enumerate(out):
        tp.label = "baseline" if i == 0 else f"follow-up {i}"
        tp.rows.sort(key=lambda r: r.tracking_id)
    return out


def render_table(timepoints: list[TimepointRows], console: Console) -> None:
    for tp in timepoints:
        title = f"{tp.label} — {tp.study_date or '?'} — series {tp.series_uid}"
        if tp.response:
            title += f" — RECIST overall response: {tp.response}"
        t = Table(title=title, title_justify="left")
        cols = ("tracking ID", "volume (mL)", "long axis (mm)", "change vs baseline", "status", "RECIST role", "flag")
        for col in cols:
            t.add_column(col)
        for r in tp.rows:
            t.add_row(
                r.tracking_id,
                "-" if r.volume_ml is None else f"{r.volume_ml:.2f}",
                "-" if not r.long_axis_mm else f"{r.long_axis_mm:.1f}",
                "-" if r.change_pct is None else f"{r.change_pct:+.0f} %",
                r.status,
                r.response or "-",
                _flag(r),
            )
        for c in tp.candidates:
            t.add_row(
                c.tracking_id, "-", f"{c.diameter_mm:.1f} (diameter)", "-", f"candidate, {c.state}", "-",
                f"confidence {c.confidence:.2f}",
            )  # fmt: skip
        console.print(t)
        for f in tp.files:
            console.print(f"  {f}")


def _flag(row: DemoLesionRow) -> str:
    if row.review:
        return "REVIEW" + ("" if row.confidence is None else f" ({row.confidence:.2f})")
    return "-" if row.confidence is None else f"ok ({row.confidence:.2f})"
