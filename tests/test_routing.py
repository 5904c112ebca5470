"""Routing defaults against real vendor series descriptions: diagnostic reconstructions route (whatever their
reconstruction is called), scouts, localizers and dose reports are skipped with a reason code — by name, by
ImageType LOCALIZER or by SOP class (dose reports are SR or Secondary Capture)."""

from __future__ import annotations

import pytest

from lesiontrack.config.settings import RoutingSettings
from lesiontrack.db.models import RoutingDecision
from lesiontrack.dicom_node.inbound.routing import (
    OPERATOR_OVERRIDE_REASON,
    PRIOR_RETRIEVAL_REASON,
    SeriesFacts,
    SkipCode,
    decide,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
AXIAL = ("ORIGINAL", "PRIMARY", "AXIAL")

#: (vendor, SeriesDescription) of diagnostic CT reconstructions seen on the scanners' default protocols
MUST_ROUTE = [
    ("Siemens", "Thorax 1.0 Br40 3"),
    ("Siemens", "Abdomen 3.0 I30f 3"),
    ("Siemens", "ThorAbd  5.0  B30f"),
    ("Siemens", "Venous 1.5 Br40 3 ADMIRE 3"),
    ("Siemens", "Lung 1.0 Bl57 SAFIRE"),
    ("GE", "Chest 2.5mm STANDARD"),
    ("GE", "3.75mm ABD/PEL ASIR-V 40%"),
    ("GE", "AXIAL 1.25 LUNG"),
    ("GE", "PORTAL VENOUS 5.0"),
    ("GE", "Low Dose Chest 1.25mm"),
    ("Philips", "Abdomen 5mm iDose 4"),
    ("Philips", "Chest 1mm iDose (3)"),
    ("Philips", "iDose4 Venous 5mm"),
    ("Philips", "Thorax 2mm IMR1"),
    ("Philips", "Abdomen 3mm IMR Body Routine"),
    ("Philips", "Chest 3mm DoseRight iDose 4"),
    ("Canon", "Body 5.0 CE AIDR 3D"),
    ("Canon", "Lung 1.0 FC51 AIDR 3D eFX"),
    ("Canon", "Abd 0.5 FC08 AiCE"),
    ("Canon", "Vol 1.0 FC18 AIDR3D Std"),
    ("any", ""),
]

#: (vendor, SeriesDescription, SOP class, ImageType, expected reason code)
MUST_SKIP = [
    ("Siemens", "Topogram  0.6  T20s", CT, ("ORIGINAL", "PRIMARY", "LOCALIZER"), SkipCode.LOCALIZER),
    ("Siemens", "Topogram 0.6 T20s", CT, AXIAL, SkipCode.DESCRIPTION_EXCLUDE),
    ("Siemens", "Patient Protocol", SECONDARY_CAPTURE, ("DERIVED", "SECONDARY", "OTHER"), SkipCode.SOP_CLASS),
    ("GE", "Scout", CT, AXIAL, SkipCode.DESCRIPTION_EXCLUDE),
    ("GE", "3 Plane Loc", CT, AXIAL, SkipCode.DESCRIPTION_EXCLUDE),
    ("GE", "Dose Report", SECONDARY_CAPTURE, ("DERIVED", "SECONDARY", "SCREEN SAVE"), SkipCode.SOP_CLASS),
    ("GE", "Dose Report", CT, AXIAL, SkipCode.DESCRIPTION_EXCLUDE),
    ("Philips", "Surview", CT, AXIAL, SkipCode.DESCRIPTION_EXCLUDE),
    ("Philips", "Dose Info", CT, AXIAL, SkipCode.DESCRIPTION_EXCLUDE),
    ("Philips", "Radiation Dose Report", DOSE_SR, (), SkipCode.SOP_CLASS),
    ("Canon", "Scanogram", CT, AXIAL, SkipCode.DESCRIPTION_EXCLUDE),
    ("Canon", "Dose Summary", SECONDARY_CAPTURE, (), SkipCode.SOP_CLASS),
    ("any", "Localizer", CT, AXIAL, SkipCode.DESCRIPTION_EXCLUDE),
    ("any", "", CT, ("ORIGINAL", "PRIMARY", "LOCALIZER"), SkipCode.LOCALIZER),
]


def facts(description: str, sop: str = CT, image_type: tuple[str, ...] = AXIAL, **kw: object) -> SeriesFacts:
    values: dict[str, object] = dict(
        modality="CT",
        series_description=description,
        body_part="CHEST",
        instance_count=120,
        slice_thickness_mm=2.0,
        image_type=image_type,
        sop_class_uid=sop,
    )
    values.update(kw)
    return SeriesFacts(**values)


@pytest.mark.parametrize(("vendor", "description"), MUST_ROUTE)
def test_diagnostic_series_route(vendor: str, description: str) -> None:
    route = decide(facts(description), RoutingSettings())
    assert route.decision == RoutingDecision.ANALYSE, f"{vendor} {description!r}: {route.reason}"


@pytest.mark.parametrize(("vendor", "description", "sop", "image_type", "code"), MUST_SKIP)
def test_non_diagnostic_series_skip_with_reason(
    vendor: str, description: str, sop: str, image_type: tuple[str, ...], code: str
) -> None:
    route = decide(facts(description, sop, image_type), RoutingSettings())
    assert route.decision == RoutingDecision.SKIP, f"{vendor} {description!r} routed"
    assert route.code == code
    assert route.reason


def test_enhanced_ct_is_an_image_sop_class() -> None:
    assert decide(facts("Thorax 1.0 Br40", ENHANCED_CT), RoutingSettings()).decision == RoutingDecision.ANALYSE


def test_dose_reports_are_skipped_whatever_they_are_called() -> None:
    rules = RoutingSettings()
    route = decide(facts("Abdomen 5mm", DOSE_SR, (), modality="CT"), rules)
    assert route.code == SkipCode.SOP_CLASS
    assert "X-Ray Radiation Dose SR" in route.reason
    assert decide(facts("Abdomen 5mm", DOSE_SR, (), modality="SR"), rules).code == SkipCode.MODALITY
    screen = decide(facts("Abdomen 5mm", SECONDARY_CAPTURE, ()), rules)
    assert screen.code == SkipCode.SOP_CLASS
    assert "dose screen" in screen.reason


def test_the_old_unanchored_default_is_what_skipped_idose() -> None:
    old = RoutingSettings(series_description_exclude=["(?i)dose"])
    assert decide(facts("Abdomen 5mm iDose 4"), old).code == SkipCode.DESCRIPTION_EXCLUDE


def test_priors_own_results_and_operator_overrides() -> None:
    rules = RoutingSettings()
    assert decide(facts("x", previous_reason=f"{PRIOR_RETRIEVAL_REASON} from pacs"), rules).code == SkipCode.PRIOR
    assert decide(facts("x", created_by_us=True), rules).code == SkipCode.OWN_RESULT
    override = decide(facts("Scout", previous_reason=f"{OPERATOR_OVERRIDE_REASON} api:ops (rules said: x)"), rules)
    assert override.decision == RoutingDecision.ANALYSE


def test_other_rule_codes() -> None:
    rules = RoutingSettings(body_parts=["CHEST"], series_description_include=["(?i)thorax|chest"])
    assert decide(facts("Chest", instance_count=5), rules).code == SkipCode.MIN_SLICES
    assert decide(facts("Chest", slice_thickness_mm=8.0), rules).code == SkipCode.SLICE_THICKNESS
    assert decide(facts("Chest", body_part="HEAD"), rules).code == SkipCode.BODY_PART
    assert decide(facts("Abdomen 5mm"), rules).code == SkipCode.DESCRIPTION_INCLUDE
    assert decide(facts("Chest", modality="MR", sop=None), rules).code == SkipCode.MODALITY
