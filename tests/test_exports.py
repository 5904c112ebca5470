"""Read-centre exports: every CSV/CDISC value equals the measurement in the TID 1500 SR written for the same lesion
and timepoint (SR read back with highdicom), and JSON carries the same rows as CSV."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import cast

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.pipeline.views import exports
from lesiontrack.pipeline.views.history import build_timeline
from tests.support.patient import synthetic_patient


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("exports")
    url = f"sqlite:///{tmp / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    built = synthetic_patient(sf, tmp, with_failed_job=False)
    with session_scope(sf) as s:
        tl = build_timeline(s, built.patient_pk)
    return built, tl, url


def _num(group, concept) -> float | None:
    """The NUM's value; a volume in ml (our SRs since issue 29) as mm3, as the exports state it."""
    found = group.get_measurements(name=concept)
    if not found:
        return None
    scale = 1000.0 if found[0].unit.value in ("ml", "mL") else 1.0
    return float(found[0].value) * scale


def _sr_values(sr_path: Path) -> tuple[dict[str, dict[str, float | str | None]], dict[str, str]]:
    """Per tracking UID: volume, long/short axis and status from the SR; plus the RECIST 1.1 response items."""
    ds = hd.sr.srread(str(sr_path))
    report = cast(hd.sr.MeasurementReport, ds.content)  # highdicom types .content as a plain ContentSequence
    status_name = hd.sr.CodedConcept("LT001", "99LTRK", "Lesion status")
    out: dict[str, dict[str, float | str | None]] = {}
    groups = [
        *report.get_volumetric_roi_measurement_groups(),
        *report.get_planar_roi_measurement_groups(),
        *report.get_image_measurement_groups(),
    ]
    for g in groups:
        d = out.setdefault(g.tracking_uid, {})
        for key, concept in (
            ("volume_mm3", codes.SCT.Volume),
            ("long_axis_mm", codes.SCT.LongAxis),
            ("short_axis_mm", codes.SCT.ShortAxis),
        ):
            v = _num(g, concept)
            if v is not None:
                d[key] = v
        for q in g.get_qualitative_evaluations(name=status_name):
            d["status"] = q.value.meaning.lower()
    # TID 1500 row 12 "Qualitative Evaluations" container: RECIST 1.1 response of the time point
    recist: dict[str, str] = {}
    for item in ds.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations":
            for sub in item.ContentSequence:
                name = sub.ConceptNameCodeSequence[0].CodeMeaning
                if sub.ValueType == "CODE" and name == "Current Response":
                    recist["overall_response"] = sub.ConceptCodeSequence[0].CodeValue
                elif sub.ValueType == "NUM" and name == "Sum of diameters":
                    recist["sum_of_diameters_mm"] = sub.MeasuredValueSequence[0].NumericValue
    return out, recist


def test_csv_values_equal_the_sr_measurements(exported) -> None:
    built, tl, _ = exported
    rows = list(csv.DictReader(io.StringIO(exports.lesions_csv(tl, built.patient_id))))
    assert rows
    assert list(rows[0]) == exports.LESION_COLUMNS
    checked = 0
    for tp in built.timepoints:
        sr, recist = _sr_values(tp.sr_path)
        tp_rows = [r for r in rows if r["series_instance_uid"] == tp.series_uid]
        assert {r["tracking_uid"] for r in tp_rows} == set(sr), f"lesions of timepoint {tp.index} differ from SR"
        for r in tp_rows:
            want = sr[r["tracking_uid"]]
            assert r["study_date"] == f"{tp.study_date[:4]}-{tp.study_date[4:6]}-{tp.study_date[6:]}"
            assert float(r["volume_mm3"]) == pytest.approx(want["volume_mm3"], rel=1e-9, abs=1e-9)
            if r["status"] == "vanished":
                assert want.get("status") == "vanished"
                assert float(r["volume_mm3"]) == 0.0
            else:
                assert float(r["long_axis_mm"]) == pytest.approx(want["long_axis_mm"], rel=1e-9)
                assert float(r["short_axis_mm"]) == pytest.approx(want["short_axis_mm"], rel=1e-9)
            checked += 1
            if tp.index > 0:
                assert r["overall_response"] == recist["overall_response"]
                assert float(r["sum_of_diameters_mm"]) == pytest.approx(float(recist["sum_of_diameters_mm"]))
    assert checked == sum(len(tp.measurements) for tp in built.timepoints)


def test_cdisc_tr_equals_the_sr_and_tu_rs_are_complete(exported) -> None:
    built, tl, _ = exported
    dom = exports.cdisc_domains(tl, built.patient_id)
    uid_of = {r.tracking_id: r.tracking_uid for r in tl.lesions}
    for tp in built.timepoints:
        sr, recist = _sr_values(tp.sr_path)
        for rec in dom["TR"]:
            if rec["VISITNUM"] != tp.index + 1 or rec["TRTESTCD"] not in ("LDIAM", "VOLUME", "SAXIS"):
                continue
            key = {"LDIAM": "long_axis_mm", "VOLUME": "volume_mm3", "SAXIS": "short_axis_mm"}[rec["TRTESTCD"]]
            assert rec["TRSTRESN"] == pytest.approx(sr[uid_of[rec["TRLNKID"]]][key], rel=1e-9, abs=1e-9)
        if tp.index > 0:
            ovr = [r for r in dom["RS"] if r["VISITNUM"] == tp.index + 1 and r["RSTESTCD"] == "OVRLRESP"]
            assert ovr
            assert ovr[0]["RSORRES"] == recist["overall_response"]
    assert {r["TULNKID"] for r in dom["TU"]} == {r.tracking_id for r in tl.lesions}
    assert {r["TUREFID"] for r in dom["TU"]} == set(built.lesion_ids)
    assert all(r["TUORRES"] in {"TARGET", "NON-TARGET", "NEW"} for r in dom["TU"])
    new = [r for r in dom["TU"] if r["TUORRES"] == "NEW"]
    assert new
    assert all(isinstance(r["VISITNUM"], int) and r["VISITNUM"] > 1 for r in new)
    assert any(r["RSTESTCD"] == "BESTRESP" for r in dom["RS"])
    for name, cols in (("TU", exports.TU_COLUMNS), ("TR", exports.TR_COLUMNS), ("RS", exports.RS_COLUMNS)):
        parsed = list(csv.DictReader(io.StringIO(exports.cdisc_csv(tl, built.patient_id, name))))
        assert len(parsed) == len(dom[name])
        assert list(parsed[0]) == cols
    with pytest.raises(ValueError, match="unknown CDISC domain"):
        exports.cdisc_csv(tl, built.patient_id, "XX")


def test_json_has_the_same_rows_as_csv(exported) -> None:
    built, tl, _ = exported
    rows = list(csv.DictReader(io.StringIO(exports.lesions_csv(tl, built.patient_id))))
    js = json.loads(exports.lesions_json(tl, built.patient_id))
    assert js["columns"] == exports.LESION_COLUMNS
    assert len(js["rows"]) == len(rows)
    for c, j in zip(rows, js["rows"], strict=True):
        for k in exports.LESION_COLUMNS:
            v = j[k]
            if isinstance(v, float):
                assert float(c[k]) == v, k
            else:
                assert c[k] == ("" if v is None else str(v)), k
    assert json.loads(exports.cdisc_json(tl, built.patient_id)) == json.loads(
        json.dumps(exports.cdisc_domains(tl, built.patient_id))
    )


def test_export_command(exported, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lesiontrack.cli import app

    built, tl, url = exported
    env = {"LESIONTRACK_DATABASE_URL": url, "LESIONTRACK_CONFIG": ""}
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--patient", str(built.patient_pk), "--format", "csv"], env=env)
    assert r.exit_code == 0, r.output
    assert r.stdout == exports.lesions_csv(tl, built.patient_id)
    out = tmp_path / "rs.csv"
    r = runner.invoke(app, ["export", "--patient", str(built.patient_pk), "--format", "rs", "--out", str(out)], env=env)
    assert r.exit_code == 0
    assert out.read_text() == exports.cdisc_csv(tl, built.patient_id, "RS")
    assert runner.invoke(app, ["export", "--patient", "999", "--format", "csv"], env=env).exit_code == 1
    assert runner.invoke(app, ["export", "--patient", "1", "--format", "xls"], env=env).exit_code == 2
    r = runner.invoke(app, ["export", "--list"], env=env)
    assert r.exit_code == 0
    assert f"{built.patient_pk}\t" in r.stdout
