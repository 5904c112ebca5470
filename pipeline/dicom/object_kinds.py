"""What kind of annotation or result object a stored DICOM instance is, named as a reader would name it.

The dashboard says where a result was prompted from and which objects a timepoint holds; it must name them as they
are (issue 29): a radiologist's RECIST lines in an SR are "SR lines", not "SEG". :func:`object_kind` names one
object from its SOP class (and, for a person's SR, the graphic types of its content; our own reports are "SR"):
``SEG``, ``SR lines``, ``SR points``, ``SR boxes``, ``SR``, ``GSPS``, ``RTSTRUCT``. :func:`object_kinds` names
the stored instances of a list of UIDs (an UID not on file is left out: nothing is named that we do not hold);
:func:`has_mask` says whether a thumbnail of a segment can exist for that kind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from lesiontrack.db.models import Instance

log = logging.getLogger(__name__)

OUR_MANUFACTURER = "LesionTrack"  # pipeline.dicom.seg.writer.SOFTWARE_NAME: our reports are named "SR", not by content

SEG_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
SR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.11",
        "1.2.840.10008.5.1.4.1.1.88.22",
        "1.2.840.10008.5.1.4.1.1.88.33",
        "1.2.840.10008.5.1.4.1.1.88.34",
    }
)
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def _graphic_types(items: Iterable[Dataset]) -> Iterator[str]:
    for item in items:
        if item.get("ValueType") in ("SCOORD", "SCOORD3D") and item.get("GraphicType"):
            yield str(item.GraphicType)
        yield from _graphic_types(item.get("ContentSequence", []))


def _sr_kind(path: str) -> str:
    p = Path(path)
    st = p.stat()
    return _sr_kind_of(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=1024)
def _sr_kind_of(path: str, _mtime_ns: int, _size: int) -> str:
    """``SR lines`` / ``SR points`` / ``SR boxes`` from a person's SR's spatial coordinates (``SR`` when it has none,
    and for our own reports: their polylines are measurements, not a reader's annotation)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # an unreadable file is named by its class alone
        log.info("SR %s unreadable for its kind: %s", Path(path).name, exc)
        return "SR"
    if str(ds.get("Manufacturer", "")) == OUR_MANUFACTURER:
        return "SR"
    kinds = set(_graphic_types(ds.get("ContentSequence", [])))
    if kinds & {"POLYLINE", "MULTIPOINT"}:
        return "SR lines"
    if kinds & {"POLYGON", "ELLIPSE", "CIRCLE"}:
        return "SR boxes"
    if "POINT" in kinds:
        return "SR points"
    return "SR"


def object_kind(sop_class_uid: str, path: str | Path | None = None) -> str:
    """The reader's name of an object of ``sop_class_uid`` (``path``: the file, to tell an SR's lines from points)."""
    if sop_class_uid in SEG_CLASSES:
        return "SEG"
    if sop_class_uid in SR_CLASSES:
        return _sr_kind(str(path)) if path is not None and Path(path).is_file() else "SR"
    if sop_class_uid == GSPS_CLASS:
        return "GSPS"
    if sop_class_uid == RTSTRUCT_CLASS:
        return "RTSTRUCT"
    return "DICOM object"


def has_mask(kind: str | None) -> bool:
    """Whether an object of this kind holds a segment a thumbnail can be cut from."""
    return kind == "SEG"


def object_kinds(session: Session, sop_uids: Iterable[str | None]) -> dict[str, str]:
    """SOP Instance UID → :func:`object_kind` for those of ``sop_uids`` that are on file."""
    wanted = sorted({u for u in sop_uids if u})
    if not wanted:
        return {}
    out: dict[str, str] = {}
    for row in session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(wanted)).order_by(Instance.id)):
        out[row.sop_instance_uid] = object_kind(row.sop_class_uid, row.file_path)
    return out
