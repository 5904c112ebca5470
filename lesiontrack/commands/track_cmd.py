"""`lesiontrack track`: track the lesions annotated on a baseline CT through follow-up CTs (folders of DICOM).

The folders are analysed exactly as the service analyses received series (:func:`lesiontrack.local_analysis.
analyse_folders`: the same job steps — priors, registration, tracking, new-lesion search, confidence and review
flags, measurement, RECIST, SEG + SR — over an embedded temporary store). Writes to ``--out``: per timepoint a NIfTI
label map (label = the lesion's label on its annotation), ``tracking.json`` (per timepoint the job's state, new-lesion
candidates and RECIST; per lesion per timepoint tracking UID/ID, status, volume, centre, confidence, review flag) and,
for every analysed follow-up, the job's DICOM-SEG, TID 1500 SR and OHIF measurements SR (``dicom/<series>/``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lesiontrack.cli_errors import InputError, check_registrable, guarded
from lesiontrack.config.settings import ConfigError
from lesiontrack.context import state

if TYPE_CHECKING:
    from lesiontrack.config.settings import Settings
    from lesiontrack.local_analysis import LocalAnalysis
    from lesiontrack.models.imaging.volume import Volume

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("track")(track)


@guarded
def track(
    ctx: typer.Context,
    baseline: Path = typer.Option(
        ...,
        "--baseline",
        exists=True,
        file_okay=False,
        help="DICOM CT series folder with the annotated lesions (SEG, SR, GSPS or RTSTRUCT inside)",
    ),
    followup: list[Path] = typer.Option(
        ..., "--followup", exists=True, file_okay=False, help="follow-up CT series folder (repeat; any time order)"
    ),
    out: Path = typer.Option(..., "--out", help="output folder (created)"),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        exists=True,
        dir_okay=False,
        help="prompts JSON (docs/prompts.md) instead of the SEG/SR in --baseline",
    ),
    engine: str | None = typer.Option(None, "--engine", help="segmentation engine (default: engines.segmentation)"),
    registration: str | None = typer.Option(
        None, "--registration", help="registration engine (default: engines.registration; 'none')"
    ),
    boosting: bool | None = typer.Option(
        None, "--boost/--no-boost", help="LinGuinE boosting (re-prompt at the centre; default: tracking.boosting)"
    ),
    dicom: bool = typer.Option(True, "--dicom/--no-dicom", help="also copy each follow-up's DICOM-SEG + SRs to --out"),
    confirmed: list[Path] = typer.Option(
        [],
        "--confirmed",
        exists=True,
        file_okay=False,
        help="a --followup folder whose SEG/SR a person made or verified (repeat): taken in as the service takes in a "
        "reader's correction, and later timepoints are propagated from it (lesions matched by Tracking UID, "
        "Tracking ID or label)",
    ),
    store: Path | None = typer.Option(
        None,
        "--store",
        file_okay=False,
        help="keep the embedded store (received files, SQLite database, job records) in this new folder "
        "(default: a temporary folder, removed at the end)",
    ),
) -> None:
    """Track baseline lesions through follow-up CTs as the service would (same steps, same SEG + SR); write label
    maps, tracking.json and the DICOM results."""
    # imported here, not at the top: db.models (SQLAlchemy) adds ~0.9 s to every `lesiontrack` start (-X importtime)
    from lesiontrack.db.models import JobState
    from lesiontrack.track_outputs import write_outputs  # lazy: CLI start-up

    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=140)  # a log file keeps the per-timepoint tables readable
    settings = _settings(state(ctx).settings().model_copy(deep=True), engine, registration, boosting)
    followups = [f for f in followup if f.resolve() != baseline.resolve()]
    _check_arguments(console, settings, (baseline, followups, prompts), confirmed, store)
    console.print(
        f"{len(followups)} follow-up(s) analysed as the service would: segmentation {settings.engines.segmentation}, "
        f"registration {settings.engines.registration}"
    )
    with tempfile.TemporaryDirectory(prefix="lesiontrack-track-") as tmp:
        store_dir = store if store is not None else Path(tmp) / "store"
        run = _analyse(console, settings, (baseline, followups, prompts), confirmed, store_dir)
        summary = write_outputs(run, out, dicom=dicom)
        summary["store"] = str(store) if store is not None else None
        (out / "tracking.json").write_text(json.dumps(summary, indent=1))
        _report(console, run)
    console.print(f"written to {out}")
    if any(tp.state is JobState.FAILED for tp in run.timepoints):
        if store is None:
            console.print("a follow-up failed (reason above, and in tracking.json); --store DIR keeps its job record")
        raise typer.Exit(1)


def _settings(settings: Settings, engine: str | None, registration: str | None, boosting: bool | None) -> Settings:
    """The configured settings with the command line's engine and boosting choices."""
    if engine is not None:
        settings.engines.segmentation = engine
    if registration is not None:
        settings.engines.registration = registration
    if boosting is not None:
        settings.tracking.boosting = boosting
    return settings


def _check_arguments(
    console: Console,
    settings: Settings,
    inputs: tuple[Path, list[Path], Path | None],
    confirmed: list[Path],
    store: Path | None,
) -> None:
    """Exit 2 with a message naming the option when the arguments cannot be analysed (``inputs`` = baseline,
    follow-ups, prompts)."""
    from lesiontrack.service import check_engine_settings  # the analysis stack (see track)

    baseline, followups, prompts = inputs
    if store is not None and store.exists() and any(store.iterdir()):
        console.print(f"[red]error:[/] --store {store}: not empty (the embedded store of one run goes to a new folder)")
        raise typer.Exit(2)
    for folder in confirmed:
        if folder.resolve() not in {f.resolve() for f in followups}:
            console.print(f"[red]error:[/] --confirmed {folder}: not one of the --followup folders")
            raise typer.Exit(2)
    try:
        check_engine_settings(settings)
        _check_inputs(baseline, followups, prompts)
    except (ConfigError, ValueError, InputError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc


def _analyse(
    console: Console,
    settings: Settings,
    inputs: tuple[Path, list[Path], Path | None],
    confirmed: list[Path],
    store_dir: Path,
) -> LocalAnalysis:
    """The folders analysed as the service's jobs, with a progress bar; a folder that cannot be read exits 2."""
    from lesiontrack.local_analysis import FolderError, analyse_folders  # the analysis stack (see track)

    baseline, followups, prompts = inputs
    try:
        with _progress(console, len(followups)) as on_progress:
            return analyse_folders(
                settings,
                baseline=baseline,
                followups=followups,
                store_dir=store_dir,
                prompts=prompts,
                confirmed=confirmed,
                progress=on_progress,
            )
    except FolderError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc


@contextmanager
def _progress(console: Console, followups: int) -> Iterator[Callable[[str, str], None]]:
    """A Rich bar over the jobs' steps: ``on_progress(series_uid, step or outcome)``."""
    from lesiontrack.pipeline.jobs.contract import STEP_NAMES  # the analysis stack (see track)

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("analysis", total=followups * len(STEP_NAMES))
        seen: list[str] = []

        def on_progress(series_uid: str, message: str) -> None:
            if series_uid not in seen:
                seen.append(series_uid)
            step = message in STEP_NAMES
            done = bar.tasks[0].completed + (1 if step else 0)
            total = max(bar.tasks[0].total or 0, done)
            bar.update(task, completed=done, total=total, description=f"follow-up {len(seen)}: {message}"[:60])

        yield on_progress


def _report(console: Console, run: LocalAnalysis) -> None:
    """One table per timepoint from the embedded store (lesions, flags, candidates, RECIST: what the dashboard
    would show), and a line for each timepoint that was not analysed, with the reason."""
    from lesiontrack.demo import lesion_table, render_table  # the analysis stack (see track)

    tables = {t.series_uid: t for t in lesion_table(run.session_factory, run.patient_pk)}
    for i, tp in enumerate(run.timepoints):
        role = "baseline" if tp.baseline else f"T{i}"
        if tp.series_uid in tables:
            rows = tables[tp.series_uid]
            rows.label = role + (" (confirmed)" if tp.confirmed else "")
            render_table([rows], console)
        elif not tp.baseline:
            state = tp.state.value if tp.state is not None else "not analysed"
            console.print(f"{role} — {tp.study_date or '?'} — series {tp.series_uid}: {state}: {tp.reason or '-'}")


def _check_inputs(baseline: Path, followups: list[Path], prompts: Path | None) -> None:
    """Clear errors naming the folder or file before anything runs: every folder holds a readable CT series of at
    least 2 slices, and the baseline's lesions (its SEG/SR, or ``prompts``) can be read."""
    from lesiontrack.models.imaging.dicom_read import read_series  # the analysis stack (see track)

    # lazy: CLI start-up (see lesiontrack/commands/__init__.py)
    from lesiontrack.pipeline.dicom.prompt_sources import PromptSourceError, load_prompts_json, prompts_from_directory

    cts = {d: _read_ct(d, read_series) for d in [baseline, *followups]}
    for d, ct in cts.items():
        check_registrable(ct, d, "baseline CT" if d == baseline else "follow-up CT")
    base_ct = cts[baseline]
    try:
        if prompts is not None:
            load_prompts_json(prompts, base_ct, series_uid=str(base_ct.meta.get("SeriesInstanceUID", "")))
        else:
            prompts_from_directory(baseline, base_ct)
    except PromptSourceError as exc:
        raise ValueError(str(exc)) from exc


def _read_ct(folder: Path, read_series: Callable[..., Volume]) -> Volume:
    """The CT series of ``folder`` (the one with most image files; SEG/SR and other objects are ignored)."""
    from lesiontrack.models.imaging.dicom_read import group_series  # the analysis stack (see track)

    try:
        groups = group_series(folder)
    except Exception as exc:
        raise InputError(folder, f"cannot list its DICOM series ({type(exc).__name__}: {exc})") from exc
    ct_like = {}
    for uid, files in groups.items():
        try:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["Modality"])
        except Exception as exc:
            raise InputError(files[0], f"not readable as DICOM ({type(exc).__name__}: {exc})") from exc
        if str(getattr(ds, "Modality", "")) not in ("SEG", "SR", "PR", "KO", "RTSTRUCT"):
            ct_like[uid] = files
    if not ct_like:
        raise ValueError(f"{folder}: no CT series found")
    uid = max(ct_like, key=lambda u: len(ct_like[u]))
    try:
        return read_series(ct_like[uid], series_uid=uid)
    except Exception as exc:
        raise InputError(folder, f"cannot read its CT series ({type(exc).__name__}: {exc})") from exc
