"""The OHIF measurements SR: each present lesion's RECIST axes shaped the way OHIF re-hydrates them (series 903).

OHIF 3.13 lists an SR's measurements in its tracked-measurements panel only after *re-hydrating* them into
cornerstone annotations, and it re-hydrates a measurement group only when (``@cornerstonejs/adapters``
``MeasurementReport.generateToolState`` / OHIF ``isRehydratable.ts``) its Tracking Identifier text is a cornerstone
tool tag (``Cornerstone3DTools@^0.1.0:Bidirectional``: ``BaseAdapter3D.isValidCornerstoneTrackingIdentifier``) and
its geometry is TID 300 style: NUM items named by the CodeMeaning ``Long Axis`` / ``Short Axis``, each INFERRED FROM
an SCOORD POLYLINE of 2 points on one image (``Bidirectional.getMeasurementData``). The label OHIF shows is the
group's TEXT ``Comment`` (DCM 121106; ``MeasurementReport.getCornerstoneLabelFromDefaultState``), which is also
where OHIF itself writes a label when it saves.

Our TID 1500 report (:mod:`pipeline.dicom.sr.writer`) keeps the lesion's *name* as its Tracking Identifier (what other
viewers, read centres and our own SR reader show) and TID 1410/1411 geometry, so it meets neither condition. This
module writes a second, small TID 1500 instance in its own series with one TID 1501 group per present lesion:

* Tracking Identifier = OHIF's tool tag (``Bidirectional``); **Tracking UID = the lesion's own Tracking UID** (the
  same as its SEG segment and its groups in the main SR: one lesion, one Tracking UID; each lesion has exactly one
  group here, so nothing is merged within this instance);
* only tracked lesions (not unconfirmed new-lesion candidates: :func:`viewer_lesions`);
* Comment = the lesion's display name (Tracking ID + the radiologist's description, :mod:`pipeline.dicom.lesion_names`);
* Finding = Lesion, its finding site, the TID 1502 time point;
* NUM Long Axis and NUM Short Axis (mm, RECIST 1.1), each INFERRED FROM its 2-point POLYLINE on the key axial slice.
  A lesion measured without a short axis (too thin for one) gets OHIF's ``Length`` tag and the Long Axis NUM only,
  which OHIF's Length adapter reads (it takes the group's first NUM and its SCOORD).

It carries no measurement that is not in the main report. Like our SEG and main SR it is a new instance for every
result (a re-analysis supersedes the previous one via the Predecessor Documents Sequence) with Manufacturer
LesionTrack, so it is never taken for a person's annotation; an SR that OHIF saves after a radiologist edits the
hydrated measurements is not ours (OHIF writes Manufacturer "Unspecified" and fresh Tracking UIDs) and is read as
the radiologist's (:mod:`pipeline.dicom.sr.reader` takes the Comment as the lesion's name).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Unpack

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from lesiontrack.db.status import LesionStatus
from lesiontrack.pipeline.dicom.lesion_names import display_name
from lesiontrack.pipeline.dicom.seg.writer import anatomic_code
from lesiontrack.pipeline.dicom.sr.writer import (
    MM,
    LesionReport,
    SrDocument,
    SrHeader,
    SrTimepoint,
    _segment_descriptions,
    _SliceLocator,
    build_sr,
)
from lesiontrack.pipeline.science.measurements import LesionMeasurement

log = logging.getLogger(__name__)

#: The Tracking Identifier texts OHIF's Bidirectional / Length adapters re-hydrate (@cornerstonejs/adapters
#: CORNERSTONE_3D_TAG + tool type)
OHIF_BIDIRECTIONAL = "Cornerstone3DTools@^0.1.0:Bidirectional"
OHIF_LENGTH = "Cornerstone3DTools@^0.1.0:Length"
#: OHIF finds the two NUMs by CodeMeaning, capitalised as in DICOM CID 7470 ("Long Axis"; pydicom says "Long axis")
LONG_AXIS = Code("103339001", "SCT", "Long Axis")
SHORT_AXIS = Code("103340004", "SCT", "Short Axis")
COMMENT = codes.DCM.Comment
SERIES_NUMBER = 903
SERIES_DESCRIPTION = "LesionTrack RECIST for OHIF"


def viewer_lesions(lesions: Sequence[LesionReport]) -> list[LesionReport]:
    """The lesions the OHIF SR shows: the tracked lesions (and confirmed new ones) present with a RECIST long axis.

    Unconfirmed new-lesion candidates are left out (issue 29): OHIF's tracked-measurements panel is the reader's
    list of lesions being followed, and a candidate is not one until a reader confirms it; candidates are in the SEG
    (their own segment category) and in the report (series 902)."""
    out = []
    for rep in lesions:
        m = rep.measurement
        if m.status is LesionStatus.CANDIDATE:
            continue
        if m.present and m.long_axis is not None and m.long_axis.length_mm > 0:
            out.append(rep)
    return out


def _has_short_axis(m: LesionMeasurement) -> bool:
    return m.short_axis is not None and m.short_axis.length_mm > 0


def write_viewer_sr(
    source_datasets: Sequence[Dataset],
    lesions: Sequence[LesionReport],
    *,
    time_point: SrTimepoint,
    seg: Dataset | None = None,
    previous_versions: Sequence[Dataset] = (),
    **header: Unpack[SrHeader],
) -> hd.sr.Comprehensive3DSR | None:
    """The OHIF measurements SR of one follow-up series; None when no present lesion has a RECIST long axis.

    ``seg`` (our SEG of the same result) supplies the radiologist's descriptions when a report has none, exactly as
    :func:`pipeline.dicom.sr.writer.write_sr` names the lesion. ``header``: :class:`pipeline.dicom.sr.writer.SrHeader`
    (series
    903 unless given).
    """
    shown = viewer_lesions(lesions)
    if not shown:
        return None
    locator = _SliceLocator(source_datasets)
    said = _segment_descriptions(seg)
    key_slices: dict[str, Dataset] = {}
    groups = [_viewer_group(rep, locator, time_point, said, key_slices) for rep in shown]
    doc = SrDocument(
        groups,
        evidence=list(locator.datasets),
        key_images=list(key_slices.values()),
        previous_versions=previous_versions,
    )
    sr = build_sr(doc, header, series_number=SERIES_NUMBER, series_description=SERIES_DESCRIPTION)
    # the series is as old as its one instance (OHIF's save dialog lists series by date/time: not "undefined")
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime
    log.debug("OHIF measurements SR %s: %d lesion(s)", sr.SOPInstanceUID, len(groups))
    return sr


def _viewer_group(
    rep: LesionReport,
    locator: _SliceLocator,
    time_point: SrTimepoint,
    said: dict[str, str],
    key_slices: dict[str, Dataset],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One present lesion's TID 1501 group, shaped as OHIF re-hydrates it (recording its key slice)."""
    m = rep.measurement
    assert m.long_axis is not None  # viewer_lesions
    ds, long_px, src = locator.scoord(m.long_axis)
    key_slices[ds.SOPInstanceUID] = ds
    axes = [(LONG_AXIS, m.long_axis, long_px)]
    tool = OHIF_LENGTH
    if m.short_axis is not None and _has_short_axis(m):
        _, short_px, _ = locator.scoord(m.short_axis)  # the same axial slice (RECIST axes are measured in one)
        axes.append((SHORT_AXIS, m.short_axis, short_px))
        tool = OHIF_BIDIRECTIONAL
    site = anatomic_code(m.anatomic_site)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=m.tracking_uid, identifier=tool),
        time_point_context=time_point.context(),
        finding_type=codes.SCT.Lesion,
        finding_sites=[hd.sr.FindingSite(anatomic_location=site)] if site is not None else None,
        measurements=[
            hd.sr.Measurement(
                name=name,
                value=float(axis.length_mm),
                unit=MM,
                method=codes.DCM.RECIST1Point1,
                referenced_coordinates=[hd.sr.CoordinatesForMeasurement("POLYLINE", px, src)],
            )
            for name, axis, px in axes
        ],
    )
    name = display_name(m.tracking_id, rep.description or said.get(m.tracking_uid))
    # TID 1501 has no row for a label; OHIF reads (and writes) it as a CONTAINS TEXT "Comment" (TID 1500 is
    # extensible). highdicom has no parameter for it, so the item is appended to the group's container.
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(name=COMMENT, value=name, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    )
    return group
