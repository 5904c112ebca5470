"""Tracked-lesion results handed from the tracking loop to measurements, SEG/SR writers and the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lesiontrack.db.status import LesionStatus
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import LesionIdentity

__all__ = ["LesionStatus", "Timepoint", "TrackedLesion"]


@dataclass(frozen=True)
class PropagationSource:
    """Which annotation a result was propagated from (provenance, recorded on every tracked lesion)."""

    series_uid: str  # the annotated CT series the prompt was drawn on
    annotation: str  # e.g. "SEG 1.2.3 segment 2", "SR 1.2.4", "prompts.json"
    by_person: bool = True  # a person's annotation (or one a person confirmed), never only a result of ours
    timepoint_index: int | None = None  # index in the tracking loop's timepoints, where known
    annotation_uid: str | None = None  # SOP Instance UID of the SEG/SR, where known

    def describe(self) -> str:
        who = "a person's" if self.by_person else "our"
        return f"propagated from {who} annotation {self.annotation} on series {self.series_uid}"


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
    propagated_from: PropagationSource | None = None  # None only for the annotation itself


@dataclass
class Timepoint:
    """A CT series at one date, with the lesions found (or given) on it."""

    series_uid: str
    ct: Volume
    study_date: str | None = None  # DICOM DA, YYYYMMDD
    study_uid: str | None = None
    lesions: list[TrackedLesion] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
