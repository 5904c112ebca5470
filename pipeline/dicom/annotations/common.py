"""What every annotation reader shares: warnings that name the object and the annotation, lesion identities from the
radiologist's label, the image geometry of the CT's slices, and the precedence when a study holds several objects."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind


@dataclass(frozen=True)
class AnnotationWarning:
    """An annotation that did not become a lesion (or became one with a caveat): never silently dropped."""

    obj: str  # "GSPS 1.2.3 (pr.dcm)"
    annotation: str  # "layer MEASURE, graphic 2 (POLYLINE)"
    reason: str
    lesion: LesionIdentity | None = None
    """Set when the annotation is a lesion the reader named (an SR measurement group) that cannot be tracked: the
    lesion is then reported "not assessed" with ``reason`` in every result, not only warned about."""

    def __str__(self) -> str:
        return f"{self.obj}: {self.annotation}: {self.reason}"


@dataclass
class ReadResult:
    """Prompts read from one annotation object, and what could not be used."""

    prompts: list[Prompt] = field(default_factory=list)
    warnings: list[AnnotationWarning] = field(default_factory=list)


def uid_from(*parts: str) -> str:
    h = hashlib.sha256("|".join(parts).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def normalise_label(label: str) -> str:
    """The label as a key: case, spacing and punctuation around it do not make another lesion."""
    return re.sub(r"\s+", " ", label.strip().strip(".:;,")).lower()


def identity_for(label: str | None, number: int, patient_key: str, fallback_scope: str) -> LesionIdentity:
    """A lesion identity from the radiologist's label: the same label on a later study of the patient is the same
    lesion (its Tracking UID derives from the patient and the label); without a label, one unique to this object."""
    if label:
        return LesionIdentity(uid_from("label", patient_key, normalise_label(label)), label.strip(), number)
    return LesionIdentity(uid_from("annotation", fallback_scope, str(number)), f"L{number}", number)


def patient_key(ct: Volume) -> str:
    return str(ct.meta.get("PatientID") or ct.meta.get("FrameOfReferenceUID") or ct.meta.get("StudyInstanceUID") or "")


def slice_normal(ct: Volume) -> np.ndarray:
    return np.asarray(ct.direction[:, 2], float)


def drawing_prompt(identity: LesionIdentity, drawing: Drawing, source: str, **meta: object) -> Prompt:
    """A prompt carrying ``drawing``: POINTS at an arrow's tip or a point, else the drawing's box (for engines that
    do not read drawings); the drawing itself in ``meta["drawing"]``."""
    if drawing.kind in (DrawingKind.ARROW, DrawingKind.POINT):
        return Prompt(
            identity,
            PromptKind.POINTS,
            points_mm=drawing.anchor_mm()[None],
            source=source,
            meta={"drawing": drawing, **meta},
        )
    return Prompt(identity, PromptKind.BOX, box_mm=drawing.box_mm(), source=source, meta={"drawing": drawing, **meta})


def circle_as_ellipse(centre: np.ndarray, rim: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """A circle (centre, a point on it) in the plane with ``normal`` as an ELLIPSE's 4 axis end points."""
    r = rim - centre
    q = np.cross(normal, r)
    return np.array([centre - r, centre + r, centre - q, centre + q])


def inside_ct(ct: Volume, pts: np.ndarray, tolerance_vox: float = 0.5) -> bool:
    ijk = ct.patient_to_index(np.asarray(pts, float).reshape(-1, 3))
    size = np.array(ct.size_ijk, float)
    return bool(np.all((ijk >= -tolerance_vox) & (ijk <= size - 1 + tolerance_vox)))


def in_body(ct: Volume, pts: np.ndarray, air_hu: float = -900.0) -> bool:
    """Whether an annotation touches the body: any voxel within 2 mm of its points denser than air outside the body
    (lung counts: it is inside the body, around -850 HU, and nodules sit in it)."""
    ijk = np.rint(ct.patient_to_index(np.asarray(pts, float).reshape(-1, 3))).astype(int)
    reach = np.maximum(1, np.ceil(2.0 / ct.spacing).astype(int))
    for i, j, k in ijk:
        sl = tuple(
            slice(max(0, c - r), max(0, c + r + 1))
            for c, r in zip((k, j, i), (reach[2], reach[1], reach[0]), strict=True)
        )
        block = ct.array[sl]
        if block.size and float(block.max()) > air_hu:
            return True
    return False


RANK = {"SEG": 3, "RTSTRUCT": 2, "SR": 1, "PR": 1}
"""Precedence of annotation objects for one lesion: a SEG over contours over lines (then the newer object)."""


@dataclass
class SourcedPrompts:
    """The prompts of one annotation object, with what decides precedence."""

    modality: str  # SEG, RTSTRUCT, SR, PR
    content_key: str  # sortable content date+time of the object (newer wins at equal rank)
    prompts: list[Prompt]
    name: str = ""


def merge_by_precedence(sources: Sequence[SourcedPrompts]) -> tuple[list[Prompt], list[AnnotationWarning]]:
    """One prompt per lesion from several objects of one study: lesions are matched by Tracking UID (labels give the
    same UID); for each, a SEG beats contours beats drawings, and at equal rank the newer object wins. Lesions only
    one object holds are all kept. Labels are renumbered 1..n in the winners' order. The warnings say which
    annotations were superseded."""

    order = sorted(
        range(len(sources)), key=lambda i: (-RANK.get(sources[i].modality.upper(), 0), _neg(sources[i].content_key))
    )
    chosen: list[tuple[Prompt, SourcedPrompts]] = []
    warnings: list[AnnotationWarning] = []
    for i in order:
        src = sources[i]
        for p in src.prompts:
            win = next((w for w in chosen if same_lesion(w[0], p)), None)
            if win is not None:
                why = "a higher-ranked object" if _rank(win[1]) > _rank(src) else "a newer object"
                warnings.append(
                    AnnotationWarning(
                        src.name or src.modality,
                        p.identity.tracking_id,
                        f"same lesion as {win[0].identity.tracking_id} in {win[1].name or win[1].modality}, "
                        f"which takes precedence ({why})",
                    )
                )
                continue
            chosen.append((p, src))
    out = []
    for n, (p, _src) in enumerate(chosen, start=1):
        out.append(replace(p, identity=replace(p.identity, label=n)))
    return out, warnings


def lesion_label(p: Prompt) -> str | None:
    """The radiologist's label of a prompt (a numbered default name such as "L3" does not identify a lesion)."""
    raw = p.meta.get("segment_label")
    if not raw and not re.fullmatch(r"L\d+", p.identity.tracking_id.strip()):
        raw = p.identity.tracking_id
    return normalise_label(str(raw)) if raw else None


def same_lesion(a: Prompt, b: Prompt, within_mm: float = 10.0) -> bool:
    """Two prompts from different objects mark one lesion: same Tracking UID, same label, or centres within
    ``within_mm`` (a line and a SEG of one nodule)."""
    if a.identity.tracking_uid == b.identity.tracking_uid:
        return True
    la, lb = lesion_label(a), lesion_label(b)
    if la and lb and la == lb:
        return True
    try:
        return float(np.linalg.norm(a.centre_mm() - b.centre_mm())) <= within_mm
    except ValueError:
        return False


def _rank(src: SourcedPrompts) -> int:
    return RANK.get(src.modality.upper(), 0)


def _neg(key: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in key)
