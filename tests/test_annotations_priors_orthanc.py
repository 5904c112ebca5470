"""A prior study whose lesions are marked only in a presentation state (GSPS) and an RT structure set: the service's
prior lookup finds them in Orthanc, retrieves them, and the load step reads lesions from them (issue 31)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from lesiontrack.config.settings import RetrieveMethod
from lesiontrack.dicom_node.outbound.priors import PriorFinder
from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.pipeline.dicom.annotations.refs import prior_annotation_references
from lesiontrack.pipeline.jobs.ports import PriorTimepoint
from lesiontrack.pipeline.jobs.steps.volumes import read_prompts
from lesiontrack.synthetic.annotations import Mark, write_gsps, write_rtstruct
from tests.support.dicom_node import j2k_series, storescu
from tests.support.orthanc_node import Site, prior_files

pytestmark = pytest.mark.services


def _objects(tmp: Path, ct: list[Path]) -> tuple[Path, Path]:
    heads = [dcmread(f, stop_before_pixels=True) for f in ct]
    vol = read_series(ct)
    k = vol.shape[0] // 2
    c = vol.index_to_patient(np.array([vol.shape[2] / 2, vol.shape[1] / 2, k], float))
    half = np.array([15.0, 0.0, 0.0])
    line = Drawing(DrawingKind.LINE, [np.array([c - half, c + half])])
    pr = write_gsps(heads, [Mark(line, "liver L1")], tmp / "pr" / "gsps.dcm")
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = np.stack([c[0] + 10 * np.cos(t), c[1] + 10 * np.sin(t), np.full_like(t, c[2])], -1)
    rs = write_rtstruct(heads, [("liver L2", [ring])], tmp / "rs" / "rs.dcm")
    return pr, rs


def test_prior_annotation_references_of_gsps_and_rtstruct(tmp_path: Path) -> None:
    ct, _ = prior_files()
    pr, rs = _objects(tmp_path, ct)
    series = str(dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
    assert prior_annotation_references(dcmread(pr, stop_before_pixels=True)) == ("PR", [series])
    assert prior_annotation_references(dcmread(rs, stop_before_pixels=True)) == ("RTSTRUCT", [series])


def test_service_finds_retrieves_and_reads_gsps_and_rtstruct_priors_from_orthanc(tmp_path: Path) -> None:
    site = Site(tmp_path, method=RetrieveMethod.C_MOVE)
    try:
        ct, _ = prior_files()
        pr, rs = _objects(tmp_path, ct)
        for f in [*ct, pr, rs]:
            site.orthanc.upload(f)
        follow = j2k_series(tmp_path / "follow", patient_id="99000", study_date="20221208")
        storescu(site.node.port, follow, "STORESCU", "-xv")
        follow_uid = str(dcmread(follow[0], stop_before_pixels=True).SeriesInstanceUID)
        finder = PriorFinder(site.node.settings, site.node.sf, site.node.scp.ingestor)
        priors = finder.find_priors(follow_uid)
        assert len(priors) == 1
        kinds = sorted(a.modality for a in priors[0].annotations)
        assert kinds == ["PR", "RTSTRUCT"]
        got = finder.retrieve(priors[0])
        assert len(got.ct_files) == 3
        assert all(a.files and a.files[0].is_file() for a in got.annotations)
        prior_ct = read_series(got.ct_files)
        for ann in got.annotations:
            one = PriorTimepoint(got.study_uid, got.study_date, got.study_time, got.ct_series_uid, got.ct_files, [ann])
            said: list[str] = []
            prompts = read_prompts(one, prior_ct, said)
            names = [p.identity.tracking_id for p in prompts]
            assert names == (["liver L1"] if ann.modality == "PR" else ["liver L2"]), (names, said)
            kind = prompts[0].meta["drawing"].kind
            assert kind is (DrawingKind.LINE if ann.modality == "PR" else DrawingKind.CONTOUR)
    finally:
        site.stop()
