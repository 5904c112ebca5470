"""Where the lesions to track come from: a prompts JSON file (schema in docs/prompts.md), a DICOM-SEG, a TID 1500 SR,
a presentation state (GSPS) or an RT structure set.

:func:`load_prompts_json` parses the documented JSON (points / boxes in LPS or RAS mm or CT voxel indices, and
LesionLocator's own ``{"1": {"point": [z, y, x]}}`` voxel format). :func:`prompts_from_directory` finds the SEG, SR,
PR and RTSTRUCT objects in a folder that reference the given CT series, hands each to its reader
(:mod:`pipeline.dicom.seg.reader`, :mod:`pipeline.dicom.sr.reader`, :mod:`pipeline.dicom.annotations`) and merges their
lesions by
precedence.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import ArrayLike
from pydicom.dataset import Dataset

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.dicom.annotations.common import AnnotationWarning, SourcedPrompts, merge_by_precedence
from lesiontrack.pipeline.dicom.annotations.gsps import GSPS_SOP_CLASSES, read_gsps_prompts
from lesiontrack.pipeline.dicom.annotations.rtstruct import RTSTRUCT_SOP_CLASS, read_rtstruct_prompts
from lesiontrack.pipeline.dicom.seg.reader import SEG_SOP_CLASSES, read_seg_prompts
from lesiontrack.pipeline.dicom.sr.reader import read_sr_prompts

log = logging.getLogger(__name__)

SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.11",
}


class PromptSourceError(ValueError):
    """A prompt source is unreadable or inconsistent; the message names the file and the problem."""


class NoLesionInAnnotation(PromptSourceError):
    """The annotation object is readable but marks no lesion that can be tracked (the message says why)."""


#: the object a prompt came from, named as a reader names it (issue 29 item 6), by the object's modality; a prompts
#: JSON file (pipeline.jobs.ports.PROMPT_FILE) is "points"
PROMPT_OBJECTS = {"SEG": "SEG", "SR": "SR", "PR": "GSPS", "RTSTRUCT": "RTSTRUCT", "POINTS": "points"}


def with_prompt_object(prompts: list[Prompt], modality: str) -> list[Prompt]:
    """``prompts`` with ``meta["prompt_object"]``: the kind of object they were read from (SEG, SR, GSPS, RTSTRUCT,
    points), carried by the tracked lesion into the database, the SR and the dashboard."""
    name = PROMPT_OBJECTS.get(modality.upper())
    if name is None:
        return prompts
    return [replace(p, meta={**p.meta, "prompt_object": name}) for p in prompts]


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


def _converter(system: str, grid: Volume | None) -> Callable[[ArrayLike], np.ndarray]:
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
    found = find_annotation_objects(directory, ct_series_uid, unreadable)
    return [f.path for f in found if f.modality == "SEG"], [f.path for f in found if f.modality == "SR"]


@dataclass(frozen=True)
class FoundAnnotation:
    """One annotation object in a folder: SEG, SR, PR (presentation state) or RTSTRUCT."""

    path: Path
    modality: str
    sop_instance_uid: str
    content_key: str  # ContentDate + ContentTime (or the structure set's date/time): newer wins at equal rank


def annotation_kind(sop_class_uid: str) -> str | None:
    """SEG, SR, PR or RTSTRUCT for an annotation SOP class; None for anything else."""

    if sop_class_uid in SEG_SOP_CLASSES:
        return "SEG"
    if sop_class_uid in SR_SOP_CLASSES:
        return "SR"
    if sop_class_uid in GSPS_SOP_CLASSES:
        return "PR"
    if sop_class_uid == RTSTRUCT_SOP_CLASS:
        return "RTSTRUCT"
    return None


def find_annotation_objects(
    directory: str | Path, ct_series_uid: str | None = None, unreadable: list[tuple[Path, str]] | None = None
) -> list[FoundAnnotation]:
    """Every SEG, SR, presentation state and RT structure set in ``directory`` (recursive) that references
    ``ct_series_uid`` when it is given; unparseable DICOM files are listed in ``unreadable``."""

    out: list[FoundAnnotation] = []
    for f in sorted(Path(directory).rglob("*")):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(
                f,
                stop_before_pixels=True,
                force=f.suffix.lower() == ".dcm",
                specific_tags=[
                    "SOPClassUID",
                    "SOPInstanceUID",
                    "Modality",
                    "ContentDate",
                    "ContentTime",
                    "StructureSetDate",
                    "StructureSetTime",
                    "PresentationCreationDate",
                    "PresentationCreationTime",
                ],
            )
        except Exception as exc:
            if unreadable is not None and _has_dicom_preamble(f):
                unreadable.append((f, f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
            continue
        kind = annotation_kind(str(getattr(ds, "SOPClassUID", "")))
        if kind is None:
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
        date = ds.get("ContentDate") or ds.get("PresentationCreationDate") or ds.get("StructureSetDate") or ""
        time_ = ds.get("ContentTime") or ds.get("PresentationCreationTime") or ds.get("StructureSetTime") or ""
        out.append(FoundAnnotation(f, kind, str(ds.get("SOPInstanceUID", "")), f"{date}{time_}"))
    return out


def _referenced_series(path: Path) -> set[str]:

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    out: set[str] = set()

    def walk(d: Dataset) -> None:
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


def prompts_from_directory(
    directory: str | Path, ct: Volume, *, warnings: list[AnnotationWarning] | None = None
) -> list[Prompt]:
    """Prompts from every annotation in ``directory`` that references ``ct``'s series — SEG, TID 1500 SR,
    presentation states (GSPS) and RT structure sets — one per lesion, by :func:`merge_by_precedence` (a SEG over
    contours over drawings, then the newer object). Annotations that give no lesion are appended to ``warnings``."""
    series_uid = str(ct.meta.get("SeriesInstanceUID", "")) or None
    unreadable: list[tuple[Path, str]] = []
    found = find_annotation_objects(directory, series_uid, unreadable)
    sink: list[AnnotationWarning] = warnings if warnings is not None else []
    sources: list[SourcedPrompts] = []
    errors: list[str] = []
    for f in found:
        try:
            prompts = prompts_from_object(f.path, f.modality, ct, sink)
        except PromptSourceError as exc:
            errors.append(str(exc))
            sink.append(AnnotationWarning(f"{f.modality} {f.sop_instance_uid} ({f.path.name})", "object", str(exc)))
            continue
        sources.append(SourcedPrompts(f.modality, f.content_key, prompts, f"{f.modality} {f.path.name}"))
    merged, superseded = merge_by_precedence(sources)
    sink.extend(superseded)
    for w in sink:
        log.warning("annotation not used: %s", w)
    if merged:
        return merged
    if errors:
        raise PromptSourceError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    if found:
        names = ", ".join(f"{f.modality} {f.path.name}" for f in found)
        why = "; ".join(str(w) for w in sink[:5]) or "no lesion in them"
        raise PromptSourceError(f"{directory}: the annotations found ({names}) give no lesion to track: {why}")
    if unreadable:
        path, why = unreadable[0]
        more = f" (and {len(unreadable) - 1} more unreadable files)" if len(unreadable) > 1 else ""
        raise PromptSourceError(
            f"{path}: cannot read this DICOM file ({why}){more}; no usable SEG, SR, GSPS or RTSTRUCT in {directory}"
        )
    raise PromptSourceError(
        f"{directory}: no DICOM-SEG, TID 1500 SR, presentation state (GSPS) or RTSTRUCT referencing series "
        f"{series_uid} (give --prompts JSON instead)"
    )


def prompts_from_object(
    path: str | Path, modality: str, ct: Volume, warnings: list[AnnotationWarning] | None = None
) -> list[Prompt]:
    """The prompts of one annotation object (SEG, SR, PR or RTSTRUCT) on ``ct``; what it cannot use goes to
    ``warnings``. Raises :class:`PromptSourceError` naming the file when it is unreadable or gives no lesion."""
    modality = modality.upper()
    sink: list[AnnotationWarning] = warnings if warnings is not None else []
    if modality == "SEG":
        return with_prompt_object(prompts_from_seg(path, ct), modality)
    if modality == "SR":
        return with_prompt_object(_call_reader(lambda p, c: read_sr_prompts(p, c, warnings=sink), path, ct), modality)
    if modality in ("PR", "RTSTRUCT"):
        reader = read_gsps_prompts if modality == "PR" else read_rtstruct_prompts

        def read(p: Path, c: Volume) -> list[Prompt]:
            res = reader(p, c)
            sink.extend(res.warnings)
            if not res.prompts and res.warnings:
                raise NoLesionInAnnotation(f"{p}: no lesion in the {modality}: {res.warnings[0]}")
            return res.prompts

        return with_prompt_object(_call_reader(read, path, ct), modality)
    raise PromptSourceError(f"{path}: {modality} is not an annotation object LesionTrack reads")


def prompts_from_seg(path: str | Path, ct: Volume) -> list[Prompt]:
    return _call_reader(read_seg_prompts, path, ct)


def prompts_from_sr(path: str | Path, ct: Volume) -> list[Prompt]:
    return _call_reader(read_sr_prompts, path, ct)


def _call_reader(reader: Callable[[Path, Volume], list[Prompt]], path: str | Path, ct: Volume) -> list[Prompt]:
    try:
        prompts = reader(Path(path), ct)
    except PromptSourceError:
        raise
    except Exception as exc:  # a corrupt or unreadable annotation: name the file and the problem
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PromptSourceError(f"{path}: cannot read the annotation ({type(exc).__name__}: {detail})") from exc
    if not prompts:
        raise NoLesionInAnnotation(f"{path}: no lesions found in the annotation")
    return prompts
