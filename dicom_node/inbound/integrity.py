"""Series integrity before analysis: was the transfer complete, and does every stored instance really decode?

Called by :func:`dicom_node.inbound.completion.complete_series` when the routing rules chose ANALYSE. Two holds, each a
readable reason stored as the series' routing reason (decision SKIP), so the dashboard and ``audit`` show why:

* **Incomplete transfer** (``dicom.analyse_incomplete_transfers = false``, the default): the last association that
  delivered instances of the series ended in an A-ABORT or a dropped connection (or was still open when the node
  stopped), or fewer instances arrived than the series announced (ImagesInAcquisition). Lifted when the series
  is sent again over an association that ends with an A-RELEASE, or when an operator forces completion.
* **Invalid instance**: a full parse of every stored instance (not done on the C-STORE hot path) fails, or its
  native pixel data is not Rows x Columns x frames x samples x BitsAllocated/8 bytes long. Forcing does not lift
  this hold: such data cannot be analysed; the series must be re-sent with valid data.
* **Slice gap / inconsistent geometry** (CT Image series): the instances disagree on ImageOrientationPatient,
  PixelSpacing, Rows or Columns, or the slice positions along the normal leave a gap of more than 1.5 times the
  spacing around it (a missing slice: volumes and diameters would be wrong; a series whose spacing changes from
  one range to the next is whole). The series waited the completion
  window (``dicom.series_quiet_seconds`` since its last instance) for the missing one; it is then skipped with
  the reason. A late instance re-opens the series and it completes, and is checked, again. Forcing does not lift
  it (the data is not whole); an operator who accepts the gap uses "analyse anyway" (:mod:`dicom_node.inbound.skipped`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from sqlalchemy import select
from sqlalchemy.orm import Session

from lesiontrack.config.logging import withhold_values
from lesiontrack.db.models import Instance, Series, TransferOutcome
from lesiontrack.dicom_node.inbound.storage import NATIVE_TS

log = logging.getLogger(__name__)

INCOMPLETE = "incomplete transfer"
INVALID = "invalid instance"
SLICE_GAP = "slice gap"
INCONSISTENT = "inconsistent geometry"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: a gap between neighbouring slice positions larger than this times the series' usual spacing is a missing slice
GAP_FACTOR = 1.5
_GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"]


def hold_code(reason: str) -> str:
    """The stable code (metric label) of a hold reason."""
    for prefix, code in ((INCOMPLETE, "incomplete_transfer"), (INVALID, "invalid_instance"),
                         (SLICE_GAP, "slice_gap"), (INCONSISTENT, "inconsistent_geometry")):  # fmt: skip
        if reason.startswith(prefix):
            return code
    return "hold"


def first_header(s: Session, series: Series) -> Dataset | None:
    """ImagesInAcquisition (and little else) of the series' first stored instance."""
    path = s.scalar(
        select(Instance.file_path)
        .where(Instance.series_pk == series.id)
        .order_by(Instance.instance_number, Instance.id)
        .limit(1)
    )
    if path is None:
        return None
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=["ImagesInAcquisition"])
    except Exception as exc:
        log.warning("cannot read the header of %s: %s", path, withhold_values(str(exc)))
        return None


def expected_count(header: Dataset | None) -> int | None:
    """ImagesInAcquisition of the first instance, when present and sane."""
    if header is None:
        return None
    try:
        v = header.get("ImagesInAcquisition")
        n = int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return n if n is not None and 0 < n < 1_000_000 else None


def transfer_hold(
    series: Series, expected: int | None, pacs_count: int | None = None, held: int | None = None
) -> str | None:
    """Why the series' transfer looks incomplete, or None.

    ``pacs_count`` is what the PACS says the series holds (NumberOfSeriesRelatedInstances, or the count its
    completion trigger passed): when ``held`` (distinct instances indexed) reaches it, the transfer is whole
    however its associations ended — some PACSes end a push without A-RELEASE or keep the association open."""
    n = series.instance_count if held is None else held
    if pacs_count is not None:
        if n >= pacs_count:
            return None
        return (
            f"{INCOMPLETE}: {n} of the {pacs_count} instances the PACS reports were received; "
            "re-send it or force completion to analyse"
        )
    outcome = series.last_transfer
    if outcome == TransferOutcome.ABORTED:
        return (
            f"{INCOMPLETE}: the last association sending it ended with an A-ABORT or dropped connection after "
            f"{n} instances; re-send it or force completion to analyse"
        )
    if outcome == TransferOutcome.OPEN:
        return (
            f"{INCOMPLETE}: an association delivering it was still open (no A-RELEASE yet) after {n} instances; "
            "re-send it or force completion to analyse"
        )
    if expected is not None and series.instance_count < expected:
        return (
            f"{INCOMPLETE}: {series.instance_count} of {expected} instances (ImagesInAcquisition) received; "
            "re-send it or force completion to analyse"
        )
    return None


def _pixel_problem(ds: Dataset, transfer_syntax: str) -> str | None:
    if "PixelData" not in ds:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"pixel data without usable Rows/Columns/BitsAllocated ({type(exc).__name__})"
    if min(rows, cols, bits, spp, frames) <= 0:
        return "pixel data with zero Rows, Columns, BitsAllocated, SamplesPerPixel or NumberOfFrames"
    elem = ds["PixelData"]
    if transfer_syntax in NATIVE_TS:
        expected = (rows * cols * frames * spp * bits + 7) // 8
        actual = len(elem.value or b"")
        if actual not in (expected, expected + 1):  # one pad byte to even length
            return f"pixel data is {actual} bytes, Rows x Columns x frames needs {expected}"
        return None
    return _encapsulated_problem(elem)


def _encapsulated_problem(elem: DataElement) -> str | None:
    """What is wrong with pixel data under a compressed transfer syntax: not encapsulated, or no fragments."""
    if not elem.is_undefined_length:
        return "native pixel data under a compressed transfer syntax"
    try:
        n = sum(1 for _ in generate_fragments(elem.value))
    except Exception as exc:
        return f"encapsulated pixel data does not parse ({exc})"
    if n < 1:
        return "encapsulated pixel data without fragments"
    return None


def check_instance_file(path: Path | str, decode_pixels: bool = True) -> str | None:
    """A full parse of one stored instance, the pixel-length check and (``decode_pixels``) a decode of its
    pixel data, as the analysis will do; the problem, or None."""
    try:
        ds = dcmread(path)
        ts = str(ds.file_meta.TransferSyntaxUID)
        for elem in ds.iterall():  # forces every value (and every nested item) to decode
            _ = elem.value
    except RecursionError:
        return "sequences nested too deeply to read"
    except Exception as exc:
        return f"does not parse ({type(exc).__name__}: {withhold_values(str(exc))[:120]})"
    problem = _pixel_problem(ds, ts)
    if problem or not decode_pixels or "PixelData" not in ds:
        return problem
    try:
        _ = ds.pixel_array
    except Exception as exc:
        return f"pixel data does not decode ({type(exc).__name__}: {withhold_values(str(exc))[:120]})"
    return None


def validate_instances(s: Session, series: Series) -> str | None:
    """The first invalid stored instance of ``series`` as a hold reason, or None."""
    rows = s.execute(select(Instance.sop_instance_uid, Instance.file_path).where(Instance.series_pk == series.id)).all()
    bad: list[tuple[str, str]] = []
    for sop, path in rows:
        problem = check_instance_file(path)
        if problem:
            bad.append((sop, problem))
    if not bad:
        return None
    sop, problem = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    log.warning("series %s: %d invalid instance(s), first %s: %s", series.series_instance_uid, len(bad), sop, problem)
    return f"{INVALID} {sop}: {problem}{more}"


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def geometry_hold(s: Session, series: Series) -> str | None:
    """Why a single-frame CT series is not a whole volume (see the module docstring), or None. Reads the
    geometry attributes of every instance (headers only)."""
    rows = s.execute(
        select(Instance.sop_instance_uid, Instance.file_path).where(
            Instance.series_pk == series.id, Instance.sop_class_uid == CT_IMAGE
        )
    ).all()
    if len(rows) < 3:
        return None
    planes: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]] = []
    for sop, path in rows:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_GEOMETRY_TAGS)
            pos, ori = _floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6)
            spacing, size = _floats(ds.get("PixelSpacing"), 2), (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
        except Exception:
            return None  # unreadable headers are the invalid-instance check's to report
        if pos is None or ori is None or spacing is None:
            return None
        planes.append((sop, pos, ori, spacing, size))
    first = planes[0]
    for sop, _pos, ori, spacing, size in planes[1:]:
        what = (
            "ImageOrientationPatient" if not np.allclose(ori, first[2], atol=1e-3)
            else "PixelSpacing" if not np.allclose(spacing, first[3], atol=1e-4)
            else "Rows/Columns" if size != first[4]
            else None
        )  # fmt: skip
        if what:
            return f"{INCONSISTENT}: instance {sop} has another {what} than {first[0]}; not one volume"
    normal = np.cross(first[2][:3], first[2][3:])
    dist = np.sort(np.array([p[1] @ normal for p in planes]))
    gaps = np.diff(dist)
    gaps = gaps[gaps > 0.01]  # repeated positions (several acquisitions) are the analysis' to refuse
    if len(gaps) < 2:
        return None
    # a gap is compared with the spacing around it (the median of up to 3 gaps on each side, the larger side):
    # series whose spacing changes (4 mm then 7 mm, a multi-range acquisition) are whole
    missing, big, worst, local_at_worst = 0, 0, 0.0, 0.0
    for i, g in enumerate(gaps):
        left, right = gaps[max(0, i - 3) : i], gaps[i + 1 : i + 4]
        local = max(float(np.median(left)) if len(left) else 0.0, float(np.median(right)) if len(right) else 0.0)
        if local > 0 and g > GAP_FACTOR * local:
            big += 1
            missing += max(1, round(float(g) / local) - 1)
            if g > worst:
                worst, local_at_worst = float(g), local
    if not big:
        return None
    return (
        f"{SLICE_GAP}: about {missing} slice(s) missing ({big} gap(s), the largest {worst:.2f} mm where the "
        f"spacing around it is {local_at_worst:.2f} mm) after the completion window; re-send the missing instances"
    )


def hold_reason(
    s: Session,
    series: Series,
    header: Dataset | None,
    *,
    forced: bool,
    analyse_incomplete: bool,
    validate: bool,
    pacs_count: int | None = None,
    held: int | None = None,
) -> str | None:
    """Why a series routed to ANALYSE must not be analysed now (see the module docstring), or None.
    ``pacs_count``: the instance count the PACS reported (see :func:`transfer_hold`)."""
    expected = pacs_count if pacs_count is not None else expected_count(header)
    if expected is not None:
        series.expected_instances = expected
    if not forced and not analyse_incomplete:
        hold = transfer_hold(series, series.expected_instances, pacs_count, held)
        if hold:
            return hold
    geometry = geometry_hold(s, series)
    if geometry:
        log.warning("series %s not analysed: %s", series.series_instance_uid, geometry)
        return geometry
    if validate:
        return validate_instances(s, series)
    return None
