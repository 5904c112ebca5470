"""Routing rules: decide whether a completed series is analysed, and say why (the reason is stored on the series).

A skip is never silent: :func:`decide` returns a :class:`Route` with a stable ``code`` (the label of the
``lesiontrack_series_skipped_total{reason}`` metric) and a human ``reason`` (stored on the series, shown on the
dashboard and in ``/api/series?state=skipped``). The defaults only exclude what cannot be a diagnostic CT volume:
non-image SOP classes (dose reports are SR or Secondary Capture), ImageType LOCALIZER, and series descriptions
that *are* a scout/localizer/dose-report name as a whole word ("iDose 4", "Low dose chest" and "DoseRight" route).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session

from lesiontrack.config.logging import withhold_values
from lesiontrack.config.settings import RoutingSettings
from lesiontrack.db.models import Instance, RoutingDecision, Series

log = logging.getLogger(__name__)

PRIOR_RETRIEVAL_REASON = "retrieved as prior"
OWN_RESULT_REASON = "created by LesionTrack"
#: reason prefix of a series an operator asked to analyse although the rules skipped it (kept on re-completion)
OPERATOR_OVERRIDE_REASON = "analysis requested by operator"


class SkipCode:
    """Stable reason codes of skip decisions (metric labels, API filter); the reason text says the detail."""

    PRIOR = "prior"
    OWN_RESULT = "own_result"
    SOP_CLASS = "sop_class"
    MODALITY = "modality"
    LOCALIZER = "localizer"
    DESCRIPTION_EXCLUDE = "description_exclude"
    DESCRIPTION_INCLUDE = "description_include"
    BODY_PART = "body_part"
    MIN_SLICES = "min_slices"
    SLICE_THICKNESS = "slice_thickness"


@dataclass(frozen=True)
class Route:
    decision: RoutingDecision
    reason: str
    code: str = "analyse"

    @property
    def skipped(self) -> bool:
        return self.decision == RoutingDecision.SKIP


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
    sop_class_uid: str | None = None

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


def series_facts(s: Session, series: Series) -> SeriesFacts:
    """The facts of one stored series: its row, the SOP class and a few header values of its first instance."""
    inst = s.scalars(
        select(Instance).where(Instance.series_pk == series.id).order_by(Instance.instance_number, Instance.id).limit(1)
    ).first()
    header = None
    if inst is not None:
        try:
            header = dcmread(
                inst.file_path, stop_before_pixels=True, specific_tags=["SliceThickness", "ImageType", "Modality"]
            )
        except Exception as exc:
            log.warning("cannot read header of %s for routing: %s", inst.file_path, withhold_values(str(exc)))
    return SeriesFacts.from_header(
        header,
        modality=series.modality,
        series_description=series.series_description,
        body_part=series.body_part,
        instance_count=series.instance_count,
        created_by_us=series.created_by_us,
        previous_reason=series.routing_reason,
        sop_class_uid=inst.sop_class_uid if inst is not None else None,
    )


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def _sop_reason(uid: str) -> str:
    what = ""
    if uid == "1.2.840.10008.5.1.4.1.1.7" or uid.startswith("1.2.840.10008.5.1.4.1.1.7."):
        what = " (a dose screen or screenshot)"
    elif uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
        what = " (a structured report, e.g. a radiation dose SR)"
    return f"SOP class {_sop_name(uid)} is not a CT image volume{what}"


def decide(facts: SeriesFacts, rules: RoutingSettings) -> Route:
    for check in (_standing, _content, _acquisition):
        route = check(facts, rules)
        if route is not None:
            return route
    modality = (facts.modality or "").upper()
    return Route(
        RoutingDecision.ANALYSE,
        f"{modality}, {facts.instance_count} instances, thickness {facts.slice_thickness_mm} mm",
    )


def _standing(facts: SeriesFacts, rules: RoutingSettings) -> Route | None:
    """What the series already is to us: a prior we retrieved, our own result, or an operator's override."""
    previous = facts.previous_reason or ""
    if previous.startswith(PRIOR_RETRIEVAL_REASON):
        return Route(RoutingDecision.SKIP, previous, SkipCode.PRIOR)
    if facts.created_by_us:
        return Route(RoutingDecision.SKIP, OWN_RESULT_REASON, SkipCode.OWN_RESULT)
    if previous.startswith(OPERATOR_OVERRIDE_REASON):
        return Route(RoutingDecision.ANALYSE, previous, "operator")
    return None


def _content(facts: SeriesFacts, rules: RoutingSettings) -> Route | None:
    """A skip when what the series shows is not what the rules analyse (modality, SOP class, localizer,
    description, body part)."""
    skip = RoutingDecision.SKIP
    modality = (facts.modality or "").upper()
    if [m.upper() for m in rules.modalities] and modality not in [m.upper() for m in rules.modalities]:
        return Route(skip, f"modality {modality or '(none)'} not in {rules.modalities}", SkipCode.MODALITY)
    if rules.sop_classes and facts.sop_class_uid and facts.sop_class_uid not in rules.sop_classes:
        return Route(skip, _sop_reason(facts.sop_class_uid), SkipCode.SOP_CLASS)
    if "LOCALIZER" in facts.image_type:
        return Route(skip, "ImageType LOCALIZER", SkipCode.LOCALIZER)
    desc = facts.series_description or ""
    for pattern in rules.series_description_exclude:
        if re.search(pattern, desc):
            return Route(skip, f"SeriesDescription matches exclude {pattern!r}", SkipCode.DESCRIPTION_EXCLUDE)
    if rules.series_description_include and not any(re.search(p, desc) for p in rules.series_description_include):
        return Route(
            skip, f"SeriesDescription matches none of {rules.series_description_include}", SkipCode.DESCRIPTION_INCLUDE
        )
    if rules.body_parts and (facts.body_part or "").upper() not in [b.upper() for b in rules.body_parts]:
        return Route(skip, f"body part {facts.body_part or '(none)'} not in {rules.body_parts}", SkipCode.BODY_PART)
    return None


def _acquisition(facts: SeriesFacts, rules: RoutingSettings) -> Route | None:
    """A skip when the series is too short or its slices too thick."""
    if facts.instance_count < rules.min_slices:
        return Route(
            RoutingDecision.SKIP,
            f"{facts.instance_count} instances < min_slices {rules.min_slices}",
            SkipCode.MIN_SLICES,
        )
    if facts.slice_thickness_mm is not None and facts.slice_thickness_mm > rules.max_slice_thickness_mm:
        return Route(
            RoutingDecision.SKIP,
            f"slice thickness {facts.slice_thickness_mm} mm > {rules.max_slice_thickness_mm} mm",
            SkipCode.SLICE_THICKNESS,
        )
    return None
