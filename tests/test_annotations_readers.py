"""Priors as radiologists leave them (issue 31): GSPS and RTSTRUCT objects we write pass dciodvfy and load in dcmtk's
readers; the GSPS, RTSTRUCT and SR readers give lesions with their drawings and labels; an annotation that cannot
become a lesion is a warning naming object and annotation; precedence when a study holds several objects; and
``lesiontrack track`` tracks from a GSPS or RTSTRUCT baseline."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.models.imaging.dicom_write import CTSeriesHeader, write_ct_series
from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.pipeline.dicom.annotations.common import SourcedPrompts, merge_by_precedence
from lesiontrack.pipeline.dicom.annotations.gsps import read_gsps_prompts
from lesiontrack.pipeline.dicom.annotations.rtstruct import read_rtstruct_prompts
from lesiontrack.pipeline.dicom.prompt_sources import PromptSourceError, prompts_from_directory, prompts_from_object
from lesiontrack.pipeline.dicom.validate import run_dciodvfy
from lesiontrack.synthetic.annotations import Mark, write_gsps, write_rtstruct
from tests.support.tools import require_tool

NODULES = [((10.0, 0.0, 40.0), 7.0), ((-15.0, 12.0, 40.0), 6.0), ((12.0, -18.0, 25.0), 5.0)]


def _annotated_header(study_date: str) -> CTSeriesHeader:
    """A new CT study and series of the annotated test patient on ``study_date``."""
    return CTSeriesHeader(
        patient_id="ANN1",
        patient_name="Annotated^Patient",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        study_date=study_date,
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Volume, list[pydicom.Dataset]]:
    """A small chest-like CT on 5 mm slices: soft tissue with lung (-850 HU) holding three nodules."""
    root = tmp_path_factory.mktemp("ann")
    rng = np.random.default_rng(0)
    nk, nj, ni = 16, 64, 64
    sp = np.array([1.0, 1.0, 5.0])
    origin = np.array([-32.0, -32.0, 0.0])
    k, j, i = np.meshgrid(*(np.arange(n) for n in (nk, nj, ni)), indexing="ij")
    pts = np.stack([origin[0] + i * sp[0], origin[1] + j * sp[1], origin[2] + k * sp[2]], -1)
    hu = np.full((nk, nj, ni), -1000.0)  # air around the body
    hu[np.hypot(pts[..., 0], pts[..., 1]) <= 31] = 40.0
    hu[np.hypot(pts[..., 0], pts[..., 1]) <= 28] = -850.0
    for c, r in NODULES:
        hu[np.linalg.norm(pts - np.array(c), axis=-1) <= r] = 30.0
    hu += rng.normal(0, 10.0, hu.shape)
    ct_dir = root / "ct"
    write_ct_series(
        Volume(np.rint(hu).astype(np.int16), origin, sp),
        ct_dir,
        _annotated_header("20260101"),
    )
    files = sorted(ct_dir.glob("*.dcm"))
    ct = read_series(files)
    heads: list[pydicom.Dataset] = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return root, ct, heads


def _z(ct: Volume, z: float) -> float:
    k = round(float(ct.patient_to_index(np.array([0.0, 0.0, z]))[2]))
    return float(ct.index_to_patient(np.array([0.0, 0.0, k]))[2])


def _marks(ct: Volume) -> list[Mark]:
    (c1, r1), (c2, r2), (c3, _r3) = NODULES
    z1, z3 = _z(ct, c1[2]), _z(ct, c3[2])
    line = Drawing(DrawingKind.LINE, [np.array([[c1[0] - r1, c1[1], z1], [c1[0] + r1, c1[1], z1]])])
    bidi = Drawing(
        DrawingKind.BIDIRECTIONAL,
        [
            np.array([[c2[0] - r2, c2[1], z1], [c2[0] + r2, c2[1], z1]]),
            np.array([[c2[0], c2[1] - r2 + 1, z1], [c2[0], c2[1] + r2 - 1, z1]]),
        ],
    )
    arrow = Drawing(DrawingKind.ARROW, [np.array([[c3[0] + 2, c3[1], z3], [c3[0] + 14, c3[1] + 6, z3]])])
    return [Mark(line, "L1"), Mark(bidi, "Target 2 12.1 mm"), Mark(arrow, "liver met")]


def _dcmtk(*cmd: str) -> subprocess.CompletedProcess[str]:
    require_tool(cmd[0])
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


def test_gsps_we_write_validates_and_reads_back(study: tuple[Path, Volume, list[pydicom.Dataset]]) -> None:
    root, ct, heads = study
    (c1, _), _, _ = NODULES
    z1 = _z(ct, c1[2])
    ellipse = Drawing(DrawingKind.ELLIPSE, [np.array([[-30, 25, z1], [-24, 25, z1], [-27, 23, z1], [-27, 27, z1]])])
    extra = [
        Mark(ellipse, "air pocket"),  # outside the body: warned, not a lesion
        Mark(Drawing(DrawingKind.POINT, [np.array([[c1[0], c1[1], z1]])]), "L1"),  # label used twice
    ]
    path = write_gsps(heads, [*_marks(ct), *extra], root / "pr" / "gsps.dcm")
    rep = run_dciodvfy(path)
    assert rep.ok, rep.summary()
    assert _dcmtk("dcmpschk", str(path)).returncode == 0  # dcmtk's presentation state checker loads it
    image = next(f for f in sorted((root / "ct").glob("*.dcm")))
    out = root / "rendered.pgm"
    shown = _dcmtk("dcmp2pgm", "-p", str(path), str(image), str(out))
    assert shown.returncode == 0, shown.stderr
    assert out.stat().st_size > 0, shown.stderr

    res = read_gsps_prompts(path, ct)
    by_name = {p.identity.tracking_id: p for p in res.prompts}
    assert set(by_name) == {"L1", "Target 2", "liver met"}
    kinds = {n: p.meta["drawing"].kind for n, p in by_name.items()}
    assert kinds == {"L1": DrawingKind.LINE, "Target 2": DrawingKind.BIDIRECTIONAL, "liver met": DrawingKind.ARROW}
    tip = by_name["liver met"].meta["drawing"].parts[0][0]
    assert np.linalg.norm(tip[:2] - np.array(NODULES[2][0][:2]) - [2, 0]) < 1.0  # the arrow head marks the tip
    line = by_name["L1"].meta["drawing"].parts[0]
    assert np.allclose(sorted(line[:, 0]), [c1[0] - 7, c1[0] + 7], atol=0.01)  # corner-based pixels → mm exactly
    said = [str(w) for w in res.warnings]
    assert any("outside the body" in w and "gsps.dcm" in w for w in said), said
    assert any("label 'L1' already names" in w for w in said), said
    # the same label on another object of the patient is the same lesion
    again = read_gsps_prompts(write_gsps(heads, _marks(ct)[:1], root / "pr2" / "later.dcm"), ct)
    assert again.prompts[0].identity.tracking_uid == by_name["L1"].identity.tracking_uid


def test_gsps_annotations_that_cannot_become_lesions_are_named(
    study: tuple[Path, Volume, list[pydicom.Dataset]],
) -> None:
    import highdicom as hd

    root, ct, heads = study
    other = pydicom.dcmread(sorted((root / "ct").glob("*.dcm"))[3], stop_before_pixels=True)
    other.SOPInstanceUID = generate_uid()  # an image of another series
    layer = hd.pr.GraphicLayer(layer_name="L", order=1)
    ann = [
        hd.pr.GraphicAnnotation(
            referenced_images=[other],
            graphic_layer=layer,
            graphic_objects=[hd.pr.GraphicObject("POLYLINE", np.array([[10, 10], [20, 20]], np.float32), "PIXEL")],
        ),
        hd.pr.GraphicAnnotation(
            referenced_images=[heads[5]],
            graphic_layer=layer,
            graphic_objects=[
                hd.pr.GraphicObject("POLYLINE", np.array([[0.1, 0.1], [0.3, 0.3]], np.float32), "DISPLAY"),
                hd.pr.GraphicObject("POLYLINE", np.array([[30, 30], [34, 30], [34, 36]], np.float32), "PIXEL"),
            ],
        ),
    ]
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[heads[5], other],
        series_instance_uid=generate_uid(),
        series_number=9,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="W",
        manufacturer_model_name="W",
        software_versions="1",
        device_serial_number="1",
        content_label="BAD",
        graphic_annotations=ann,
        graphic_layers=[layer],
    )
    path = root / "bad.dcm"
    pr.save_as(path, enforce_file_format=True)
    res = read_gsps_prompts(path, ct)
    assert res.prompts == []
    said = [str(w) for w in res.warnings]
    assert any("is not in the CT series" in w and "bad.dcm" in w and "annotation 1" in w for w in said), said
    assert any("DISPLAY units" in w and "graphic 1 (POLYLINE)" in w for w in said), said
    assert any("open polyline of 3 points" in w for w in said), said


def test_rtstruct_we_write_validates_and_reads_back(study: tuple[Path, Volume, list[pydicom.Dataset]]) -> None:
    root, ct, heads = study
    (c1, r1), (c2, r2), (c3, _) = NODULES
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    stack = []
    for k in range(ct.shape[0]):
        z = float(ct.index_to_patient(np.array([0.0, 0.0, k]))[2])
        r = np.sqrt(max(r1**2 - (z - c1[2]) ** 2, 0.0))
        if r >= 1.0:
            stack.append(np.stack([c1[0] + r * np.cos(t), c1[1] + r * np.sin(t), np.full_like(t, z)], -1))
    z1 = _z(ct, c2[2])
    one = [np.stack([c2[0] + r2 * np.cos(t), c2[1] + r2 * np.sin(t), np.full_like(t, z1)], -1)]
    path = write_rtstruct(
        heads,
        [("L1", stack), ("Target 2", one), ("marker", [np.array([[c3[0], c3[1], _z(ct, c3[2])]])])],
        root / "rs.dcm",
    )
    rep = run_dciodvfy(path)
    assert rep.ok, rep.summary()
    dump = _dcmtk("drtdump", str(path))  # dcmtk's RT reader loads it
    assert dump.returncode == 0, dump.stderr
    assert "RT Structure Set" in dump.stdout, dump.stderr
    res = read_rtstruct_prompts(path, ct)
    by = {p.identity.tracking_id: p for p in res.prompts}
    assert by["L1"].kind is PromptKind.MASK
    assert by["L1"].meta["prompt_origin"] == "contours"
    assert np.count_nonzero(by["L1"].mask.array.any(axis=(1, 2))) == len(stack)
    assert by["Target 2"].meta["drawing"].kind is DrawingKind.CONTOUR
    assert by["marker"].meta["drawing"].kind is DrawingKind.POINT
    assert res.warnings == []
    # read as a prompt source, every lesion names the object it came from (issue 31 B, issue 29 item 6)
    assert {p.meta["prompt_object"] for p in prompts_from_object(path, "RTSTRUCT", ct)} == {"RTSTRUCT"}


def test_rtstruct_non_lesion_rois_are_warned(study: tuple[Path, Volume, list[pydicom.Dataset]]) -> None:
    root, ct, heads = study
    body = [np.array([[-30, -30, 20.0], [30, -30, 20.0], [30, 30, 20.0], [-30, 30, 20.0]])]
    path = write_rtstruct(heads, [("BODY", body)], root / "body.dcm", interpreted_type="EXTERNAL")
    res = read_rtstruct_prompts(path, ct)
    assert res.prompts == []
    assert "interpreted type EXTERNAL: not a lesion" in str(res.warnings[0])
    assert "body.dcm" in str(res.warnings[0])
    assert "'BODY'" in str(res.warnings[0])


def test_pydicom_sample_rtstruct_without_preamble() -> None:
    from pydicom.data import get_testdata_file

    sample = get_testdata_file("rtstruct.dcm")
    assert sample is not None
    ct = Volume(np.zeros((5, 8, 8), np.int16), np.array([-200.0, -200.0, -20.0]), np.array([50.0, 50.0, 5.0]))
    res = read_rtstruct_prompts(sample, ct)
    said = " | ".join(str(w) for w in res.warnings)
    assert "'patient'" in said
    assert "EXTERNAL" in said


def _seg_prompt(uid: str, label: str, centre: np.ndarray, ct: Volume) -> Prompt:
    m = np.zeros(ct.shape, np.uint8)
    ijk = np.rint(ct.patient_to_index(centre)).astype(int)
    m[ijk[2], ijk[1] - 2 : ijk[1] + 3, ijk[0] - 2 : ijk[0] + 3] = 1
    return Prompt(LesionIdentity(uid, label, 1), PromptKind.MASK, mask=ct.with_array(m), meta={"segment_label": label})


def test_precedence_seg_over_contours_over_lines_and_newer_over_older(
    study: tuple[Path, Volume, list[pydicom.Dataset]],
) -> None:
    _, ct, _ = study
    c = np.array(NODULES[0][0])
    half = np.array([6.0, 0.0, 0.0])
    line = Drawing(DrawingKind.LINE, [np.array([c - half, c + half])])
    from lesiontrack.pipeline.dicom.annotations.common import drawing_prompt

    def lined(uid: str, label: str, at: np.ndarray) -> Prompt:
        d = Drawing(DrawingKind.LINE, [line.parts[0] - c + at])
        return drawing_prompt(LesionIdentity(uid, label, 1), d, "x", segment_label=label)

    other = np.array(NODULES[1][0])
    seg = SourcedPrompts("SEG", "20260101", [_seg_prompt("1.1", "L1", c, ct)], "SEG a")
    old_pr = SourcedPrompts("PR", "20260101", [lined("2.1", "L1", c), lined("2.2", "L2", other)], "PR old")
    new_pr = SourcedPrompts("PR", "20260301", [lined("3.2", "L2", other + np.array([1.0, 0.0, 0.0]))], "PR new")
    merged, warnings = merge_by_precedence([old_pr, new_pr, seg])
    assert [(p.identity.tracking_id, p.kind) for p in merged] == [("L1", PromptKind.MASK), ("L2", PromptKind.BOX)]
    assert merged[1].identity.tracking_uid == "3.2"  # the later annotation of the same lesion wins
    assert [p.identity.label for p in merged] == [1, 2]
    assert any("SEG a" in str(w) and "higher-ranked" in str(w) for w in warnings)
    assert any("PR new" in str(w) and "newer" in str(w) for w in warnings)


def test_directory_reads_gsps_and_rtstruct_and_names_them_when_unusable(
    study: tuple[Path, Volume, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    root, ct, heads = study
    folder = tmp_path / "prior"
    shutil.copytree(root / "ct", folder)
    write_gsps(heads, _marks(ct), folder / "gsps.dcm")
    (c1, _), _, _ = NODULES
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    stack = [
        np.stack([c1[0] + r * np.cos(t), c1[1] + r * np.sin(t), np.full_like(t, z)], -1)
        for z, r in ((35.0, 4.0), (40.0, 7.0), (45.0, 4.0))
    ]
    write_rtstruct(heads, [("L1", stack)], folder / "rs.dcm")
    warnings: list[object] = []
    prompts = prompts_from_directory(folder, ct, warnings=warnings)
    names = {p.identity.tracking_id: p for p in prompts}
    assert set(names) == {"L1", "Target 2", "liver met"}
    assert names["L1"].kind is PromptKind.MASK  # the contours beat the line on the same lesion
    assert any("takes precedence" in str(w) for w in warnings)

    empty = tmp_path / "unusable"
    shutil.copytree(root / "ct", empty)
    body = [np.array([[-30, -30, 20.0], [30, -30, 20.0], [30, 30, 20.0], [-30, 30, 20.0]])]
    write_rtstruct(heads, [("BODY", body)], empty / "body_rs.dcm", interpreted_type="EXTERNAL")
    with pytest.raises(PromptSourceError, match=r"body_rs\.dcm") as err:
        prompts_from_directory(empty, ct)
    assert "EXTERNAL" in str(err.value)


def test_track_cli_from_a_gsps_baseline(
    study: tuple[Path, Volume, list[pydicom.Dataset]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from lesiontrack.cli import app

    root, ct, heads = study
    base = tmp_path / "base"
    shutil.copytree(root / "ct", base)
    write_gsps(heads, _marks(ct), base / "gsps.dcm")
    fu = tmp_path / "fu"
    files = write_ct_series(
        ct,
        fu,
        _annotated_header("20260301"),
    )
    assert files
    out = tmp_path / "out"
    # `track` runs the service's steps, routing rules included: this small test CT has 16 slices
    monkeypatch.setenv("LESIONTRACK_ROUTING__MIN_SLICES", "8")
    res = CliRunner().invoke(
        app,
        ["track", "--baseline", str(base), "--followup", str(fu), "--out", str(out), "--registration", "none"],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "tracking.json").read_text())
    origins = {les["tracking_id"]: les["prompt_origin"] for les in summary["lesions"]}
    assert origins == {"L1": "line", "Target 2": "bidirectional", "liver met": "arrow"}
    assert {les["prompt_object"] for les in summary["lesions"]} == {"GSPS"}  # the object, named as it is
    for les in summary["lesions"]:
        assert les["weak_prior"] is True
        assert all(x["status"] == "present" for x in les["timepoints"]), les
        base_tp = les["timepoints"][0]
        assert base_tp["volume_mm3"] > 0
        fu_tp = les["timepoints"][1]
        # a prior from a drawing lowers the confidence until a person confirms it; a reason is recorded exactly
        # when it flags the lesion (issue 29), and then the weak prior is among the reasons
        assert fu_tp["confidence"] is None or fu_tp["confidence"] < 1.0
        if fu_tp["review_reasons"]:
            assert any("not yet confirmed" in r for r in fu_tp["review_reasons"])
        if les["prompt_origin"] == "arrow":  # an arrow's prior (confidence 0.45) is always flagged
            assert any("not yet confirmed" in r for r in fu_tp["review_reasons"])
    # the SR says where each lesion's prior came from, and passes the validators
    from lesiontrack.pipeline.dicom.sr.reader import read_sr
    from lesiontrack.pipeline.dicom.validate import run_sr_validator

    sr_file = next(out / f for f in summary["timepoints"][1]["dicom"] if pydicom.dcmread(out / f).Modality == "SR")
    key = "Prior annotation the lesion was tracked from"
    said = {g.tracking_id: g.qualitative[key][2] for g in read_sr(sr_file).groups if key in g.qualitative}
    assert said == {
        "L1": "Single diameter on one image",
        "Target 2": "Bidirectional diameters on one image",
        "liver met": "Arrow on one image",
    }, said
    objects = "Object the lesion's prompt was read from"
    said_objects = {
        g.tracking_id: g.qualitative[objects][2] for g in read_sr(sr_file).groups if objects in g.qualitative
    }
    assert said_objects == dict.fromkeys(said, "Presentation state (GSPS)"), said_objects
    assert run_dciodvfy(sr_file).ok
    reports = run_sr_validator([sr_file])
    assert all(r.ok for r in reports), [r.summary() for r in reports]
    # the line lesion reaches through several 5 mm slices, not one
    lm = Volume.read(str(out / summary["timepoints"][0]["label_map"]))
    assert np.count_nonzero((lm.array == 1).any(axis=(1, 2))) >= 3


def test_sr_drawings_as_ohif_and_other_viewers_write_them(
    study: tuple[Path, Volume, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    """OHIF's ArrowAnnotate (NUM DCM 111010 › 2-point POLYLINE, tip first), cornerstoneTools 4's value-less "Center"
    NUM › POINT, an EllipticalROI, a CircleROI, a closed PlanarFreehandROI, a Length and SCOORD3D points: each
    becomes its drawing; the label (TEXT Comment) names the lesion."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from lesiontrack.pipeline.dicom.sr.reader import read_sr_prompts

    _root, ct, heads = study
    (c1, _), (c2, _), (c3, _) = NODULES
    img1 = min(heads, key=lambda h: abs(float(h.ImagePositionPatient[2]) - _z(ct, c1[2])))
    img3 = min(heads, key=lambda h: abs(float(h.ImagePositionPatient[2]) - _z(ct, c3[2])))

    def px(img: pydicom.Dataset, pts: list[tuple[float, float]]) -> np.ndarray:
        from lesiontrack.synthetic.annotations import to_pixels

        z = float(img.ImagePositionPatient[2])
        return to_pixels(np.array([[x, y, z] for x, y in pts]), img).astype(np.float32)

    def src(img: pydicom.Dataset) -> hd.sr.SourceImageForRegion:
        return hd.sr.SourceImageForRegion(img.SOPClassUID, img.SOPInstanceUID)

    arrow_code = hd.sr.CodedConcept("111010", "DCM", "Center")

    def group(tool: str, label: str, measurement: hd.sr.Measurement) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        tid = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Cornerstone3DTools@^0.1.0:{tool}")
        g = hd.sr.MeasurementsAndQualitativeEvaluations(tracking_identifier=tid, measurements=[measurement])
        g[0].ContentSequence.append(hd.sr.TextContentItem(codes.DCM.Comment, label, "CONTAINS"))
        return g

    def num(name: object, value: float, coords: hd.sr.CoordinatesForMeasurement) -> hd.sr.Measurement:
        return hd.sr.Measurement(name, value, codes.UCUM.Millimeter, referenced_coordinates=[coords])

    tip = (c3[0] + 2, c3[1])
    groups = [
        group(
            "ArrowAnnotate",
            "arrowed",
            num(
                arrow_code,
                0.0,
                hd.sr.CoordinatesForMeasurement("POLYLINE", px(img3, [tip, (c3[0] + 15, c3[1] + 8)]), src(img3)),
            ),
        ),
        group(
            "EllipticalROI",
            "ellipsed",
            num(
                codes.SCT.Area,
                100.0,
                hd.sr.CoordinatesForMeasurement(
                    "ELLIPSE",
                    px(img1, [(c2[0] - 7, c2[1]), (c2[0] + 7, c2[1]), (c2[0], c2[1] - 6), (c2[0], c2[1] + 6)]),
                    src(img1),
                ),
            ),
        ),
        group(
            "CircleROI",
            "circled",
            num(
                codes.SCT.Area,
                150.0,
                hd.sr.CoordinatesForMeasurement("CIRCLE", px(img1, [(c1[0], c1[1]), (c1[0] + 8, c1[1])]), src(img1)),
            ),
        ),
    ]
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    ring = [(c1[0] + 7 * np.cos(a), c1[1] + 7 * np.sin(a)) for a in t]
    groups.append(
        group(
            "PlanarFreehandROI",
            "outlined",
            num(
                codes.SCT.Area,
                150.0,
                hd.sr.CoordinatesForMeasurement("POLYLINE", px(img1, [*ring, ring[0]]), src(img1)),
            ),
        )
    )
    groups.append(
        group(
            "Length",
            "lengthed",
            num(
                codes.SCT.Length,
                14.0,
                hd.sr.CoordinatesForMeasurement(
                    "POLYLINE", px(img1, [(c2[0] - 6, c2[1]), (c2[0] + 6, c2[1])]), src(img1)
                ),
            ),
        )
    )
    observer = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Reader^One"),
        )
    )
    report = hd.sr.MeasurementReport(observer, codes.LN.CTUnspecifiedBodyRegion, groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=heads,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="OHIF",
    )
    # cornerstoneTools 4: the arrow's NUM "Center" without a value, holding a 1-point POINT
    measurements = next(c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "126010")
    arrow_group = next(
        g
        for g in measurements.ContentSequence
        if any("ArrowAnnotate" in str(c.get("TextValue", "")) for c in g.ContentSequence)
    )
    legacy = next(c for c in arrow_group.ContentSequence if c.ValueType == "NUM")
    del legacy.MeasuredValueSequence
    path = tmp_path / "ohif.dcm"
    sr.save_as(path, enforce_file_format=True)
    warnings: list[object] = []
    prompts = read_sr_prompts(path, ct, warnings=warnings)
    # a label that is not ID-like ("L2", "N1") describes the lesion (pipeline.dicom.sr.reader.name_from_label) and is
    # its
    # label for matching
    kinds = {p.meta["segment_label"]: p.meta["drawing"].kind for p in prompts}
    assert kinds == {
        "arrowed": DrawingKind.ARROW,
        "ellipsed": DrawingKind.ELLIPSE,
        "circled": DrawingKind.ELLIPSE,
        "outlined": DrawingKind.CONTOUR,
        "lengthed": DrawingKind.LINE,
    }, (kinds, warnings)
    arrow = next(p for p in prompts if p.meta["segment_label"] == "arrowed").meta["drawing"]
    assert np.allclose(arrow.parts[0][0][:2], tip, atol=0.01)  # OHIF writes the tip first
    circled = next(p for p in prompts if p.meta["segment_label"] == "circled").meta["drawing"]
    assert circled.diameters_mm()[0] == pytest.approx(16.0, abs=0.01)


def test_service_load_step_says_why_a_prior_gives_nothing_to_track(
    study: tuple[Path, Volume, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    from lesiontrack.pipeline.jobs.ports import PriorAnnotation, PriorTimepoint
    from lesiontrack.pipeline.jobs.steps.volumes import read_prompts
    from lesiontrack.pipeline.jobs.store import NothingToTrack, PermanentError

    _root, ct, heads = study
    body = [np.array([[-30, -30, 20.0], [30, -30, 20.0], [30, 30, 20.0], [-30, 30, 20.0]])]
    path = write_rtstruct(heads, [("BODY", body)], tmp_path / "body.dcm", interpreted_type="EXTERNAL")
    ann = PriorAnnotation("1.2.3", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", [path])
    prior = PriorTimepoint("1.2", "20260101", None, "1.2.4", [], [ann])
    said: list[str] = []
    with pytest.raises(NothingToTrack, match=r"RTSTRUCT 1\.2\.3 gives no lesion") as err:
        read_prompts(prior, ct, said)
    assert "EXTERNAL" in str(err.value)
    assert any("body.dcm" in w for w in said)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(path.read_bytes()[:400])
    ann.files = [broken]
    with pytest.raises(PermanentError, match="broken"):
        read_prompts(prior, ct, said)


def test_job_page_says_where_each_prompt_came_from() -> None:
    from types import SimpleNamespace

    from lesiontrack.web.dashboard import templates

    job = SimpleNamespace(
        step_outputs={
            "load_volumes": {
                "lesions": [{"tracking_id": "L1", "kind": "box", "prompt_origin": "line", "prompt_object": "GSPS"}],
                "annotation_warnings": ["GSPS 1.2 (pr.dcm): annotation 2: lies outside the body (air only)"],
            }
        }
    )
    html = templates.env.get_template("_prior_annotation.html").render(job=job)
    assert "<td>L1</td><td>line" in html
    assert "(GSPS)" in html
    assert "lies outside the body" in html
    empty = templates.env.get_template("_prior_annotation.html").render(job=SimpleNamespace(step_outputs={}))
    assert "Prior annotation" not in empty
