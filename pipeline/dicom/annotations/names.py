"""The lesions an annotation object names, read without its CT (issue 31 C).

Which earlier annotation marks which lesion is known before that study's CT is here: prior matching fetches a PACS
study's annotation series (they are small), and the per-lesion sources (:mod:`pipeline.jobs.lesion_sources`) retrieve
a study's CT only when one of its annotations names a lesion that needs it. Identities are the readers' own (a SEG's
or an SR's Tracking UID and ID, a GSPS text or an RT ROI name through
:func:`~pipeline.dicom.annotations.common.identity_for`), so that a lesion named here is the lesion read there.
Marks without a name (an unlabelled GSPS line) are not listed: nothing says which lesion they are before reading them.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from lesiontrack.models.segmentation.prompts import LesionIdentity
from lesiontrack.pipeline.dicom.annotations.common import identity_for
from lesiontrack.pipeline.dicom.annotations.gsps import gsps_labels
from lesiontrack.pipeline.dicom.annotations.rtstruct import lesion_roi_names
from lesiontrack.pipeline.dicom.seg.reader import segment_identity
from lesiontrack.pipeline.dicom.sr.reader import sr_lesion_identities


class UnreadableNames(ValueError):
    """The object's lesion names cannot be read (the message names the file and the problem)."""


def named_lesions(path: str | Path, modality: str) -> list[LesionIdentity]:
    """The lesions ``path`` (a SEG, TID 1500 SR, GSPS — modality PR — or RTSTRUCT) names, without reading a CT."""
    path = Path(path)
    try:
        if modality == "SR":
            return sr_lesion_identities(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        patient, sop = str(ds.get("PatientID", "")), str(ds.get("SOPInstanceUID", path.name))
        if modality == "SEG":
            return [_segment(s, sop) for s in ds.get("SegmentSequence", [])]
        if modality == "PR":
            labels = gsps_labels(ds)
        elif modality == "RTSTRUCT":
            labels = lesion_roi_names(ds)
        else:
            return []
    except Exception as exc:  # any unreadable object: named, never a crash of the job
        raise UnreadableNames(f"{path}: cannot read the lesions it names ({type(exc).__name__}: {exc})") from exc
    return [identity_for(label, n, patient, sop) for n, label in enumerate(labels, start=1)]


def _segment(s: pydicom.Dataset, sop: str) -> LesionIdentity:
    n = int(s.get("SegmentNumber", 0) or 0)
    label = str(s.get("SegmentLabel", "") or "")
    uid, tid = segment_identity(sop, n, s.get("TrackingUID"), s.get("TrackingID"), label)
    return LesionIdentity(uid, tid, n)
