"""Prompts for lesion segmentation: points, a box or a dense mask, each tied to a lesion identity.

Geometry in patient LPS mm; a dense mask is a :class:`~models.imaging.volume.Volume` (uint8, 0/1) on any grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from lesiontrack.models.imaging.volume import Volume


class PromptKind(StrEnum):
    POINTS = "points"
    BOX = "box"
    MASK = "mask"


@dataclass
class LesionIdentity:
    """Persistent identity of a lesion across timepoints (DICOM Tracking UID + human-readable Tracking ID)."""

    tracking_uid: str
    tracking_id: str  # e.g. "L3 liver"
    label: int  # integer label used in label maps (lesion number as in the baseline)
    anatomic_site: str | None = None  # free text or code meaning, e.g. "Liver"
    is_node: bool = False  # lymph node (RECIST measures the short axis)
    description: str | None = None  # the radiologist's words, e.g. "left lower lobe mass" (SEG/SR of the baseline)


@dataclass
class Prompt:
    """One lesion's prompt: exactly the fields its kind needs."""

    identity: LesionIdentity
    kind: PromptKind
    points_mm: np.ndarray | None = None  # (N, 3) LPS mm, for POINTS
    box_mm: tuple[np.ndarray, np.ndarray] | None = None  # (min corner, max corner) LPS mm, for BOX
    mask: Volume | None = None  # for MASK
    source: str = ""  # e.g. "SEG 1.2.3 segment 2", "SR 1.2.4", "prompts.json"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind is PromptKind.POINTS and (self.points_mm is None or np.asarray(self.points_mm).size == 0):
            raise ValueError(f"{self.identity.tracking_id}: a points prompt needs at least one point")
        if self.kind is PromptKind.BOX and self.box_mm is None:
            raise ValueError(f"{self.identity.tracking_id}: a box prompt needs box_mm")
        if self.kind is PromptKind.MASK and self.mask is None:
            raise ValueError(f"{self.identity.tracking_id}: a mask prompt needs mask")
        if self.points_mm is not None:
            self.points_mm = np.asarray(self.points_mm, dtype=np.float64).reshape(-1, 3)

    def centre_mm(self) -> np.ndarray:
        """A representative centre in LPS mm (mask centroid, box centre or mean of points)."""
        if self.kind is PromptKind.MASK and self.mask is not None:
            idx = np.argwhere(self.mask.array > 0)
            if idx.size == 0:
                raise ValueError(f"{self.identity.tracking_id}: empty mask prompt")
            return self.mask.index_to_patient(idx[:, ::-1].mean(0))
        if self.kind is PromptKind.BOX and self.box_mm is not None:
            return (np.asarray(self.box_mm[0]) + np.asarray(self.box_mm[1])) / 2
        return np.asarray(self.points_mm).mean(0)
