"""`lesiontrack synth`: write synthetic longitudinal patients (DICOM series + label maps + truth.json)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lesiontrack.cli_errors import InputError, guarded, read_image


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)


@guarded
def synth(
    out: Path = typer.Option(..., "--out", help="output folder (one sub-folder per patient)"),
    patients: int = typer.Option(1, "--patients", min=1, help="number of patients"),
    timepoints: int = typer.Option(3, "--timepoints", min=2, help="scans per patient, baseline included"),
    seed: int = typer.Option(0, "--seed", help="random seed (patient i uses seed + i)"),
    source: Path | None = typer.Option(
        None, "--source", help="source CT: NIfTI/NRRD/MHA file or DICOM folder (default: the procedural phantom)"
    ),
    labels: Path | None = typer.Option(None, "--labels", help="lesion label map for --source (NIfTI/NRRD)"),
    size: str = typer.Option(
        "small", "--size", help="phantom size: small (160x160x100 @ 2 mm) or chest (512x512x200 @ 0.7x0.7x1.5 mm)"
    ),
    no_dicom: bool = typer.Option(False, "--no-dicom", help="write only label maps and truth.json"),
) -> None:
    """Synthetic baseline + follow-up CTs with known lesion changes, motion and landmark truth."""
    import numpy as np  # lazy: CLI start-up

    from lesiontrack.synthetic.synthesis import SynthIdentity, synthesize_patient, write_patient  # lazy: CLI start-up

    if (source is None) != (labels is None):
        raise typer.BadParameter("--source and --labels go together")
    src_ct = src_lab = None
    kinds: dict[int, str] = {}
    if source is not None and labels is not None:
        for p in (source, labels):
            if not p.exists():
                raise typer.BadParameter(f"{p}: no such file or folder")
        src_ct = read_image(source, "--source CT")
        src_lab = read_image(labels, "--labels label map")
        if tuple(src_lab.shape) != tuple(src_ct.shape):
            raise InputError(
                labels, f"label map shape {tuple(src_lab.shape)} differs from the CT's {tuple(src_ct.shape)}"
            )
        if not src_lab.array.any():
            raise typer.BadParameter(f"{labels}: label map is empty (no lesion to track)")
    elif size not in ("small", "chest"):
        raise typer.BadParameter(f"--size must be small or chest, not {size!r}")

    summary = []
    for n in range(patients):
        pseed = seed + n
        if src_ct is None:
            from lesiontrack.synthetic.phantom import make_phantom  # lazy: CLI start-up

            ph = (
                make_phantom(pseed)
                if size == "small"
                else make_phantom(pseed, shape=(200, 512, 512), spacing=(0.7, 0.7, 1.5))
            )
            ct, lab = ph.ct, ph.lesions
            kinds = {x.label: x.kind for x in ph.lesion_info}
        elif src_lab is not None:
            ct, lab = src_ct, src_lab
        else:
            raise typer.BadParameter("--source and --labels go together")
        patient = synthesize_patient(
            ct,
            lab,
            np.random.default_rng(pseed),
            n_followups=timepoints - 1,
            identity=SynthIdentity(f"SYNTH-{pseed:04d}", f"Synthetic^Patient{pseed:04d}", pseed),
            lesion_kinds=kinds,
        )
        root = write_patient(patient, out, write_dicom=not no_dicom)
        summary.append(
            {
                "patient_id": patient.patient_id,
                "dir": str(root),
                "timepoints": len(patient.timepoints),
                "lesions": {tp.index: {k: v.status for k, v in tp.lesions.items()} for tp in patient.timepoints},
            }
        )
    typer.echo(json.dumps(summary, indent=1))
