"""`lesiontrack register`: register a baseline scan onto a follow-up, map points / warp labels, save the field."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lesiontrack.cli_errors import InputError, check_registrable, guarded, read_image
from lesiontrack.context import state

if TYPE_CHECKING:
    import numpy as np

    from lesiontrack.models.imaging.volume import Volume


def _read_volume(path: Path, what: str) -> Volume:
    """A volume for ``what`` (an option name); failures name the path (see lesiontrack.cli_errors)."""
    volume: Volume = read_image(path, f"{what} volume")
    return volume


def _read_points(path: Path) -> np.ndarray:
    import numpy as np  # lazy: CLI start-up

    if not path.is_file():
        raise InputError(path, "no such points file")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if not {"x", "y", "z"} <= set(cols):
            raise typer.BadParameter(f"{path}: needs a header with columns x,y,z (found {cols})")
        rows = []
        for n, row in enumerate(reader, start=2):
            row = {k.strip().lower(): v for k, v in row.items() if k}
            try:
                rows.append([float(row["x"]), float(row["y"]), float(row["z"])])
            except (TypeError, ValueError) as exc:
                raise typer.BadParameter(f"{path}: line {n}: x,y,z must be numbers ({exc})") from exc
    return np.array(rows, dtype=float).reshape(-1, 3)


def register(app: typer.Typer) -> None:
    @app.command("register")
    @guarded
    def register_cmd(
        ctx: typer.Context,
        baseline: Path = typer.Option(..., "--baseline", help="baseline (prior) DICOM series folder or NIfTI/NRRD"),
        followup: Path = typer.Option(..., "--followup", help="follow-up DICOM series folder or NIfTI/NRRD"),
        engine: str | None = typer.Option(
            None, "--engine", help="convex | simpleitk | unigradicon (default: engines.registration)"
        ),
        map_points: Path | None = typer.Option(None, "--map-points", help="CSV x,y,z (LPS mm) on the baseline"),
        out: Path | None = typer.Option(None, "--out", help="CSV of the mapped points on the follow-up"),
        warp_labels: Path | None = typer.Option(None, "--warp-labels", help="baseline label map (NIfTI/NRRD)"),
        out_labels: Path | None = typer.Option(None, "--out-labels", help="warped label map on the follow-up"),
        save_field: Path | None = typer.Option(None, "--save-field", help="displacement field (NIfTI, LPS mm)"),
        device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default: compute.device)"),
    ) -> None:
        """Register BASELINE onto FOLLOWUP and print a one-line JSON summary."""
        if (map_points is None) != (out is None):
            raise typer.BadParameter("--map-points and --out go together")
        if (warp_labels is None) != (out_labels is None):
            raise typer.BadParameter("--warp-labels and --out-labels go together")
        settings = state(ctx).settings()
        from lesiontrack.models.engines import build_registration  # lazy: CLI start-up
        from lesiontrack.models.registration.base import EngineUnavailable  # lazy: CLI start-up

        try:
            base_vol = _read_volume(baseline, "--baseline")
            fu_vol = _read_volume(followup, "--followup")
            check_registrable(base_vol, baseline, "--baseline volume")
            check_registrable(fu_vol, followup, "--followup volume")
            points = _read_points(map_points) if map_points else None
            labels = _read_volume(warp_labels, "--warp-labels") if warp_labels else None
            eng = build_registration(
                engine, settings.engines, device=device or settings.compute.device, seed=settings.compute.seed
            )
            reg = eng.register(base_vol, fu_vol)
        except (ValueError, EngineUnavailable, RuntimeError) as exc:
            if isinstance(exc, typer.BadParameter):
                raise
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from exc
        summary: dict[str, object] = {
            "engine": reg.engine,
            "device": reg.quality.device,
            "seconds": reg.quality.stage_seconds.get("total"),
            "similarity_metric": reg.quality.similarity_metric,
            "similarity_before": reg.quality.similarity_before,
            "similarity_after": reg.quality.similarity_after,
            "folding_fraction": reg.quality.folding_fraction,
        }
        if points is not None and out is not None:
            mapped = reg.map_points_to_followup(points)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["x", "y", "z"])
                for p in mapped:
                    w.writerow([f"{v:.4f}" for v in p])
            summary["points"] = len(mapped)
            summary["points_out"] = str(out)
        if labels is not None and out_labels is not None:
            import numpy as np  # lazy: CLI start-up

            warped = reg.warp_labels(labels)
            out_labels.parent.mkdir(parents=True, exist_ok=True)
            warped.write(str(out_labels))
            summary["labels_out"] = str(out_labels)
            summary["label_voxels"] = int(np.count_nonzero(warped.array))
        if save_field is not None:
            from lesiontrack.models.registration.field import DisplacementFieldRegistration  # lazy: CLI start-up

            if not isinstance(reg, DisplacementFieldRegistration):
                raise typer.BadParameter(f"--save-field: engine {reg.engine} produces no displacement field")
            save_field.parent.mkdir(parents=True, exist_ok=True)
            reg.save_field(save_field)
            summary["field_out"] = str(save_field)
        typer.echo(json.dumps(summary, default=float))
