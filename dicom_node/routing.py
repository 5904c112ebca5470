"""Routing rules: decide whether a completed series is analysed, and say why (the reason is stored on the series)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from config.settings import RoutingSettings
from db.models import RoutingDecision

PRIOR_RETRIEVAL_REASON = "retrieved as prior"


@dataclass(frozen=True)
class Route:
    decision: RoutingDecision
    reason: str


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at: DB columns plus a few header values of one stored instance."""

    modality: str | None
    series_description: str | None
    body_part: str | None
    instance_count: int
    slice_thickness_mm: float | None = None
    image_type: tuple[str, ...] = ()
    created_by_us: bool = False
    previous_reason: str | None = None

    @classmethod
    def from_header(cls, header: Dataset | None, **kw: Any) -> SeriesFacts:
        thickness = None
        image_type: tuple[str, ...] = ()
        if header is not None:
            try:
                v = header.get("SliceThickness")
                thickness = float(v) if v not in (None, "") else None
            except (TypeError, ValueError):
                thickness = None
            it = header.get("ImageType")
            if it:
                image_type = tuple(str(x).upper() for x in (it if not isinstance(it, str) else [it]))
        return cls(slice_thickness_mm=thickness, image_type=image_type, **kw)


def decide(facts: SeriesFacts, rules: RoutingSettings) -> Route:
    skip = RoutingDecision.SKIP
    if facts.previous_reason and facts.previous_reason.startswith(PRIOR_RETRIEVAL_REASON):
        return Route(skip, facts.previous_reason)
    if facts.created_by_us:
        return Route(skip, "created by LesionTrack")
    modality = (facts.modality or "").upper()
    if [m.upper() for m in rules.modalities] and modality not in [m.upper() for m in rules.modalities]:
        return Route(skip, f"modality {modality or '(none)'} not in {rules.modalities}")
    if "LOCALIZER" in facts.image_type:
        return Route(skip, "ImageType LOCALIZER")
    desc = facts.series_description or ""
    for pattern in rules.series_description_exclude:
        if re.search(pattern, desc):
            return Route(skip, f"SeriesDescription matches exclude {pattern!r}")
    if rules.series_description_include and not any(re.search(p, desc) for p in rules.series_description_include):
        return Route(skip, f"SeriesDescription matches none of {rules.series_description_include}")
    if rules.body_parts and (facts.body_part or "").upper() not in [b.upper() for b in rules.body_parts]:
        return Route(skip, f"body part {facts.body_part or '(none)'} not in {rules.body_parts}")
    if facts.instance_count < rules.min_slices:
        return Route(skip, f"{facts.instance_count} instances < min_slices {rules.min_slices}")
    if facts.slice_thickness_mm is not None and facts.slice_thickness_mm > rules.max_slice_thickness_mm:
        return Route(skip, f"slice thickness {facts.slice_thickness_mm} mm > {rules.max_slice_thickness_mm} mm")
    return Route(
        RoutingDecision.ANALYSE,
        f"{modality}, {facts.instance_count} instances, thickness {facts.slice_thickness_mm} mm",
    )
