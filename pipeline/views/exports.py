"""Read-centre exports of a patient's lesion timeline: one row per lesion per timepoint (CSV/JSON) and a CDISC
SDTM-style TU (tumour identification), TR (tumour results) and RS (response) layout (CSV/JSON).

Input is the :class:`pipeline.views.history.PatientTimeline` built from the database, so the numbers are exactly the
ones the dashboard and API show. Mapping to SDTM (Oncology domains): Tracking ID → ``--LNKID``, Tracking UID →
``TUREFID``, timepoint → ``VISIT``/``VISITNUM``, study date → ``--DTC``. Measurements keep full float precision.
The lesion rows carry each result's confidence, review flag and review reasons (:mod:`pipeline.science.confidence`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence

from lesiontrack.db.status import LesionStatus
from lesiontrack.pipeline.views.history import PatientTimeline

LESION_COLUMNS = [
    "subject_id",
    "patient_pk",
    "tracking_id",
    "tracking_uid",
    "anatomic_site",
    "role",
    "origin",
    "timepoint",
    "timepoint_index",
    "study_date",
    "study_instance_uid",
    "series_instance_uid",
    "status",
    "volume_mm3",
    "volume_ml",
    "long_axis_mm",
    "short_axis_mm",
    "volume_change_prev_pct",
    "volume_change_baseline_pct",
    "long_axis_change_baseline_pct",
    "sum_of_diameters_mm",
    "target_response",
    "non_target_response",
    "new_lesions",
    "overall_response",
    "confidence",
    "review",
    "review_reasons",
    "seg_sop_instance_uid",
    "segment_number",
    "observation_id",
    "derived_from_sop_instance_uid",
    "result_verified_by",
    "timepoint_verified_by",
    "timepoint_verified_at",
    "timepoint_verification",
    "retired_at_series_uid",
    "retired_by",
]
TU_COLUMNS = [
    "STUDYID",
    "DOMAIN",
    "USUBJID",
    "TUSEQ",
    "TULNKID",
    "TUREFID",
    "TUTESTCD",
    "TUTEST",
    "TUORRES",
    "TUSTRESC",
    "TULOC",
    "TUMETHOD",
    "TUEVAL",
    "VISITNUM",
    "VISIT",
    "TUDTC",
]
TR_COLUMNS = [
    "STUDYID",
    "DOMAIN",
    "USUBJID",
    "TRSEQ",
    "TRLNKID",
    "TRLNKGRP",
    "TRTESTCD",
    "TRTEST",
    "TRORRES",
    "TRORRESU",
    "TRSTRESC",
    "TRSTRESN",
    "TRSTRESU",
    "TRMETHOD",
    "TREVAL",
    "VISITNUM",
    "VISIT",
    "TRDTC",
]
RS_COLUMNS = [
    "STUDYID",
    "DOMAIN",
    "USUBJID",
    "RSSEQ",
    "RSLNKGRP",
    "RSTESTCD",
    "RSTEST",
    "RSCAT",
    "RSORRES",
    "RSSTRESC",
    "RSEVAL",
    "VISITNUM",
    "VISIT",
    "RSDTC",
]

# New Lesion Indicator by what was assessed: no "N" unless the follow-up was searched and nothing was found.
NEWLIND = {
    "yes (confirmed)": "Y",
    "no candidates found": "N",
    "unconfirmed candidates": "EQUIVOCAL",
    "not assessed": "NE",
}

EVALUATOR = "ALGORITHM"  # results come from LesionTrack, not a human reader
READER_EVALUATOR = "RADIOLOGIST"  # a result adopted from a reader's correction (verified tracking)
METHOD = "CT SCAN"


def lesion_rows(tl: PatientTimeline, subject_id: str) -> list[dict[str, object]]:
    """One dict per lesion per timepoint where the lesion was observed (columns: :data:`LESION_COLUMNS`)."""
    out: list[dict[str, object]] = []
    for row in tl.lesions:
        for tp in tl.timepoints:
            c = row.cells[tp.index]
            if c is None:
                continue
            out.append(
                {
                    "subject_id": subject_id,
                    "patient_pk": tl.patient_pk,
                    "tracking_id": row.tracking_id,
                    "tracking_uid": row.tracking_uid,
                    "anatomic_site": row.anatomic_site,
                    "role": row.role,
                    "origin": row.origin,
                    "timepoint": tp.label,
                    "timepoint_index": tp.index,
                    "study_date": tp.date_iso,
                    "study_instance_uid": tp.study_uid,
                    "series_instance_uid": tp.series_uid,
                    "status": c.status,
                    "volume_mm3": c.volume_mm3,
                    "volume_ml": c.volume_ml,
                    "long_axis_mm": c.long_axis_mm,
                    "short_axis_mm": c.short_axis_mm,
                    "volume_change_prev_pct": c.volume_change_prev_pct,
                    "volume_change_baseline_pct": c.volume_change_baseline_pct,
                    "long_axis_change_baseline_pct": c.long_axis_change_baseline_pct,
                    "sum_of_diameters_mm": tp.sum_of_diameters_mm,
                    "target_response": tp.target_response,
                    "non_target_response": tp.non_target_response,
                    "new_lesions": tp.new_lesions_text,
                    "overall_response": tp.overall_response,
                    "confidence": c.confidence,
                    "review": c.review,
                    "review_reasons": "; ".join(c.review_reasons),
                    "seg_sop_instance_uid": c.seg_sop_instance_uid,
                    "segment_number": c.segment_number,
                    "observation_id": c.observation_id,
                    # verified tracking: where the result came from and who verified what, when (issue 16)
                    "derived_from_sop_instance_uid": c.propagated_from_sop_uid,
                    "result_verified_by": c.verified_by,
                    "timepoint_verified_by": tp.verified_by,
                    "timepoint_verified_at": tp.verified_at,
                    "timepoint_verification": tp.verification_method,
                    "retired_at_series_uid": row.retired_at_series_uid,
                    "retired_by": row.retired_by,
                }
            )
    return out


def _tu_result(role: str) -> str:
    return {"target": "TARGET", "non-target": "NON-TARGET", "new": "NEW"}.get(role, "NOT ASSESSED")


def _visit(index: int) -> str:
    return "BASELINE" if index == 0 else f"FOLLOW-UP {index}"


SdtmRecord = dict[str, object]
"""One SDTM record (column → value): a row of the CSV / JSON export, columns of mixed types (a boundary)."""


def cdisc_domains(tl: PatientTimeline, subject_id: str, study_id: str = "LESIONTRACK") -> dict[str, list[SdtmRecord]]:
    """SDTM-style TU, TR and RS records (keys ``TU``, ``TR``, ``RS``)."""
    base: SdtmRecord = {"STUDYID": study_id, "USUBJID": subject_id}
    return {"TU": _tu_records(tl, base), "TR": _tr_records(tl, base), "RS": _rs_records(tl, base)}


def _tu_records(tl: PatientTimeline, base: SdtmRecord) -> list[SdtmRecord]:
    """TU: each lesion identified once, at its first timepoint."""
    tu: list[SdtmRecord] = []
    for row in tl.lesions:
        first = next((tp for tp in tl.timepoints if row.cells[tp.index] is not None), None)
        if first is None:
            continue
        res = _tu_result(row.role)
        tu.append(
            {
                **base,
                "DOMAIN": "TU",
                "TUSEQ": len(tu) + 1,
                "TULNKID": row.tracking_id,
                "TUREFID": row.tracking_uid,
                "TUTESTCD": "TUMIDENT",
                "TUTEST": "Tumor Identification",
                "TUORRES": res,
                "TUSTRESC": res,
                "TULOC": (row.anatomic_site or "").upper(),
                "TUMETHOD": METHOD,
                "TUEVAL": EVALUATOR,
                "VISITNUM": first.index + 1,
                "VISIT": _visit(first.index),
                "TUDTC": first.date_iso,
            }
        )
    return tu


def _tr_records(tl: PatientTimeline, base: SdtmRecord) -> list[SdtmRecord]:
    """TR: each lesion's state and sizes per timepoint, and the sum of diameters."""
    tr: list[SdtmRecord] = []
    for tp in tl.timepoints:
        visit: SdtmRecord = {"VISITNUM": tp.index + 1, "VISIT": _visit(tp.index)}
        for row in tl.lesions:
            c = row.cells[tp.index]
            if c is None:
                continue
            state = "ABSENT" if c.status == LesionStatus.VANISHED else "PRESENT"
            tests: list[tuple[str, str, str | float | None, str]] = [("TUMSTATE", "Tumor State", state, "")]
            if c.status != LesionStatus.VANISHED:
                tests += [
                    ("LDIAM", "Longest Diameter", c.long_axis_mm, "mm"),
                    ("SAXIS", "Short Axis", c.short_axis_mm, "mm"),
                    ("VOLUME", "Volume", c.volume_mm3, "mm3"),
                ]
            else:
                tests += [("LDIAM", "Longest Diameter", 0.0, "mm"), ("VOLUME", "Volume", 0.0, "mm3")]
            for code, name, value, unit in tests:
                if value is None:
                    continue
                numeric = isinstance(value, (int, float))
                tr.append(
                    {
                        **base,
                        "DOMAIN": "TR",
                        "TRSEQ": len(tr) + 1,
                        "TRLNKID": row.tracking_id,
                        "TRLNKGRP": f"V{tp.index + 1}",
                        "TRTESTCD": code,
                        "TRTEST": name,
                        "TRORRES": repr(float(value)) if numeric else value,
                        "TRORRESU": unit,
                        "TRSTRESC": repr(float(value)) if numeric else value,
                        "TRSTRESN": float(value) if numeric else None,
                        "TRSTRESU": unit,
                        "TRMETHOD": METHOD,
                        "TREVAL": READER_EVALUATOR if c.verified_by else EVALUATOR,  # a reader's adopted result
                        **visit,
                        "TRDTC": tp.date_iso,
                    }
                )
        if tp.sum_of_diameters_mm is not None:
            tr.append(
                {
                    **base,
                    "DOMAIN": "TR",
                    "TRSEQ": len(tr) + 1,
                    "TRLNKID": "",
                    "TRLNKGRP": f"V{tp.index + 1}",
                    "TRTESTCD": "SUMDIAM",
                    "TRTEST": "Sum of Diameter",
                    "TRORRES": repr(tp.sum_of_diameters_mm),
                    "TRORRESU": "mm",
                    "TRSTRESC": repr(tp.sum_of_diameters_mm),
                    "TRSTRESN": tp.sum_of_diameters_mm,
                    "TRSTRESU": "mm",
                    "TRMETHOD": METHOD,
                    "TREVAL": EVALUATOR,
                    **visit,
                    "TRDTC": tp.date_iso,
                }
            )
    return tr


def _rs_records(tl: PatientTimeline, base: SdtmRecord) -> list[SdtmRecord]:
    """RS: the RECIST responses per follow-up and the best overall response."""
    rs: list[SdtmRecord] = []
    for tp in tl.timepoints:
        if tp.index == 0:
            continue
        visit: SdtmRecord = {"VISITNUM": tp.index + 1, "VISIT": _visit(tp.index)}
        for code, name, value in [
            ("TRGRESP", "Target Response", tp.target_response),
            ("NTRGRESP", "Non-target Response", tp.non_target_response),
            ("NEWLIND", "New Lesion Indicator", NEWLIND.get(tp.new_lesion_state or "")),
            ("OVRLRESP", "Overall Response", tp.overall_response),
        ]:
            if value is None:
                continue
            rs.append(
                {
                    **base,
                    "DOMAIN": "RS",
                    "RSSEQ": len(rs) + 1,
                    "RSLNKGRP": f"V{tp.index + 1}",
                    "RSTESTCD": code,
                    "RSTEST": name,
                    "RSCAT": "RECIST 1.1",
                    "RSORRES": value,
                    "RSSTRESC": value,
                    "RSEVAL": EVALUATOR,
                    **visit,
                    "RSDTC": tp.date_iso,
                }
            )
    if tl.best_overall_response and len(tl.timepoints) > 1:
        last = tl.timepoints[-1]
        rs.append(
            {
                **base,
                "DOMAIN": "RS",
                "RSSEQ": len(rs) + 1,
                "RSLNKGRP": "",
                "RSTESTCD": "BESTRESP",
                "RSTEST": "Best Overall Response",
                "RSCAT": "RECIST 1.1",
                "RSORRES": tl.best_overall_response,
                "RSSTRESC": tl.best_overall_response,
                "RSEVAL": EVALUATOR,
                "VISITNUM": last.index + 1,
                "VISIT": _visit(last.index),
                "RSDTC": last.date_iso,
            }
        )
    return rs


def to_csv(rows: Sequence[Mapping[str, object]], columns: list[str]) -> str:
    """CSV text (header + rows); floats written with full precision (``repr``), None as empty."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {k: ("" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float) else r[k])) for k in columns}
        )
    return buf.getvalue()


def lesions_csv(tl: PatientTimeline, subject_id: str) -> str:
    return to_csv(lesion_rows(tl, subject_id), LESION_COLUMNS)


def lesions_json(tl: PatientTimeline, subject_id: str) -> str:
    return json.dumps(
        {
            "columns": LESION_COLUMNS,
            "rows": lesion_rows(tl, subject_id),
            "best_overall_response": tl.best_overall_response,
        },
        indent=1,
    )


def cdisc_csv(tl: PatientTimeline, subject_id: str, domain: str, study_id: str = "LESIONTRACK") -> str:
    domain = domain.upper()
    columns = {"TU": TU_COLUMNS, "TR": TR_COLUMNS, "RS": RS_COLUMNS}.get(domain)
    if columns is None:
        raise ValueError(f"unknown CDISC domain {domain!r} (TU, TR or RS)")
    return to_csv(cdisc_domains(tl, subject_id, study_id)[domain], columns)


def cdisc_json(tl: PatientTimeline, subject_id: str, study_id: str = "LESIONTRACK") -> str:
    return json.dumps(cdisc_domains(tl, subject_id, study_id), indent=1)
