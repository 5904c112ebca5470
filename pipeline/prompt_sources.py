"""Where the lesions to track come from: a prompts JSON file (schema in docs/prompts.md), a DICOM-SEG or a TID 1500 SR.

:func:`load_prompts_json` parses the documented JSON (points / boxes in LPS or RAS mm or CT voxel indices, and
LesionLocator's own ``{"1": {"point": [z, y, x]}}`` voxel format). :func:`prompts_from_directory` finds the SEG or
SR objects in a folder that reference the given CT series and hands them to the SEG / SR readers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.imaging.volume import Volume
from models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from pipeline.seg_reader import SEG_SOP_CLASSES

log = logging.getLogger(__name__)

SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.11",
}


class PromptSourceError(ValueError):
    """A prompt source is unreadable or inconsistent; the message names the file and the problem."""


def derived_uid(*parts: str) -> str:
    """A stable DICOM UID (2.25 form) from strings, e.g. the baseline series UID and the lesion label."""
    h = hashlib.sha256("|".join(parts).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


# ---- JSON -----------------------------------------------------------------------------------------------
def load_prompts_json(path: str | Path, grid: Volume | None = None, *, series_uid: str = "") -> list[Prompt]:
    """Prompts from a JSON file (see docs/prompts.md); ``grid`` (the CT) is needed for voxel coordinates."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PromptSourceError(f"{p}: not readable JSON ({exc})") from exc
    if isinstance(data, dict) and "lesions" not in data and data and all(k.isdigit() for k in data):
        return _lesionlocator_json(p, data, grid, series_uid)
    if not isinstance(data, dict) or not isinstance(data.get("lesions"), list) or not data["lesions"]:
        raise PromptSourceError(f"{p}: expected an object with a non-empty 'lesions' list")
    system = str(data.get("coordinate_system", "LPS")).upper()
    if system not in ("LPS", "RAS", "VOXEL"):
        raise PromptSourceError(f"{p}: coordinate_system must be LPS, RAS or voxel, got {system!r}")
    if system == "VOXEL" and grid is None:
        raise PromptSourceError(f"{p}: voxel coordinates need the CT grid")
    prompts: list[Prompt] = []
    seen: set[int] = set()
    for n, item in enumerate(data["lesions"], start=1):
        where = f"{p}: lesions[{n - 1}]"
        if not isinstance(item, dict):
            raise PromptSourceError(f"{where}: must be an object")
        label = int(item.get("label", n))
        if label < 1 or label in seen:
            raise PromptSourceError(f"{where}: label {label} must be a positive integer, unique in the file")
        seen.add(label)
        identity = LesionIdentity(
            tracking_uid=str(item.get("tracking_uid") or derived_uid(series_uid or str(p.name), str(label))),
            tracking_id=str(item.get("tracking_id") or f"L{label}"),
            label=label,
            anatomic_site=item.get("anatomic_site"),
            is_node=bool(item.get("is_node", False)),
        )
        conv = _converter(system, grid)
        keys = [k for k in ("point", "points", "box") if k in item]
        if len(keys) != 1:
            raise PromptSourceError(f"{where}: give exactly one of 'point', 'points', 'box'")
        try:
            if keys[0] == "box":
                box = np.asarray(item["box"], float)
                if box.shape != (2, 3):
                    raise ValueError("box must be [[x0, y0, z0], [x1, y1, z1]]")
                c = conv(box)
                prompts.append(Prompt(identity, PromptKind.BOX, box_mm=(c.min(0), c.max(0)), source=str(p)))
            else:
                pts = np.asarray(item[keys[0]], float).reshape(-1, 3)
                prompts.append(Prompt(identity, PromptKind.POINTS, points_mm=conv(pts), source=str(p)))
        except ValueError as exc:
            raise PromptSourceError(f"{where}: {exc}") from exc
    return prompts


def _converter(system: str, grid: Volume | None) -> Callable[[Any], np.ndarray]:
    if system == "LPS":
        return lambda a: np.asarray(a, float)
    if system == "RAS":
        return lambda a: np.asarray(a, float) * np.array([-1.0, -1.0, 1.0])
    if grid is None:
        raise PromptSourceError(f"{system} coordinates need the CT grid")
    return lambda a: grid.index_to_patient(np.asarray(a, float))


def _lesionlocator_json(p: Path, data: dict[str, Any], grid: Volume | None, series_uid: str) -> list[Prompt]:
    """LesionLocator's format: ``{"1": {"point": [z, y, x]}}`` / ``{"box": [zmin, zmax, ymin, ymax, xmin, xmax]}``."""
    if grid is None:
        raise PromptSourceError(f"{p}: LesionLocator-style voxel prompts need the CT grid")
    out = []
    for key in sorted(data, key=int):
        item, label = data[key], int(key)
        ident = LesionIdentity(derived_uid(series_uid or p.name, key), f"L{label}", label)
        if "point" in item:
            z, y, x = (float(v) for v in item["point"])
            out.append(
                Prompt(ident, PromptKind.POINTS, points_mm=grid.index_to_patient(np.array([[x, y, z]])), source=str(p))
            )
        elif "box" in item:
            z0, z1, y0, y1, x0, x1 = (float(v) for v in item["box"])
            c = grid.index_to_patient(np.array([[x0, y0, z0], [x1 - 1, y1 - 1, z1 - 1]]))  # half-open upper bound
            out.append(Prompt(ident, PromptKind.BOX, box_mm=(c.min(0), c.max(0)), source=str(p)))
        else:
            raise PromptSourceError(f"{p}: lesion {key!r} needs 'point' or 'box'")
    return out


# ---- DICOM SEG / SR -------------------------------------------------------------------------------------
def find_annotations(
    directory: str | Path, ct_series_uid: str | None = None, unreadable: list[tuple[Path, str]] | None = None
) -> tuple[list[Path], list[Path]]:
    """(SEG files, SR files) in ``directory`` (recursive) referencing ``ct_series_uid`` when it is given.

    Files with a DICOM preamble that do not parse are skipped and, when ``unreadable`` is given, listed there."""
    import pydicom

    segs: list[Path] = []
    srs: list[Path] = []
    for f in sorted(Path(directory).rglob("*")):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(
                f,
                stop_before_pixels=True,
                specific_tags=[
                    "SOPClassUID",
                    "Modality",
                    "ReferencedSeriesSequence",
                    "CurrentRequestedProcedureEvidenceSequence",
                ],
            )
        except Exception as exc:
            if unreadable is not None and _has_dicom_preamble(f):
                unreadable.append((f, f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
            continue
        sop = str(getattr(ds, "SOPClassUID", ""))
        if sop not in SEG_SOP_CLASSES and sop not in SR_SOP_CLASSES:
            continue
        if ct_series_uid:
            try:
                refs = _referenced_series(f)
            except Exception as exc:
                refs, why = set(), f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            else:
                why = "it references no series at all (truncated or incomplete file?)"
            if not refs:
                if unreadable is not None:
                    unreadable.append((f, why))
                continue
            if ct_series_uid not in refs:
                log.info("%s references another series; ignored", f.name)
                continue
        (segs if sop in SEG_SOP_CLASSES else srs).append(f)
    return segs, srs


def _referenced_series(path: Path) -> set[str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out: set[str] = set()

    def walk(d: Any) -> None:
        for elem in d:
            if elem.keyword == "SeriesInstanceUID" and d is not ds:
                out.add(str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    return out


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def prompts_from_directory(directory: str | Path, ct: Volume) -> list[Prompt]:
    """Prompts from the SEG (preferred) or SR in ``directory`` that reference ``ct``'s series."""
    series_uid = str(ct.meta.get("SeriesInstanceUID", "")) or None
    unreadable: list[tuple[Path, str]] = []
    segs, srs = find_annotations(directory, series_uid, unreadable)
    if segs:
        if len(segs) > 1:
            log.info("%d SEG objects found; using the first (%s)", len(segs), segs[0].name)
        return prompts_from_seg(segs[0], ct)
    if srs:
        return prompts_from_sr(srs[0], ct)
    if unreadable:
        path, why = unreadable[0]
        more = f" (and {len(unreadable) - 1} more unreadable files)" if len(unreadable) > 1 else ""
        raise PromptSourceError(
            f"{path}: cannot read this DICOM file ({why}){more}; no usable SEG or SR in {directory}"
        )
    raise PromptSourceError(
        f"{directory}: no DICOM-SEG or TID 1500 SR referencing series {series_uid} (give --prompts JSON instead)"
    )


def prompts_from_seg(path: str | Path, ct: Volume) -> list[Prompt]:
    reader = _reader("pipeline.seg_reader", ("read_seg_prompts", "seg_to_prompts", "read_prompts", "read_seg"))
    return _call_reader(reader, path, ct)


def prompts_from_sr(path: str | Path, ct: Volume) -> list[Prompt]:
    reader = _reader("pipeline.sr_reader", ("read_sr_prompts", "sr_to_prompts", "read_prompts", "read_sr"))
    return _call_reader(reader, path, ct)


def _reader(module: str, names: tuple[str, ...]) -> Callable[..., Any]:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise PromptSourceError(f"{module} is not available in this installation ({exc})") from exc
    for n in names:
        if hasattr(mod, n):
            return getattr(mod, n)
    raise PromptSourceError(f"{module} has none of {names}")


def _call_reader(reader: Callable[..., Any], path: str | Path, ct: Volume) -> list[Prompt]:
    try:
        try:
            result = reader(Path(path), ct)
        except TypeError:
            result = reader(Path(path))
    except PromptSourceError:
        raise
    except Exception as exc:  # a corrupt or unreadable annotation: name the file and the problem
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PromptSourceError(f"{path}: cannot read the annotation ({type(exc).__name__}: {detail})") from exc
    prompts = list(getattr(result, "prompts", result))
    if not prompts:
        raise PromptSourceError(f"{path}: no lesions found in the annotation")
    return prompts
