"""`lesiontrack track` end to end on DICOM phantom series, and the prompts JSON parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import PromptKind
from lesiontrack.pipeline.dicom.prompt_sources import PromptSourceError, load_prompts_json
from tests.support.phantom import LESIONS, series


def _write(tmp: Path) -> list[Path]:
    tps = series(seed=5)
    dirs = []
    for i, tp in enumerate(tps):
        d = tmp / f"tp{i}"
        write_ct_series(
            tp.ct,
            d,
            CTSeriesHeader(
                patient_id="PHANTOM",
                patient_name="Phantom^Test",
                study_uid=f"1.2.826.0.1.3680043.8.498.1{i}",
                series_uid=f"1.2.826.0.1.3680043.8.498.2{i}",
                frame_of_reference_uid=f"1.2.826.0.1.3680043.8.498.3{i}",
                study_date=f"2024010{i + 1}",
            ),
        )
        dirs.append(d)
    np.save(tmp / "gt.npy", np.stack([tp.labels.array for tp in tps]))
    return dirs


def test_track_cli_writes_label_maps_tracking_json_and_dicom(tmp_path: Path) -> None:
    from lesiontrack.cli import app

    dirs = _write(tmp_path)
    prompts = {
        "coordinate_system": "LPS",
        "lesions": [
            {"label": 1, "tracking_id": "L1 lung", "anatomic_site": "Lung", "point": list(LESIONS[0].centre_mm)},
            {
                "label": 2,
                "tracking_id": "L2 liver",
                "anatomic_site": "Liver",
                "box": [list(np.array(LESIONS[1].centre_mm) - 13), list(np.array(LESIONS[1].centre_mm) + 13)],
            },
        ],
    }
    pj = tmp_path / "prompts.json"
    pj.write_text(json.dumps(prompts))
    out = tmp_path / "out"
    # follow-ups given out of time order: the command sorts by StudyDate
    res = CliRunner().invoke(
        app,
        [
            "track",
            "--baseline",
            str(dirs[0]),
            "--followup",
            str(dirs[2]),
            "--followup",
            str(dirs[1]),
            "--out",
            str(out),
            "--prompts",
            str(pj),
            "--registration",
            "none",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "tracking.json").read_text())
    assert [tp["study_date"] for tp in summary["timepoints"]] == ["20240101", "20240102", "20240103"]
    gt = np.load(tmp_path / "gt.npy")
    for t, tp in enumerate(summary["timepoints"]):
        lm = Volume.read(str(out / tp["label_map"]))
        assert lm.array.shape == gt[t].shape
        for n in (1, 2):
            a, b = lm.array == n, gt[t] == n
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.75, (t, n)
    assert [les["tracking_id"] for les in summary["lesions"]] == ["L1 lung", "L2 liver"]
    assert all(x["status"] == "present" for les in summary["lesions"] for x in les["timepoints"])
    assert "dicom_error" not in summary, summary.get("dicom_error")
    # every follow-up was prompted from the radiologist's baseline prompts, not from our previous result
    base_uid = summary["timepoints"][0]["series_uid"]
    for les in summary["lesions"]:
        assert les["timepoints"][0]["propagated_from"] is None
        for x in les["timepoints"][1:]:
            src = x["propagated_from"]
            assert src["series_uid"] == base_uid, src
            assert src["by_person"], src
            assert src["timepoint_index"] == 0, src
    assert summary["propagation"] == "annotation"
    for tp in summary["timepoints"][1:]:
        # the service's objects: SEG, TID 1500 SR and the OHIF measurements SR
        kinds = [pydicom.dcmread(out / f).Modality for f in tp["dicom"]]
        assert kinds == ["SEG", "SR", "SR"]
        assert tp["state"] == "done", tp
        assert tp["new_lesion_search"]["ran"], tp
        seg = pydicom.dcmread(out / tp["dicom"][0])
        uids = {s.TrackingUID for s in seg.SegmentSequence}
        candidates = {c["tracking_uid"] for c in tp["candidates"]}
        assert uids == {les["tracking_uid"] for les in summary["lesions"]} | candidates


def test_prompts_json_schema_and_errors(tmp_path: Path) -> None:
    grid = Volume(np.zeros((10, 20, 30), np.int16), origin=(-10.0, 5.0, 2.0), spacing=(2.0, 1.0, 3.0))
    f = tmp_path / "p.json"
    f.write_text(
        json.dumps(
            {
                "coordinate_system": "RAS",
                "lesions": [{"point": [10, 20, 30]}, {"label": 7, "points": [[1, 2, 3], [4, 5, 6]]}],
            }
        )
    )
    ps = load_prompts_json(f, series_uid="1.2.3")
    assert [p.identity.label for p in ps] == [1, 7]
    np.testing.assert_allclose(ps[0].points_mm, [[-10, -20, 30]])
    assert ps[0].identity.tracking_uid.startswith("2.25.")
    assert ps[0].identity.tracking_id == "L1"
    assert load_prompts_json(f, series_uid="1.2.3")[0].identity.tracking_uid == ps[0].identity.tracking_uid
    f.write_text(json.dumps({"coordinate_system": "voxel", "lesions": [{"box": [[1, 2, 3], [5, 6, 7]]}]}))
    box = load_prompts_json(f, grid)[0]
    assert box.kind is PromptKind.BOX
    np.testing.assert_allclose(box.box_mm[0], grid.index_to_patient(np.array([1, 2, 3.0])))
    f.write_text(json.dumps({"1": {"point": [3, 4, 5]}, "2": {"box": [1, 4, 2, 6, 3, 9]}}))  # LesionLocator style
    ll = load_prompts_json(f, grid)
    np.testing.assert_allclose(ll[0].points_mm, [grid.index_to_patient(np.array([5, 4, 3.0]))])
    for bad, msg in (
        ({"lesions": []}, "non-empty"),
        ({"lesions": [{"point": [1, 2]}]}, r"lesions\[0\]"),
        ({"lesions": [{"point": [1, 2, 3], "box": [[0, 0, 0], [1, 1, 1]]}]}, "exactly one"),
        ({"lesions": [{"label": 2, "point": [1, 2, 3]}, {"label": 2, "point": [1, 2, 3]}]}, "unique"),
        ({"coordinate_system": "XYZ", "lesions": [{"point": [1, 2, 3]}]}, "coordinate_system"),
    ):
        f.write_text(json.dumps(bad))
        with pytest.raises(PromptSourceError, match=msg):
            load_prompts_json(f, grid)
    f.write_text("{not json")
    with pytest.raises(PromptSourceError, match=r"p\.json"):
        load_prompts_json(f)


def test_track_cli_baseline_in_the_middle_follows_the_service_rules(tmp_path: Path) -> None:
    """As the service: a timepoint before the baseline has no prior to be propagated from (reported as nothing to
    track, with the reason), our own SEG is never the only prompt source, and a person's SEG on T1 prompts T2 (lesion
    identities kept: Tracking UIDs of the SEG)."""
    import shutil

    from pydicom.uid import generate_uid

    from lesiontrack.cli import app

    dirs = _write(tmp_path)
    pj = tmp_path / "prompts.json"
    pj.write_text(
        json.dumps(
            {
                "lesions": [
                    {"label": 1, "tracking_id": "L1 lung", "point": list(LESIONS[0].centre_mm)},
                    {"label": 3, "tracking_id": "L3 liver", "point": list(LESIONS[2].centre_mm)},
                ]
            }
        )
    )
    first = tmp_path / "first"
    res = CliRunner().invoke(
        app,
        [
            "track",
            "--baseline",
            str(dirs[0]),
            "--followup",
            str(dirs[1]),
            "--out",
            str(first),
            "--prompts",
            str(pj),
            "--registration",
            "none",
        ],
    )
    assert res.exit_code == 0, res.output
    s1 = json.loads((first / "tracking.json").read_text())
    seg_file = next(first / f for f in s1["timepoints"][1]["dicom"] if pydicom.dcmread(first / f).Modality == "SEG")

    def from_t1(annotation: pydicom.Dataset, name: str) -> dict:
        annotated = tmp_path / f"tp1_{name}"
        shutil.copytree(dirs[1], annotated)
        annotation.save_as(annotated / "seg.dcm", enforce_file_format=True)
        out = tmp_path / name
        args = ["track", "--baseline", str(annotated), "--followup", str(dirs[0]), "--followup", str(dirs[2])]
        res = CliRunner().invoke(app, [*args, "--out", str(out), "--registration", "none", "--no-dicom"])
        assert res.exit_code == 0, res.output
        return json.loads((out / "tracking.json").read_text()) | {"out": out}

    ours = from_t1(pydicom.dcmread(seg_file), "ours")
    assert ours["source_index"] == 1
    assert ours["lesions"] == []
    before, after = ours["timepoints"][0], ours["timepoints"][2]
    assert before["state"] == "nothing_to_track", before
    assert "no prior study" in before["reason"], before
    assert after["state"] == "nothing_to_track", after
    assert "results of LesionTrack" in after["reason"], after
    person = pydicom.dcmread(seg_file)  # the same segments, issued by a reader's workstation
    person.Manufacturer = "Reader Workstation"
    person.SeriesInstanceUID = generate_uid()
    person.SOPInstanceUID = person.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    s2 = from_t1(person, "person")
    assert s2["source_index"] == 1
    assert s2["timepoints"][2]["state"] == "done"
    assert s2["timepoints"][0]["state"] == "nothing_to_track"
    assert {les["tracking_uid"] for les in s2["lesions"]} == {les["tracking_uid"] for les in s1["lesions"]}
    gt = np.load(tmp_path / "gt.npy")
    by_uid = {les["tracking_uid"]: les for les in s1["lesions"]}
    for t in (1, 2):
        lm = Volume.read(str(s2["out"] / s2["timepoints"][t]["label_map"])).array
        for les in s2["lesions"]:
            n_gt = {"L1 lung": 1, "L3 liver": 3}[by_uid[les["tracking_uid"]]["tracking_id"]]
            a, b = lm == les["label"], gt[t] == n_gt
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.75, (t, les["tracking_id"])


def test_track_cli_confirmed_timepoint_is_the_nearest_source(tmp_path: Path) -> None:
    """--confirmed: a follow-up whose SEG a person verified is the propagation source of the timepoints after it
    (lesions keep their identities: matched by Tracking UID)."""
    import shutil

    from lesiontrack.cli import app

    dirs = _write(tmp_path)
    prompts = {
        "coordinate_system": "LPS",
        "lesions": [{"label": 1, "tracking_id": "L1 lung", "point": list(LESIONS[0].centre_mm)}],
    }
    pj = tmp_path / "prompts.json"
    pj.write_text(json.dumps(prompts))
    first = tmp_path / "first"
    args = ["track", "--baseline", str(dirs[0]), "--followup", str(dirs[1]), "--out", str(first)]
    res = CliRunner().invoke(app, [*args, "--prompts", str(pj), "--registration", "none"])
    assert res.exit_code == 0, res.output
    t1 = json.loads((first / "tracking.json").read_text())["timepoints"][1]
    seg = next(f for f in t1["dicom"] if pydicom.dcmread(first / f, stop_before_pixels=True).Modality == "SEG")
    verified = tmp_path / "tp1_verified"
    shutil.copytree(dirs[1], verified)
    shutil.copy(first / seg, verified / "verified_seg.dcm")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "track", "--baseline", str(dirs[0]), "--followup", str(verified), "--followup", str(dirs[2]),
            "--confirmed", str(verified), "--out", str(out), "--prompts", str(pj), "--registration", "none",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "tracking.json").read_text())
    assert summary["confirmed_indices"] == [1]
    (lesion,) = summary["lesions"]
    last = lesion["timepoints"][2]
    assert last["status"] == "present", last
    assert last["propagated_from"]["timepoint_index"] == 1, last
    bad = CliRunner().invoke(app, [*args, "--prompts", str(pj), "--confirmed", str(dirs[2]), "--out", str(out)])
    assert bad.exit_code == 2
    assert "not one of the --followup folders" in " ".join(bad.output.split())
