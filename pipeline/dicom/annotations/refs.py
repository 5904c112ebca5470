"""Which CT series a prior-study annotation object refers to — SEG and TID 1500 SR as
:func:`annotation_references` reads them (for verification of follow-ups too), plus presentation states (Referenced
Series Sequence) and RT structure sets (Referenced Frame of Reference › RT Referenced Study › RT Referenced Series).
Used by prior lookup, which finds every kind a radiologist leaves; verification of follow-ups keeps to SEG and SR."""

from __future__ import annotations

from pydicom import Dataset

from lesiontrack.pipeline.dicom.annotations.gsps import GSPS_SOP_CLASSES
from lesiontrack.pipeline.dicom.annotations.rtstruct import RTSTRUCT_SOP_CLASS
from lesiontrack.pipeline.dicom.prompt_sources import SR_SOP_CLASSES
from lesiontrack.pipeline.dicom.seg.reader import SEG_SOP_CLASSES

#: Series modalities that may hold a prior's lesion annotations.
PRIOR_ANNOTATION_MODALITIES = {"SEG", "SR", "PR", "RTSTRUCT"}


def annotation_references(ds: Dataset) -> tuple[str | None, list[str]]:
    """('SEG'|'SR'|None, referenced series UIDs, the evaluated series first) of one SEG or TID 1500 SR header."""
    sop = str(ds.get("SOPClassUID", ""))
    refs: list[str] = []

    def add(uid: object) -> None:
        if uid and str(uid) not in refs:
            refs.append(str(uid))

    if sop in SEG_SOP_CLASSES:
        for item in ds.get("ReferencedSeriesSequence", []):
            add(item.get("SeriesInstanceUID"))
        return "SEG", refs
    if sop in SR_SOP_CLASSES:
        templates = [str(t.get("TemplateIdentifier", "")) for t in ds.get("ContentTemplateSequence", [])]
        concept = [str(c.get("CodeValue", "")) for c in ds.get("ConceptNameCodeSequence", [])]
        if "1500" not in templates and "126000" not in concept:
            return None, refs
        for seq in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
            for study_item in ds.get(seq, []):
                for series_item in study_item.get("ReferencedSeriesSequence", []):
                    add(series_item.get("SeriesInstanceUID"))
        return "SR", refs
    return None, refs


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
