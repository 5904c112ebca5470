"""`lesiontrack demo` (= `make demo`): the whole service on a synthetic patient, end to end, in a few minutes."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from rich.status import Status

    from lesiontrack.config.settings import Settings
    from lesiontrack.demo_data import DemoSeries
    from lesiontrack.pipeline.jobs.store import JobView
    from lesiontrack.service import LesionTrackService


def demo(
    workdir: Path | None = typer.Option(None, help="keep everything here (default: a temporary folder)"),
    seed: int = typer.Option(11, help="phantom patient seed"),
    size: str = typer.Option("96x144x144", help="slices x rows x columns of the phantom CT"),
    spacing_mm: float = typer.Option(2.5, help="voxel size of the phantom CT (mm)"),
    lesions: int = typer.Option(5, help="number of lesions"),
    followups: int = typer.Option(3, min=1, help="number of follow-ups (each propagated from the baseline SEG)"),
    timeout: float = typer.Option(900.0, help="seconds to wait for each analysis"),
    keep_running: bool | None = typer.Option(
        None,
        "--keep-running/--no-keep-running",
        help="keep the service (and dashboard) up until Ctrl-C (default: yes when run from a terminal)",
    ),
) -> None:
    """Start the service on free ports, send a phantom baseline + SEG and three follow-ups, print the lesion table."""
    # the service, the demo helpers and the synthetic patient load the whole analysis stack (seconds):
    # imported when the command runs, not when the CLI starts
    from lesiontrack.demo import demo_settings, send_files, wait_for_job, write_demo_config
    from lesiontrack.demo_data import make_patient  # lazy: CLI start-up
    from lesiontrack.service import LesionTrackService  # lazy: CLI start-up

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    logging.getLogger("lesiontrack.web.app").setLevel(logging.ERROR)
    shape = _shape(size)
    root = Path(tempfile.mkdtemp(prefix="lesiontrack-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with console.status(f"generating the synthetic patient (phantom CT, lesion SEG, {followups} follow-ups)..."):
        patient = make_patient(
            root / "patient",
            seed=seed,
            shape=shape,
            spacing=(spacing_mm,) * 3,
            n_lesions=lesions,
            n_followups=followups,
        )
    console.print(
        f"patient {patient.patient_id}: baseline {len(patient.baseline.files)} slices, "
        f"{len(patient.lesions)} lesions in a DICOM-SEG, {len(patient.followups)} follow-ups "
        f"({time.monotonic() - t0:.0f}s)"
    )
    settings = demo_settings(root / "data")
    service = LesionTrackService(settings).start()
    url = f"http://127.0.0.1:{service.http_port}/" if service.http_port else None
    console.print(
        f"service: DICOM {settings.dicom.ae_title}@127.0.0.1:{settings.dicom.port}"
        + (f", dashboard {url}" if url else "")
        + f", data {settings.data_dir}"
    )
    try:
        with console.status("sending baseline CT + SEG over DICOM..."):
            send_files(settings, [*patient.baseline.files, patient.seg_file])
            view = wait_for_job(service.jobs(), patient.baseline.series_uid, timeout)
        console.print(f"baseline: job {view.id} → {view.state.value} ({view.error or 'ok'})")
        for fu in patient.followups:
            _send_followup(console, settings, service, fu, timeout)
        _print_lesion_table(console, service, patient.patient_id)
        console.print(f"total {time.monotonic() - t0:.0f}s")
        config = write_demo_config(settings, root / "lesiontrack.toml")
        if keep_running is None:
            keep_running = sys.stdin.isatty() and sys.stdout.isatty()
        if keep_running and url:
            console.print(f"dashboard: {url} (API key: demo) — the service keeps running until you press Ctrl-C")
            service.run_until_signal()
    finally:
        service.stop()
        console.print(f"all files (DICOM received, SEG/SR written, database) are in {root}")
    console.print(
        "the service has stopped. To browse these results in the dashboard again run\n"
        f"  lesiontrack --config {config} serve\n"
        f"and open http://127.0.0.1:{settings.http.port}/ (API key: demo)"
    )


def _shape(size: str) -> tuple[int, int, int]:
    """``--size`` (slices x rows x columns) as a shape."""
    try:
        dims = [int(v) for v in size.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) != 3:
        raise typer.BadParameter(f"--size must look like 96x144x144, got {size!r}")
    return (dims[0], dims[1], dims[2])


def _send_followup(
    console: Console, settings: Settings, service: LesionTrackService, fu: DemoSeries, timeout: float
) -> None:
    """Send one follow-up, show its job's progress and print its outcome and prompt source."""
    from lesiontrack.demo import send_files, wait_for_job  # the analysis stack (see demo)
    from lesiontrack.pipeline.jobs.contract import job_results  # lazy: CLI start-up

    status = console.status(f"sending {fu.label}...")
    status.start()
    try:
        send_files(settings, fu.files)
        t1 = time.monotonic()

        def show(v: JobView, label: str = fu.label, t1: float = t1, status: Status = status) -> None:
            status.update(f"{label}: job {v.id} {v.state.value} — {v.step or 'waiting'} ({time.monotonic() - t1:.0f}s)")

        view = wait_for_job(service.jobs(), fu.series_uid, timeout, show)
    finally:
        status.stop()
    took = sum(view.step_timings.values())
    console.print(
        f"{fu.label}: job {view.id} → {view.state.value} in {took:.0f}s "
        + ", ".join(f"{k} {v:.1f}s" for k, v in view.step_timings.items())
    )
    if view.error:
        console.print(f"  [red]{view.error}[/red]")
    match = job_results(view.step_outputs).match
    if match is not None and match.prompt_source is not None:
        console.print(f"  prompted from: {match.prompt_source.reason}")


def _print_lesion_table(console: Console, service: LesionTrackService, patient_id: str) -> None:
    """The patient's lesions × timepoints as the service recorded them, with each timepoint's result files."""
    from sqlalchemy import select  # the database and result stack load with the analysis (see demo)

    from lesiontrack.db.models import Patient  # lazy: CLI start-up
    from lesiontrack.demo import lesion_table, render_table  # lazy: CLI start-up
    from lesiontrack.pipeline.jobs.contract import job_results  # lazy: CLI start-up

    if service.session_factory is None:
        raise RuntimeError("the demo service has no database")
    with service.session_factory() as s:
        patient_pk = s.scalar(select(Patient.id).where(Patient.patient_id == patient_id))
    if patient_pk is None:
        raise RuntimeError(f"patient {patient_id} is not in the database after the demo run")
    table = lesion_table(service.session_factory, patient_pk)
    for tp in table:
        latest = service.jobs().latest_for_series(tp.series_uid)
        if latest is not None:
            tp.files = job_results(latest.step_outputs).result_files
    render_table(table, console)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
