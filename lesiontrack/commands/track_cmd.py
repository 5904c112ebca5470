"""`lesiontrack track`: track the lesions annotated on a baseline CT through follow-up CTs (folders of DICOM).

Writes to ``--out``: per timepoint a NIfTI label map (label = lesion number as on the baseline), ``tracking.json``
(per lesion per timepoint: tracking UID/ID, status, volume, centre, notes) and, for every follow-up, a new DICOM-SEG
and TID 1500 SR (``dicom/<series>/``) with the measurements and changes against the earlier timepoints.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from lesiontrack.cli_errors import InputError, check_registrable, guarded
from lesiontrack.context import state

if TYPE_CHECKING:
    from pipeline.lesions import Timepoint
    from pipeline.measurements import LesionMeasurement

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
    boosting: bool = typer.Option(False, "--boost/--no-boost", help="LinGuinE boosting (re-prompt at the centre)"),
    dicom: bool = typer.Option(True, "--dicom/--no-dicom", help="also write DICOM-SEG + SR for each follow-up"),
    confirmed: list[Path] = typer.Option(
        [],
        "--confirmed",
        exists=True,
        file_okay=False,
        help="a --followup folder whose SEG/SR a person made or verified (repeat): later timepoints are propagated "
        "from the nearest such timepoint (lesions matched by Tracking UID, Tracking ID or label)",
    ),
) -> None:
    """Track baseline lesions through follow-up CTs; write label maps, tracking.json and DICOM-SEG + SR."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from models.engines import build_registration, build_segmentation
    from models.imaging.dicom_read import read_series
    from pipeline.lesions import Timepoint
    from pipeline.prompt_sources import PromptSourceError, load_prompts_json, prompts_from_directory
    from pipeline.tracking import (
        ProgressEvent,
        TrackingOptions,
        label_map,
        track_lesions,
        tracking_summary,
    )

    settings = state(ctx).settings()
    console = Console(stderr=True)
    dirs = [baseline, *followup]
    try:
        cts = [_read_ct(d, read_series) for d in dirs]
        for ct, d in zip(cts, dirs, strict=True):
            check_registrable(ct, d, "baseline CT" if d == baseline else "follow-up CT")
    except (ValueError, InputError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    tps = [
        Timepoint(
            str(ct.meta.get("SeriesInstanceUID", f"series{i}")),
            ct,
            study_date=_s(ct.meta.get("StudyDate")),
            study_uid=_s(ct.meta.get("StudyInstanceUID")),
            meta={"folder": str(d)},
        )
        for i, (ct, d) in enumerate(zip(cts, dirs, strict=True))
    ]
    order = sorted(range(len(tps)), key=lambda i: (tps[i].study_date or "", i))
    tps = [tps[i] for i in order]
    source_index = order.index(0)
    base_ct = tps[source_index].ct
    annotation_warnings: list[Any] = []
    try:
        if prompts is not None:
            lesion_prompts = load_prompts_json(prompts, base_ct, series_uid=tps[source_index].series_uid)
        else:
            lesion_prompts = prompts_from_directory(baseline, base_ct, warnings=annotation_warnings)
    except (PromptSourceError, ValueError) as exc:
        for w in annotation_warnings:
            console.print(f"[yellow]warning:[/] {w}")
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    for w in annotation_warnings:  # an annotation that did not become a lesion is said, never dropped silently
        console.print(f"[yellow]warning:[/] {w}")
    verified: dict[int, list[Any]] = {}
    for folder in confirmed:
        resolved = [i for i, tp in enumerate(tps) if Path(str(tp.meta["folder"])).resolve() == folder.resolve()]
        if not resolved or resolved[0] == source_index:
            console.print(f"[red]error:[/] --confirmed {folder}: not one of the --followup folders")
            raise typer.Exit(2)
        t = resolved[0]
        try:
            verified[t] = same_lesions(prompts_from_directory(folder, tps[t].ct), lesion_prompts)
        except (PromptSourceError, ValueError) as exc:
            console.print(f"[red]error:[/] --confirmed {folder}: {exc}")
            raise typer.Exit(2) from exc

    try:
        seg_engine = build_segmentation(engine, settings.engines, device=settings.compute.device)
        reg_engine = build_registration(registration, settings.engines, device=settings.compute.device)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    console.print(
        f"{len(lesion_prompts)} lesions, {len(tps)} timepoints (baseline #{source_index}), "
        f"segmentation {seg_engine.name}, registration {reg_engine.name}"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("tracking", total=None)

        def on_progress(ev: ProgressEvent) -> None:
            bar.update(
                task, completed=ev.done, total=ev.total, description=f"{ev.stage} T{ev.timepoint} {ev.message}"[:60]
            )

        track_lesions(
            tps,
            lesion_prompts,
            source_index=source_index,
            registration=reg_engine,
            segmentation=seg_engine,
            options=TrackingOptions(boosting=boosting),
            progress=on_progress,
            confirmed=verified or None,
        )

    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = tracking_summary(tps)
    summary["source_index"] = source_index
    summary["confirmed_indices"] = sorted(verified)
    summary["propagation"] = "annotation"  # every timepoint from the baseline annotation (propagated_from per lesion)
    summary["annotation_warnings"] = [str(w) for w in annotation_warnings]
    for t, tp in enumerate(tps):
        path = out / f"T{t}_{_safe(tp.series_uid)}_labels.nii.gz"
        label_map(tp).write(str(path))
        summary["timepoints"][t]["label_map"] = path.name
    if dicom:
        try:
            written = _write_dicom(tps, source_index, out / "dicom")
            for t, files in written.items():
                summary["timepoints"][t]["dicom"] = [str(f.relative_to(out)) for f in files]
        except Exception as exc:
            console.print(f"[yellow]warning:[/] DICOM-SEG/SR not written: {exc}")
            summary["dicom_error"] = str(exc)
    (out / "tracking.json").write_text(json.dumps(summary, indent=1))
    for les in summary["lesions"]:
        states = " → ".join(f"{x['status']}({x['volume_mm3']:.0f} mm³)" for x in les["timepoints"])
        console.print(f"  {les['tracking_id']}: {states}")
    console.print(f"written to {out}")


def same_lesions(found: list[Any], baseline: list[Any]) -> list[Any]:
    """A confirmed timepoint's prompts with the baseline's lesion labels (matched by Tracking UID, Tracking ID or
    segment label, :mod:`pipeline.correction_matching`); unmatched lesions get new labels (added there)."""
    from dataclasses import replace

    import numpy as np

    from models.imaging.volume import Volume
    from pipeline.correction_matching import SegmentOfInterest, match_correction

    def soi(n: int, p: Any) -> SegmentOfInterest:
        blank = Volume(np.zeros((1, 1, n + 1), np.uint8))  # different shapes: never matched by overlap
        label = str(p.meta.get("segment_label") or p.identity.tracking_id)
        return SegmentOfInterest(n, p.identity.tracking_uid, p.identity.tracking_id, label, blank)

    ours = [soi(n, p) for n, p in enumerate(baseline, start=1)]
    mine = [soi(n + 1000, p) for n, p in enumerate(found, start=1)]
    label_of = {p.identity.tracking_uid: p.identity.label for p in baseline}
    next_label = max([*label_of.values(), 0]) + 1
    out = []
    for p, m in zip(found, match_correction(mine, ours).matches, strict=True):
        label = label_of.get(m.tracking_uid)
        if label is None:
            label, next_label = next_label, next_label + 1
        ident = replace(p.identity, tracking_uid=m.tracking_uid, tracking_id=m.tracking_id, label=label)
        out.append(replace(p, identity=ident))
    return out


def _write_dicom(tps: list[Timepoint], source_index: int, out: Path) -> dict[int, list[Path]]:
    """A new SEG + TID 1500 SR per non-source timepoint, measurements against all earlier timepoints."""
    import pydicom

    from pipeline.lesions import LesionStatus
    from pipeline.measurements import lesion_changes, measure_tracked
    from pipeline.seg_writer import save_new, write_seg
    from pipeline.sr_writer import LesionReport, TimePoint, write_sr

    history: dict[str, list[LesionMeasurement]] = {}
    written: dict[int, list[Path]] = {}
    for t, tp in enumerate(tps):
        for les in tp.lesions:
            history.setdefault(les.identity.tracking_uid, []).append(measure_tracked(les, tp.ct, tp.series_uid))
        if t == source_index:
            continue
        files = tp.ct.meta.get("source_files") or []
        if not files:
            raise ValueError(f"series {tp.series_uid}: source files unknown")
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        if not any(les.status is LesionStatus.PRESENT for les in tp.lesions):
            log.info("series %s: no present lesion, SEG/SR skipped", tp.series_uid)
            written[t] = []
            continue
        seg = write_seg(datasets, tp.lesions)
        reports = [
            LesionReport(
                history[les.identity.tracking_uid][-1],
                lesion_changes(history[les.identity.tracking_uid]),
                prompt_origin=les.meta.get("prompt_origin"),
            )
            for les in tp.lesions
            if les.status is LesionStatus.PRESENT
        ]
        sr = write_sr(datasets, seg, reports, time_point=TimePoint(f"T{t}", t, tp.study_date))
        folder = out / _safe(tp.series_uid)
        written[t] = [save_new(seg.dataset, folder), save_new(sr.dataset, folder)]
    return written


def _read_ct(folder: Path, read_series: Any) -> Any:
    """The CT series of ``folder`` (the one with most image files; SEG/SR and other objects are ignored)."""
    import pydicom

    from models.imaging.dicom_read import group_series

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


def _s(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def _safe(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]", "_", text)[:64]
