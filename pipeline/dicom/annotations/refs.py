"""Which CT series a prior-study annotation object refers to — SEG and TID 1500 SR as
:func:`pipeline.jobs.verification.annotation_references` reads them, plus presentation states (Referenced Series
Sequence) and RT structure sets (Referenced Frame of Reference › RT Referenced Study › RT Referenced Series). Used by
prior lookup, which finds every kind a radiologist leaves; verification of follow-ups keeps to SEG and SR."""

from __future__ import annotations

from pydicom import Dataset

from lesiontrack.pipeline.dicom.annotations.gsps import GSPS_SOP_CLASSES
from lesiontrack.pipeline.dicom.annotations.rtstruct import RTSTRUCT_SOP_CLASS
from lesiontrack.pipeline.jobs.verification import annotation_references

#: Series modalities that may hold a prior's lesion annotations.
PRIOR_ANNOTATION_MODALITIES = {"SEG", "SR", "PR", "RTSTRUCT"}


def prior_annotation_references(ds: Dataset) -> tuple[str | None, list[str]]:
    """('SEG'|'SR'|'PR'|'RTSTRUCT'|None, referenced series UIDs) of one annotation object header."""

    kind, refs = annotation_references(ds)
    if kind is not None:
        return kind, refs
    sop = str(ds.get("SOPClassUID", ""))
    out: list[str] = []

    def add(uid: object) -> None:
        if uid and str(uid) not in out:
            out.append(str(uid))

    if sop in GSPS_SOP_CLASSES:
        for item in ds.get("ReferencedSeriesSequence", []):
            add(item.get("SeriesInstanceUID"))
        return "PR", out
    if sop == RTSTRUCT_SOP_CLASS:
        for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in frame.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    add(series.get("SeriesInstanceUID"))
        return "RTSTRUCT", out
    return None, out
