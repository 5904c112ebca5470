"""TID 1500 Measurement Report (Comprehensive 3D SR) for one analysed follow-up CT series (highdicom).

Per present lesion, both carrying the lesion's Tracking Identifier (text = Tracking ID, UID = Tracking UID — the same
values as the SEG segment):

* a TID 1410 planar group whose region is the long-axis POLYLINE on its key CT slice: Long axis (inferred from that
  polyline), Short axis (inferred from its own polyline) — written first, so that a viewer merging a lesion's
  groups (OHIF 3.13, which draws a lesion's first five NUMs) shows the RECIST axes first;
* a TID 1411 volumetric group referencing the SEG segment: Volume in ml (UCUM ``ml``), the "Maximum 3D diameter"
  (local code LT058, named for what it is: not a RECIST diameter), mean/SD HU (UCUM ``[hnsf'U]``, meaning
  "Hounsfield unit"), volume changes vs previous / baseline / nadir (ml and %), then the RECIST diameter's changes
  (mm and %), the RECIST baseline category, the review flag.

Each re-segmented lesion's first group also carries its review flag (qualitative evaluation "Review status" LT053:
"Flagged for review" / "Not flagged for review") and its tracking confidence in [0, 1] (NUM LT056), from
:mod:`pipeline.science.confidence`; a flagged lesion says why: one TEXT "Reason for review" (LT057) per reason (TID 1500
is
extensible; pixelmed reports them as "not in template" warnings); a lesion that was not assessed (e.g. not
re-segmented) states none of these. It also says what
the prior it was tracked from was ("Prior annotation" LT059: a segmentation, contours, an outline, an ellipse, a
bidirectional pair, a single diameter, an arrow or a point on one image), when known.

A vanished lesion gets a TID 1410 group (same tracking identifier) with a POINT where it was looked for
(``LesionReport.expected_centre_mm``), zero sizes and status "vanished", so every tracked lesion appears in every
report. The RECIST 1.1 time-point response goes in the TID 1500 row-12 "Qualitative Evaluations" container (highdicom
has no API for it; it is appended to the content tree): Response Evaluation Method = RECIST 1.1 (126081), target and
non-target responses coded with DCM 112041–112047, Current Response (112048) and Best Overall Response (112049) =
overall response, plus the sums as NUMs. Quantities without a standard concept (changes, sums, overall response
values, lesion status) use local codes of the coding scheme ``99LTRK``, declared in the Coding Scheme Identification
Sequence.

Why not TID 1501 groups for these: pixelmed's TID 1500 rules apply the TID 1411 conditions to *every* measurement
group once one group references a segment, so location-less groups are reported as errors.

Time point context (TID 1502) on every group; the TID 1600 Image Library lists the key slices (OHIF needs it); prior
SEG/SR objects are recorded as evidence; an amendment passes ``previous_versions`` (Predecessor Documents Sequence)
and is a new instance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from lesiontrack.db.status import LesionStatus
from lesiontrack.pipeline.dicom.lesion_names import display_name
from lesiontrack.pipeline.dicom.seg.writer import (
    SOFTWARE_NAME,
    SOFTWARE_VERSION,
    SegWriteResult,
    anatomic_code,
    sort_source_slices,
)
from lesiontrack.pipeline.science.drawn_priors import DrawnDiameters
from lesiontrack.pipeline.science.measurements import Axis, LesionChanges, LesionMeasurement
from lesiontrack.pipeline.science.recist import NewLesionState, RecistRole, Response, TimepointResponse

log = logging.getLogger(__name__)

LOCAL_SCHEME = "99LTRK"


def _local(value: str, meaning: str) -> Code:
    return Code(value, LOCAL_SCHEME, meaning)


class LT:
    """Local codes (scheme 99LTRK) for concepts without a standard code."""

    LESION_STATUS = _local("LT001", "Lesion status")
    PRESENT = _local("LT002", "Present")
    VANISHED = _local("LT003", "Vanished")
    NEW = _local("LT004", "New lesion")
    CHANGE_PREV_ABS = _local("LT010", "Change from previous time point")
    CHANGE_PREV_PCT = _local("LT011", "Percent change from previous time point")
    CHANGE_BASE_ABS = _local("LT012", "Change from baseline")
    CHANGE_BASE_PCT = _local("LT013", "Percent change from baseline")
    CHANGE_NADIR_ABS = _local("LT014", "Change from nadir")
    CHANGE_NADIR_PCT = _local("LT015", "Percent change from nadir")
    SUM_DIAMETERS = _local("LT020", "Sum of diameters")
    NADIR_SUM = _local("LT021", "Nadir sum of diameters")
    SUM_VOLUMES = _local("LT022", "Sum of target lesion volumes")
    VOLUME_RESPONSE = _local("LT023", "Volumetric response")
    TARGET_RESPONSE = _local("LT030", "Target lesion response")
    NON_TARGET_RESPONSE = _local("LT031", "Non-target lesion response")
    NEW_LESIONS = _local("LT032", "New lesions")
    BASELINE_CATEGORY = _local("LT033", "RECIST baseline category")
    YES = _local("LT034", "Yes")
    NO = _local("LT035", "No")
    RECIST_DIAMETER = _local("LT040", "RECIST diameter")
    NOT_EVALUATED = _local("LT041", "Not evaluated")
    NONE_OF_KIND = _local("LT042", "No lesions of this kind")
    NEW_NOT_ASSESSED = _local("LT043", "Not assessed")
    NEW_NONE_FOUND = _local("LT044", "No candidates found")
    NEW_CANDIDATES = _local("LT045", "Unconfirmed candidates (equivocal)")
    CANDIDATE_COUNT = _local("LT046", "Number of unconfirmed new-lesion candidates")
    CANDIDATE = _local("LT047", "Unconfirmed new-lesion candidate")
    CONFIDENCE = _local("LT048", "Detection confidence")
    PROVENANCE = _local("LT049", "Result provenance")
    VERIFIED = _local("LT050", "Verified by a reader")
    FROM_VERIFIED = _local("LT051", "Propagated from a reader-verified time point")
    MACHINE = _local("LT052", "Machine result, not verified")
    REVIEW = _local("LT053", "Review status")
    NEEDS_REVIEW = _local("LT054", "Flagged for review")
    NO_REVIEW = _local("LT055", "Not flagged for review")
    TRACKING_CONFIDENCE = _local("LT056", "Tracking confidence")
    REVIEW_REASON = _local("LT057", "Reason for review")
    MAX_3D_DIAMETER = _local("LT058", "Maximum 3D diameter")
    PRIOR_ANNOTATION = _local("LT059", "Prior annotation the lesion was tracked from")
    # the radiologist's own diameters on the prior (a drawn line, pair or ellipse) beside ours (issue 31)
    DRAWN_LONG = _local("LT067", "Radiologist's long axis on the prior annotation")
    DRAWN_SHORT = _local("LT068", "Radiologist's short axis on the prior annotation")
    DRAWN_LONG_DIFF = _local("LT069", "Long axis of the derived prior lesion minus the radiologist's")
    DRAWN_SHORT_DIFF = _local("LT070", "Short axis of the derived prior lesion minus the radiologist's")
    PROMPT_OBJECT = _local("LT080", "Object the lesion's prompt was read from")


OVERALL_CODES: dict[Response, Code] = {
    Response.CR: _local("CR", "Complete response"),
    Response.PR: _local("PR", "Partial response"),
    Response.SD: _local("SD", "Stable disease"),
    Response.PD: _local("PD", "Progressive disease"),
    Response.NE: _local("NE", "Not evaluable"),
    Response.NON_CR_NON_PD: _local("NCRNPD", "Non-CR/Non-PD"),
    Response.ND: _local("ND", "No disease"),
}
TARGET_CODES: dict[Response, Code] = {
    Response.CR: codes.DCM.TargetLesionCompleteResponse,
    Response.PR: codes.DCM.TargetLesionPartialResponse,
    Response.PD: codes.DCM.TargetLesionProgressiveDisease,
    Response.SD: codes.DCM.TargetLesionStableDisease,
}
NON_TARGET_CODES: dict[Response, Code] = {
    Response.CR: codes.DCM.NonTargetLesionCompleteResponse,
    Response.NON_CR_NON_PD: codes.DCM.NonTargetLesionIncompleteResponseOrStableDisease,
    Response.PD: codes.DCM.NonTargetLesionProgressiveDisease,
}
BASELINE_CATEGORY_CODES: dict[str, Code] = {
    RecistRole.TARGET: codes.DCM.TargetLesionAtBaseline,
    RecistRole.NON_TARGET: codes.DCM.NonTargetLesionAtBaseline,
    RecistRole.NORMAL_NODE: codes.DCM.NonLesionAtBaseline,
}
STATUS_CODES = {
    LesionStatus.PRESENT: LT.PRESENT,
    LesionStatus.VANISHED: LT.VANISHED,
    LesionStatus.NEW: LT.NEW,
    LesionStatus.CANDIDATE: LT.CANDIDATE,
}
NEW_LESION_CODES: dict[NewLesionState, Code] = {
    NewLesionState.NOT_ASSESSED: LT.NEW_NOT_ASSESSED,
    NewLesionState.NONE_FOUND: LT.NEW_NONE_FOUND,
    NewLesionState.CANDIDATES: LT.NEW_CANDIDATES,
    NewLesionState.CONFIRMED: LT.YES,
}
# A response that was not evaluated, or a kind of lesion the patient has none of, is stated as such (never omitted).
UNASSESSED_CODES: dict[Response, Code] = {Response.NE: LT.NOT_EVALUATED, Response.ND: LT.NONE_OF_KIND}
ONE = codes.UCUM.NoUnits
MM, MM3, PCT, HU = codes.UCUM.Millimeter, codes.UCUM.CubicMillimeter, codes.UCUM.Percent, codes.UCUM.HounsfieldUnit
#: volumes are reported in millilitres (UCUM "ml", DICOM CID 7181): "66.61 ml", not "66606.41 mm3"
ML = Code("ml", "UCUM", "milliliter")
ML_PER_MM3 = 1e-3
CHANGE_ABS_CODES = {"previous": LT.CHANGE_PREV_ABS, "baseline": LT.CHANGE_BASE_ABS, "nadir": LT.CHANGE_NADIR_ABS}
CHANGE_PCT_CODES = {"previous": LT.CHANGE_PREV_PCT, "baseline": LT.CHANGE_BASE_PCT, "nadir": LT.CHANGE_NADIR_PCT}


#: where a lesion's prior came from (pipeline.science.drawn_priors.prompt_origin) → the SR's "Prior annotation" value;
# codes
#: of their own (LT071-LT079: the first numbering, LT058-LT066, re-used LT058 "Maximum 3D diameter" and LT059, the
#: concept name itself)
PRIOR_ANNOTATION_CODES: dict[str, Code] = {
    "seg": _local("LT071", "Segmentation (3-D outline)"),
    "contours": _local("LT072", "Contours on every slice"),
    "contour": _local("LT073", "Outline on one image"),
    "ellipse": _local("LT074", "Ellipse on one image"),
    "bidirectional": _local("LT075", "Bidirectional diameters on one image"),
    "line": _local("LT076", "Single diameter on one image"),
    "arrow": _local("LT077", "Arrow on one image"),
    "point": _local("LT078", "Point on one image"),
    "points": _local("LT078", "Point on one image"),
    "box": _local("LT079", "Box"),
}

#: the object a lesion's prompt was read from (pipeline.dicom.prompt_sources.PROMPT_OBJECTS) → the SR's LT080 value
PROMPT_OBJECT_CODES: dict[str, Code] = {
    "SEG": _local("LT081", "Segmentation (DICOM-SEG)"),
    "SR": _local("LT082", "Measurement report (TID 1500 SR)"),
    "GSPS": _local("LT083", "Presentation state (GSPS)"),
    "RTSTRUCT": _local("LT084", "RT structure set (RTSTRUCT)"),
    "points": _local("LT085", "Prompt points file"),
}

PROVENANCE_CODES: dict[str, Code] = {"verified": LT.VERIFIED, "from-verified": LT.FROM_VERIFIED, "machine": LT.MACHINE}


class SrWriteError(ValueError):
    """The report cannot be built from the given inputs."""


def _person_name(who: str) -> str:
    """A DICOM PN of a verifier's name (ContentCreatorName is one already; an operator login becomes one)."""
    cleaned = "".join(ch for ch in who if ch not in "\\=" and ch.isprintable()).strip()
    return cleaned[:64] or "Unknown"


def _segment_descriptions(seg: Dataset | None) -> dict[str, str]:
    """Tracking UID → SegmentDescription of our SEG (where the radiologist's description travels)."""
    out: dict[str, str] = {}
    for item in seg.get("SegmentSequence", []) if seg is not None else []:
        if item.get("TrackingUID") and item.get("SegmentDescription"):
            out[str(item.TrackingUID)] = str(item.SegmentDescription)
    return out


@dataclass
class LesionReport:
    """Everything the SR says about one lesion at this timepoint."""

    measurement: LesionMeasurement
    changes: LesionChanges | None = None
    baseline_category: str | None = None  # "target", "non-target", "normal node" (RECIST selection role)
    expected_centre_mm: tuple[float, float, float] | None = None  # where a vanished lesion was looked for
    description: str | None = None  # the radiologist's words; default: the SEG segment's SegmentDescription
    provenance: str | None = None  # "verified", "from-verified" or "machine" (PROVENANCE_CODES); None: not stated
    review: bool | None = None  # flagged for review (pipeline.science.confidence); None: not assessed, nothing stated
    confidence: float | None = None  # the result's confidence in [0, 1] (pipeline.science.confidence)
    #: why a lesion of the prior was not assessed (status NOT_EVALUATED): stated, nothing measured (issue 29)
    not_assessed_reason: str | None = None
    review_reasons: Sequence[str] = ()  # why it is flagged (pipeline.science.confidence); stated only when flagged
    prompt_origin: str | None = None  # what the prior was (PRIOR_ANNOTATION_CODES); None: not stated
    prompt_object: str | None = None  # the object it was read from (PROMPT_OBJECT_CODES): SEG, SR, GSPS, RTSTRUCT
    #: the radiologist's own diameters on the prior beside ours of the lesion derived from them; None: not drawn
    drawn: DrawnDiameters | None = None


def _drawn_measurements(d: DrawnDiameters) -> list[hd.sr.Measurement]:
    """NUMs for the lesion's group: each of the radiologist's diameters, and ours minus theirs (mm)."""
    out = []
    for theirs, ours, name, diff in (
        (d.radiologist_long_mm, d.ours_long_mm, LT.DRAWN_LONG, LT.DRAWN_LONG_DIFF),
        (d.radiologist_short_mm, d.ours_short_mm, LT.DRAWN_SHORT, LT.DRAWN_SHORT_DIFF),
    ):
        if theirs is not None and theirs > 0:
            out += [_num(name, theirs, MM), _num(diff, round(ours - theirs, 1), MM)]
    return out


@dataclass
class SrTimepoint:
    """TID 1502 time point context."""

    label: str  # e.g. "T2"
    index: int = 0  # 0 = baseline
    date: str | None = None

    def context(self) -> hd.sr.TimePointContext:
        tp_type = codes.UMLS.Baseline if self.index == 0 else codes.DCM.Posttreatment
        return hd.sr.TimePointContext(
            time_point=self.label, time_point_type=tp_type, subject_time_point_identifier=f"{self.index}"
        )


@dataclass
class SrWriteResult:
    dataset: hd.sr.Comprehensive3DSR
    key_slices: dict[str, str] = field(default_factory=dict)  # tracking UID → key slice SOP Instance UID


def _num(
    name: Code,
    value: float,
    unit: Code,
    *,
    method: Code | None = None,
    referenced_coordinates: Sequence[hd.sr.CoordinatesForMeasurement] | None = None,
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name, value=float(value), unit=unit, method=method, referenced_coordinates=referenced_coordinates
    )


def _change_measurements(
    changes: LesionChanges | None, metric: str, unit: Code, scale: float = 1.0
) -> list[hd.sr.Measurement]:
    """Absolute (in ``unit``: the metric's value x ``scale``) and percent changes vs previous / baseline / nadir."""
    out: list[hd.sr.Measurement] = []
    if changes is None or metric not in changes.metrics:
        return out
    mc = changes.metrics[metric]
    for ref in ("previous", "baseline", "nadir"):
        ch = getattr(mc, ref)
        if ch is None:
            continue
        out.append(_num(CHANGE_ABS_CODES[ref], ch.absolute * scale, unit))
        if ch.percent is not None:
            out.append(_num(CHANGE_PCT_CODES[ref], ch.percent, PCT))
    return out


class _SliceLocator:
    """Maps LPS points onto the nearest source CT slice and its SCOORD pixel coordinates (column, row)."""

    def __init__(self, source_datasets: Sequence[Dataset]) -> None:
        self.datasets, self.grid = sort_source_slices(source_datasets)

    def locate(self, axis: Axis) -> tuple[Dataset, np.ndarray]:
        pts = np.array([axis.start_mm, axis.end_mm], float)
        ijk = self.grid.patient_to_index(pts)
        k = int(np.clip(np.rint(ijk[:, 2].mean()), 0, len(self.datasets) - 1))
        return self.datasets[k], ijk[:, :2] + 0.5  # DICOM SCOORD: (0, 0) = top-left corner of the first pixel

    def source_for_group(self) -> hd.sr.SourceImageForMeasurementGroup:
        ds = self.datasets[len(self.datasets) // 2]
        return hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)

    def scoord_point(self, point: Sequence[float]) -> tuple[Dataset, np.ndarray, hd.sr.SourceImageForRegion]:
        ijk = self.grid.patient_to_index(np.asarray(point, float).reshape(1, 3))[0]
        k = int(np.clip(np.rint(ijk[2]), 0, len(self.datasets) - 1))
        ds = self.datasets[k]
        return (
            ds,
            (ijk[None, :2] + 0.5).astype(np.float32),
            hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID),
        )

    def scoord(self, axis: Axis) -> tuple[Dataset, np.ndarray, hd.sr.SourceImageForRegion]:
        ds, colrow = self.locate(axis)
        src = hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID)
        return ds, colrow.astype(np.float32), src


def device_observer(device_uid: str | None, manufacturer: str, software_version: str) -> hd.sr.ObserverContext:
    """TID 1004 device observer: LesionTrack as the device that made the measurements (a new UID when none is set)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid or hd.UID(),
            name=SOFTWARE_NAME,
            manufacturer_name=manufacturer,
            model_name=f"{SOFTWARE_NAME} {software_version}",
        ),
    )


def _not_assessed_group(
    tid: hd.sr.TrackingIdentifier,
    time_point: hd.sr.TimePointContext,
    sites: list[hd.sr.FindingSite] | None,
    rep: LesionReport,
    source: hd.sr.SourceImageForMeasurementGroup,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group for a prior lesion that was not assessed: status "Not evaluated", flagged for review, the
    reason as a comment, and no measurement (the SR never asserts what was not assessed). No image region: nothing
    locates the lesion on this CT (pixelmed 2022 then reports the TID 1410/1411 conditions for this group, as for a
    vanished lesion without a location; dciodvfy and dsrdump accept it)."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tid,
        time_point_context=time_point,
        finding_type=codes.SCT.Lesion,
        finding_sites=sites,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(LT.LESION_STATUS, LT.NOT_EVALUATED),
            hd.sr.QualitativeEvaluation(LT.REVIEW, LT.NEEDS_REVIEW),
        ],
        source_images=[source],
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=(rep.not_assessed_reason or "not assessed")[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


class SrHeader(TypedDict, total=False):
    """Where one of our SR instances goes and who made it (keyword arguments of :func:`write_sr` and
    :func:`pipeline.dicom.sr.viewer.write_viewer_sr`; each writer has its own default series number and description)."""

    series_number: int
    instance_number: int
    series_instance_uid: str | None
    sop_instance_uid: str | None
    manufacturer: str
    software_version: str
    device_uid: str | None
    series_description: str
    verified_by: str | None  # the reader whose correction the report adopts (TID 1003 person observer; write_sr)


MeasurementGroup = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


@dataclass
class SrDocument:
    """The content of one of our Comprehensive 3D SR instances (TID 1500), besides its header."""

    groups: Sequence[MeasurementGroup]
    evidence: Sequence[Dataset]
    key_images: Sequence[Dataset]  # the TID 1600 image library
    previous_versions: Sequence[Dataset] = ()
    verified_by: str | None = None  # the reader whose correction the report adopts (TID 1003 person observer)
    root_items: Sequence[hd.sr.ContentItem] = ()  # appended to the report's root container (the RECIST response)
    local_codes: bool = False  # declare the 99LTRK coding scheme


def build_sr(
    doc: SrDocument, header: SrHeader, *, series_number: int, series_description: str
) -> hd.sr.Comprehensive3DSR:
    """The one builder of our Comprehensive 3D SR instances (the TID 1500 report and the OHIF measurements SR):
    LesionTrack as device observer, CT procedure, Imaging Measurement Report title, a new instance every time."""
    manufacturer = header.get("manufacturer", SOFTWARE_NAME)
    software_version = header.get("software_version", SOFTWARE_VERSION)
    person = None
    if doc.verified_by:
        person = hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=_person_name(doc.verified_by)
            ),
        )
    observer = hd.sr.ObservationContext(
        observer_person_context=person,
        observer_device_context=device_observer(header.get("device_uid"), manufacturer, software_version),
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        # CID 100 (what pixelmed checks, 20190121) has no CT body-region code but this one: a LOINC "CT Chest" is
        # reported as an error there, so BodyPartExamined cannot become the procedure code (docs/viewer.md)
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=list(doc.groups),
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=list(doc.key_images),
    )
    for item in doc.root_items:
        report[0].ContentSequence.append(item)
    schemes = None
    if doc.local_codes:
        schemes = [
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME, name="LesionTrack local codes", responsible_organization="LesionTrack"
            )
        ]
    return hd.sr.Comprehensive3DSR(
        evidence=list(doc.evidence),
        content=report,
        series_instance_uid=header.get("series_instance_uid") or hd.UID(),
        series_number=header.get("series_number", series_number),
        sop_instance_uid=header.get("sop_instance_uid") or hd.UID(),
        instance_number=header.get("instance_number", 1),
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(doc.previous_versions) or None,
        series_description=header.get("series_description", series_description)[:64],
        coding_schemes=schemes,
        software_versions=software_version,
    )


@dataclass
class _LesionContext:
    """What every group of one lesion shares."""

    rep: LesionReport
    name: str  # the Tracking Identifier text: the lesion's display name
    tid: hd.sr.TrackingIdentifier
    sites: list[hd.sr.FindingSite] | None
    time_point: SrTimepoint


def write_sr(
    source_datasets: Sequence[Dataset],
    seg: SegWriteResult | None,
    lesions: Sequence[LesionReport],
    *,
    time_point: SrTimepoint,
    recist: TimepointResponse | None = None,
    best_overall: Response | None = None,
    prior_evidence: Sequence[Dataset] = (),
    previous_versions: Sequence[Dataset] = (),
    **header: Unpack[SrHeader],
) -> SrWriteResult:
    """Build the TID 1500 report of one follow-up series (see the module docstring for the content).

    ``seg`` is None when no lesion is present (e.g. complete response): the report then holds only the vanished
    lesions' groups and the RECIST response. ``header``: :class:`SrHeader` (series 902 unless given).
    """
    locator = _SliceLocator(source_datasets)
    if seg is not None and seg.segmentation_type != "binary":
        log.info(
            "SR references a LABELMAP SEG: dciodvfy (20260927) flags ReferencedSegmentNumber for SOP class "
            "66.7 (validator gap); BINARY SEGs validate cleanly"
        )
    uids = [r.measurement.tracking_uid for r in lesions]
    if len(set(uids)) != len(uids):
        raise SrWriteError(f"duplicate tracking UIDs in the report: {uids}")
    said = _segment_descriptions(seg.dataset if seg is not None else None)
    groups: list[MeasurementGroup] = []
    key_slices: dict[str, Dataset] = {}
    for rep in lesions:
        groups += _lesion_groups(_lesion_context(rep, said, time_point), seg, locator, key_slices)
    library = list({ds.SOPInstanceUID: ds for ds in key_slices.values()}.values())
    current = list(locator.datasets)
    doc = SrDocument(
        groups,
        evidence=current + ([seg.dataset] if seg is not None else []) + list(prior_evidence),
        key_images=library or [locator.datasets[0]],
        previous_versions=previous_versions,
        verified_by=header.get("verified_by"),
        root_items=[] if recist is None else [_recist_container(recist, best_overall)],
        local_codes=True,
    )
    sr = build_sr(doc, header, series_number=902, series_description="LesionTrack measurements")
    log.debug(
        "SR %s: %d lesion(s), time point %s, series %s",
        sr.SOPInstanceUID,
        len(lesions),
        time_point.label,
        current[0].SeriesInstanceUID,
    )
    return SrWriteResult(sr, {u: ds.SOPInstanceUID for u, ds in key_slices.items()})


def _lesion_context(rep: LesionReport, said: dict[str, str], time_point: SrTimepoint) -> _LesionContext:
    m = rep.measurement
    if not m.tracking_id:
        raise SrWriteError(f"lesion {m.tracking_uid} has no Tracking ID text (OHIF needs it)")
    name = display_name(m.tracking_id, rep.description or said.get(m.tracking_uid))
    site = anatomic_code(m.anatomic_site)
    return _LesionContext(
        rep,
        name,
        hd.sr.TrackingIdentifier(uid=m.tracking_uid, identifier=name),
        [hd.sr.FindingSite(anatomic_location=site)] if site is not None else None,
        time_point,
    )


def _lesion_groups(
    lc: _LesionContext, seg: SegWriteResult | None, locator: _SliceLocator, key_slices: dict[str, Dataset]
) -> list[MeasurementGroup]:
    """One lesion's measurement groups (recording its key slice in ``key_slices``)."""
    rep, m = lc.rep, lc.rep.measurement
    if m.status is LesionStatus.NOT_EVALUATED and rep.not_assessed_reason:
        return [_not_assessed_group(lc.tid, lc.time_point.context(), lc.sites, rep, locator.source_for_group())]
    status = STATUS_CODES.get(m.status)
    if status is None:  # not_evaluated: the SR never asserts a status that was not assessed
        raise SrWriteError(f"lesion {m.tracking_id} ({m.tracking_uid}) has status {m.status}; it cannot be reported")
    quals = _qualitative_evaluations(rep, status)
    conf_meas = [] if rep.confidence is None else [_num(LT.TRACKING_CONFIDENCE, rep.confidence, ONE)]
    conf_meas += _drawn_measurements(rep.drawn) if rep.drawn is not None else []
    segment_number = seg.segment_numbers.get(m.tracking_uid) if seg is not None else None
    if seg is None or not m.present or segment_number is None:
        if m.present:
            raise SrWriteError(f"lesion {m.tracking_id} ({m.tracking_uid}) is present but has no SEG segment")
        return [_absent_group(lc, quals, conf_meas, locator, key_slices)]
    volumetric = _volumetric_group(lc, quals, conf_meas, seg, segment_number)
    planar = _planar_group(lc, locator, key_slices)
    # the RECIST group goes first: a viewer that merges a lesion's groups by Tracking UID (OHIF) lists the long
    # and short axes before the volume and the 3-D diameter
    return [volumetric] if planar is None else [planar, volumetric]


def _qualitative_evaluations(rep: LesionReport, status: Code) -> list[hd.sr.QualitativeEvaluation]:
    quals = [hd.sr.QualitativeEvaluation(LT.LESION_STATUS, status)]
    if rep.provenance in PROVENANCE_CODES:
        quals.append(hd.sr.QualitativeEvaluation(LT.PROVENANCE, PROVENANCE_CODES[rep.provenance]))
    if rep.baseline_category in BASELINE_CATEGORY_CODES:
        quals.append(hd.sr.QualitativeEvaluation(LT.BASELINE_CATEGORY, BASELINE_CATEGORY_CODES[rep.baseline_category]))
    if rep.review is not None:
        quals.append(hd.sr.QualitativeEvaluation(LT.REVIEW, LT.NEEDS_REVIEW if rep.review else LT.NO_REVIEW))
    if rep.prompt_origin in PRIOR_ANNOTATION_CODES:
        quals.append(hd.sr.QualitativeEvaluation(LT.PRIOR_ANNOTATION, PRIOR_ANNOTATION_CODES[rep.prompt_origin]))
    if rep.prompt_object in PROMPT_OBJECT_CODES:
        quals.append(hd.sr.QualitativeEvaluation(LT.PROMPT_OBJECT, PROMPT_OBJECT_CODES[rep.prompt_object]))
    return quals


def _absent_group(
    lc: _LesionContext,
    quals: list[hd.sr.QualitativeEvaluation],
    conf_meas: list[hd.sr.Measurement],
    locator: _SliceLocator,
    key_slices: dict[str, Dataset],
) -> MeasurementGroup:
    """A lesion that is not present: zero sizes, at the POINT where it was looked for when that is known."""
    rep, m = lc.rep, lc.rep.measurement
    zero = [
        _num(codes.SCT.Volume, 0.0, ML),
        _num(codes.SCT.LongAxis, 0.0, MM),
        _num(codes.SCT.ShortAxis, 0.0, MM),
        *_change_measurements(rep.changes, "volume_mm3", ML, ML_PER_MM3),
        *_change_measurements(rep.changes, "recist_diameter_mm", MM),
        *conf_meas,
    ]
    where = rep.expected_centre_mm if rep.expected_centre_mm is not None else m.centre_mm
    group: MeasurementGroup
    if where is not None:
        # TID 1410 with a POINT where the lesion was looked for (viewers draw it; pixelmed-clean)
        ds, point_px, src = locator.scoord_point(where)
        key_slices[m.tracking_uid] = ds
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=lc.tid,
            referenced_region=hd.sr.ImageRegion("POINT", point_px, src),
            time_point_context=lc.time_point.context(),
            finding_type=codes.SCT.Lesion,
            finding_sites=lc.sites,
            measurements=zero,
            qualitative_evaluations=quals,
        )
    else:
        # No location known: a TID 1501 group over the series. Valid DICOM, but pixelmed 2022 applies the
        # TID 1411 conditions to every group once one 1411 group exists and then reports errors — pass
        # expected_centre_mm (TrackedLesion.propagated_centre_mm) to avoid this.
        log.warning("vanished lesion %s has no expected location; written as a TID 1501 group", m.tracking_uid)
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=lc.tid,
            time_point_context=lc.time_point.context(),
            finding_type=codes.SCT.Lesion,
            finding_sites=lc.sites,
            measurements=zero,
            qualitative_evaluations=quals,
            source_images=[locator.source_for_group()],
        )
    _state_reasons(group, rep)
    return group


def _volumetric_group(
    lc: _LesionContext,
    quals: list[hd.sr.QualitativeEvaluation],
    conf_meas: list[hd.sr.Measurement],
    seg: SegWriteResult,
    segment_number: int,
) -> MeasurementGroup:
    """TID 1411: volume etc. of the SEG segment."""
    rep, m = lc.rep, lc.rep.measurement
    vol_meas = [
        _num(codes.SCT.Volume, m.volume_mm3 * ML_PER_MM3, ML),
        # named for what it is: the RECIST long/short axes are the planar group's; this is the 3-D Feret diameter
        _num(LT.MAX_3D_DIAMETER, m.max_3d_diameter_mm, MM),
    ]
    if m.hu_mean is not None:
        vol_meas.append(_num(codes.SCT.Mean, m.hu_mean, HU))
    if m.hu_sd is not None:
        vol_meas.append(_num(codes.SCT.StandardDeviation, m.hu_sd, HU))
    vol_meas += _change_measurements(rep.changes, "volume_mm3", ML, ML_PER_MM3)
    # the RECIST diameter's changes (mm, %) follow the volume's: OHIF 3.13 draws the first five NUMs of a lesion
    # (its groups merged, the RECIST group first), which are then Long axis, Short axis, Volume, Maximum 3D
    # diameter and mean HU; the diameter changes in the RECIST group would push the volume out of sight
    vol_meas += _change_measurements(rep.changes, "recist_diameter_mm", MM)
    vol_meas += conf_meas
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=lc.tid,
        referenced_segment=_referenced_segment(seg, segment_number),
        time_point_context=lc.time_point.context(),
        finding_type=codes.SCT.Lesion,
        finding_sites=lc.sites,
        measurements=vol_meas,
        qualitative_evaluations=quals,
    )
    _state_reasons(group, rep)
    return group


def _planar_group(
    lc: _LesionContext, locator: _SliceLocator, key_slices: dict[str, Dataset]
) -> MeasurementGroup | None:
    """TID 1410: the long axis polyline on the key slice + the short axis; None without both axes."""
    m = lc.rep.measurement
    if m.long_axis is None or m.short_axis is None:
        return None
    ds, long_px, src = locator.scoord(m.long_axis)
    _, short_px, short_src = locator.scoord(m.short_axis)
    key_slices[m.tracking_uid] = ds
    planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=m.tracking_uid, identifier=lc.name),
        referenced_region=hd.sr.ImageRegion("POLYLINE", long_px, src),
        time_point_context=lc.time_point.context(),
        finding_type=codes.SCT.Lesion,
        finding_sites=lc.sites,
        measurements=[_num(codes.SCT.LongAxis, m.long_axis.length_mm, MM, method=codes.DCM.RECIST1Point1)],
    )
    # The short axis keeps its own end points (NUM INFERRED FROM SCOORD POLYLINE, TID 300 row 9). highdicom
    # refuses referenced coordinates inside a TID 1410 group's constructor, so the item is appended afterwards.
    short = _num(
        codes.SCT.ShortAxis,
        m.short_axis.length_mm,
        MM,
        method=codes.DCM.RECIST1Point1,
        referenced_coordinates=[hd.sr.CoordinatesForMeasurement("POLYLINE", short_px, short_src)],
    )
    for item in short:
        planar[0].ContentSequence.append(item)
    return planar


QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


def _state_reasons(group: MeasurementGroup, rep: LesionReport) -> None:
    """A flagged lesion's reasons as TEXT items of its (first) measurement group; nothing when it is not flagged."""
    if not rep.review:
        return
    for reason in rep.review_reasons:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=LT.REVIEW_REASON, value=str(reason)[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )


def _referenced_segment(seg: SegWriteResult, number: int) -> hd.sr.ReferencedSegment:
    """Segment reference with its source images, from the slice ranges the SEG writer recorded.

    highdicom's ``ReferencedSegment.from_segmentation`` handles neither LABELMAP SEGs nor single-segment SEGs
    (their SegmentIdentificationSequence sits in the shared functional groups), so it is only the fallback for a
    SEG this process did not write."""
    if not seg.segment_slices:
        return hd.sr.ReferencedSegment.from_segmentation(seg.dataset, number)
    sources = [seg.source_datasets[k] for k in seg.segment_slices.get(number, [])]
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.dataset.SOPClassUID,
        sop_instance_uid=seg.dataset.SOPInstanceUID,
        segment_number=number,
        source_images=[hd.sr.SourceImageForSegmentation(d.SOPClassUID, d.SOPInstanceUID) for d in sources],
    )


def _recist_container(r: TimepointResponse, best: Response | None) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 "Qualitative Evaluations": the RECIST 1.1 time-point response as CODE items, with the sums
    as NUM items (TID 1500 is extensible; pixelmed reports these NUMs as "not in template" warnings)."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS

    def code(name: Code, value: Code) -> hd.sr.CodeContentItem:
        return hd.sr.CodeContentItem(name=name, value=value, relationship_type=contains)

    def num(name: Code, value: float, unit: Code) -> hd.sr.NumContentItem:
        return hd.sr.NumContentItem(name=name, value=float(value), unit=unit, relationship_type=contains)

    items: list[hd.sr.ContentItem] = [code(codes.DCM.ResponseEvaluationMethod, codes.DCM.RECIST1Point1)]
    target = TARGET_CODES.get(r.target_response) or UNASSESSED_CODES.get(r.target_response)
    if target is not None:
        items.append(code(LT.TARGET_RESPONSE, target))
    non_target = NON_TARGET_CODES.get(r.non_target_response) or UNASSESSED_CODES.get(r.non_target_response)
    if non_target is not None:
        items.append(code(LT.NON_TARGET_RESPONSE, non_target))
    # new lesions: only what was assessed (never "No" when nobody looked)
    items.append(code(LT.NEW_LESIONS, NEW_LESION_CODES[r.new_lesion_state]))
    if r.new_lesion_state is NewLesionState.CANDIDATES:
        items.append(num(LT.CANDIDATE_COUNT, r.new_lesion_candidates, ONE))
    items.append(code(codes.DCM.CurrentResponse, OVERALL_CODES[r.overall_response]))
    if best is not None:
        items.append(code(codes.DCM.BestOverallResponse, OVERALL_CODES[best]))
    if r.volumetric_response is not None:
        items.append(code(LT.VOLUME_RESPONSE, OVERALL_CODES[r.volumetric_response]))
    if r.sum_of_diameters_mm is not None:
        items.append(num(LT.SUM_DIAMETERS, r.sum_of_diameters_mm, MM))
    if r.nadir_sum_mm is not None:
        items.append(num(LT.NADIR_SUM, r.nadir_sum_mm, MM))
    if r.change_from_baseline_pct is not None:
        items.append(num(LT.CHANGE_BASE_PCT, r.change_from_baseline_pct, PCT))
    if r.change_from_nadir_mm is not None:
        items.append(num(LT.CHANGE_NADIR_ABS, r.change_from_nadir_mm, MM))
    if r.change_from_nadir_pct is not None:
        items.append(num(LT.CHANGE_NADIR_PCT, r.change_from_nadir_pct, PCT))
    if r.sum_of_volumes_mm3 is not None:
        items.append(num(LT.SUM_VOLUMES, r.sum_of_volumes_mm3 * ML_PER_MM3, ML))
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
