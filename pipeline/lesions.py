"""Tracked-lesion results handed from the tracking loop to measurements, SEG/SR writers and the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from db.status import LesionStatus
from models.imaging.volume import Volume
from models.segmentation.prompts import LesionIdentity

__all__ = ["LesionStatus", "Timepoint", "TrackedLesion"]


@dataclass
class TrackedLesion:
    """One lesion at one timepoint: identity, status and its mask on that timepoint's CT grid."""

    identity: LesionIdentity
    status: LesionStatus
    mask: Volume  # uint8 0/1 on the timepoint's CT grid (all zero when vanished)
    engine: str = ""
    engine_version: str = ""
    propagated_centre_mm: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)  # e.g. overlap resolved with L2, boosted
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timepoint:
    """A CT series at one date, with the lesions found (or given) on it."""

    series_uid: str
    ct: Volume
    study_date: str | None = None  # DICOM DA, YYYYMMDD
    study_uid: str | None = None
    lesions: list[TrackedLesion] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
