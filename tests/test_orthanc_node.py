"""The DICOM node against a real Orthanc on loopback: Orthanc pushes to the node, the node finds and retrieves
priors (C-MOVE, C-GET, DICOMweb), sends results back (C-STORE, Orthanc REST, STOW-RS), and survives a destination
that is down (retries on schedule, dead-letter, manual retry)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lesiontrack.config.settings import RetrieveMethod, SendMethod
from lesiontrack.db.models import AnalysisJob, Delivery, DeliveryState, RoutingDecision
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.outbound.priors import PriorFinder, annotation_references
from lesiontrack.dicom_node.outbound.sending import DeliveryService
from tests.support.dicom_node import Node, dataset_bytes, j2k_series, storescu, wait_until
from tests.support.orthanc_node import Site, prior_files
from tests.support.services import OrthancServer
from tests.support.tools import require_shared_data

pytestmark = pytest.mark.services


def prior_sr(dest: Path, ct: list[Path]) -> Path:
    """A TID 1500 SR about the prior CT: dcmqi's example SR re-pointed (evidence, patient, study) at that CT."""
    ref = dcmread(ct[0], stop_before_pixels=True)
    ds = dcmread(require_shared_data("interop", "seg_sr", "dcmqi_sr-example_sr.dcm"))
    ds.PatientID, ds.StudyInstanceUID = ref.PatientID, ref.StudyInstanceUID
    ds.StudyDate, ds.StudyTime = ref.StudyDate, ref.StudyTime
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ev = ds.CurrentRequestedProcedureEvidenceSequence[0]
    ev.StudyInstanceUID = ref.StudyInstanceUID
    ev.ReferencedSeriesSequence = [ev.ReferencedSeriesSequence[0]]
    ev.ReferencedSeriesSequence[0].SeriesInstanceUID = ref.SeriesInstanceUID
    # its evidence names the instances of that CT (a prior is used only when every referenced instance is held)
    items = []
    for f in ct:
        h = dcmread(f, stop_before_pixels=True)
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        items.append(item)
    ev.ReferencedSeriesSequence[0].ReferencedSOPSequence = items
    dest.mkdir(parents=True, exist_ok=True)
    p = dest / "sr.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def orthanc_has(o: OrthancServer, sop_uid: str) -> str | None:
    hits = o.post("/tools/lookup", sop_uid)
    return next((h["ID"] for h in hits if h["Type"] == "Instance"), None)


def test_orthanc_pushes_a_study_to_the_node(site: Site, tmp_path: Path) -> None:
    files = j2k_series(tmp_path / "j2k")
    ids = [site.orthanc.upload(f) for f in files]
    study = site.orthanc.get_json(f"/instances/{ids[0]}/study")["ID"]
    site.node.settings.routing.min_slices = 10
    job = site.orthanc.post("/modalities/lesiontrack/store", {"Resources": [study], "Synchronous": True})
    assert job is not None
    rows = site.node.instances()
    assert len(rows) == len(files)
    # Orthanc stored and forwarded the JPEG 2000 bytes unchanged
    assert {r.sha256 for r in rows} == {hashlib.sha256(dataset_bytes(f)).hexdigest() for f in files}
    assert {r.sender_ae for r in rows} == {"ORTHANC"}
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    wait_until(lambda: site.node.triggers == [uid], what="analysis trigger")


@pytest.mark.parametrize("method", [RetrieveMethod.C_MOVE, RetrieveMethod.C_GET, RetrieveMethod.DICOMWEB])
def test_node_finds_and_retrieves_priors_from_orthanc(tmp_path: Path, method: RetrieveMethod) -> None:
    site = Site(tmp_path, method=method)
    try:
        ct, seg = prior_files()
        sr = prior_sr(tmp_path / "sr", ct)
        for f in [*ct, seg, sr]:
            site.orthanc.upload(f)
        # the follow-up arrives at the node: same patient, 2022
        follow = j2k_series(tmp_path / "follow", patient_id="99000", study_date="20221208")
        storescu(site.node.port, follow, "STORESCU", "-xv")
        follow_uid = str(dcmread(follow[0], stop_before_pixels=True).SeriesInstanceUID)

        finder = PriorFinder(site.node.settings, site.node.sf, site.node.scp.ingestor)
        priors = finder.find_priors(follow_uid)
        ct_series = str(dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
        assert [(p.ct_series_uid, p.source, p.study_date) for p in priors] == [(ct_series, "pacs", "20030417")]
        assert sorted((a.modality, a.sop_instance_uid) for a in priors[0].annotations) == [
            ("SEG", str(dcmread(seg, stop_before_pixels=True).SOPInstanceUID)),
            ("SR", str(dcmread(sr, stop_before_pixels=True).SOPInstanceUID)),
        ]
        assert all(a.files and a.files[0].is_file() for a in priors[0].annotations)

        got = finder.retrieve(priors[0])
        assert len(got.ct_files) == 3
        sent = {str(dcmread(p).SOPInstanceUID): dcmread(p).pixel_array for p in ct}
        for p in got.ct_files:
            ds = dcmread(p)
            assert (ds.pixel_array == sent[str(ds.SOPInstanceUID)]).all()
        if method == RetrieveMethod.C_MOVE:  # same transfer syntax end to end: identical bytes
            assert sorted(hashlib.sha256(dataset_bytes(p)).hexdigest() for p in got.ct_files) == sorted(
                hashlib.sha256(dataset_bytes(p)).hexdigest() for p in ct
            )
        # retrieved priors are stored but never routed to analysis
        site.node.scp.completion.poll_once()
        s = site.node.series(ct_series)
        assert s is not None
        assert s.routing_decision == RoutingDecision.SKIP
        assert "retrieved as prior" in (s.routing_reason or "")
        if method == RetrieveMethod.C_MOVE:
            site.node.scp.force_complete(ct_series)
            assert ct_series not in site.node.triggers  # (the follow-up itself may have completed meanwhile)
        # the next lookup finds them locally
        again = PriorFinder(site.node.settings, site.node.sf, query_peers=False).find_priors(follow_uid)
        assert [(p.ct_series_uid, p.source) for p in again] == [(ct_series, "local")]
    finally:
        site.stop()


def test_annotation_references_of_tid1500_sr() -> None:
    sr = dcmread(require_shared_data("interop", "seg_sr", "dcmqi_sr-example_sr.dcm"), stop_before_pixels=True)
    kind, refs = annotation_references(sr)
    assert kind == "SR"
    assert len(refs) == 3


def _result_file(tmp_path: Path) -> Path:
    """A new object to send back (as the pipeline would): the liver SEG with fresh UIDs."""
    ds = dcmread(prior_files()[1])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    p = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


def _job(node: Node) -> int:
    with session_scope(node.sf) as s:
        j = AnalysisJob(followup_series_uid="1.2.3")
        s.add(j)
        s.flush()
        return j.id


@pytest.mark.parametrize("method", [SendMethod.C_STORE, SendMethod.ORTHANC_REST, SendMethod.STOW_RS])
def test_node_sends_result_back_to_orthanc(tmp_path: Path, method: SendMethod) -> None:
    site = Site(tmp_path, dicomweb=method == SendMethod.STOW_RS)
    try:
        site.peer.send_method = method
        f = _result_file(tmp_path)
        svc = DeliveryService(site.node.settings, site.node.sf)
        [did] = svc.send([f], job_id=_job(site.node))
        with session_scope(site.node.sf) as s:
            d = s.get(Delivery, did)
            assert d is not None
            assert d.state == DeliveryState.DELIVERED
            assert d.attempts == 1
        oid = orthanc_has(site.orthanc, str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        assert oid is not None
        import urllib.request

        with urllib.request.urlopen(f"{site.orthanc.url}/instances/{oid}/file") as r:
            back = r.read()
        assert dcmread(__import__("io").BytesIO(back)).SOPInstanceUID == dcmread(f).SOPInstanceUID
        assert [e.details["outcome"] for e in site.node.audits("delivery.attempt")] == ["delivered"]
    finally:
        site.stop()


def test_destination_down_retries_dead_letter_then_manual_retry(tmp_path: Path) -> None:
    site = Site(tmp_path, start_orthanc=False)
    try:
        site.node.settings.sending.retry_schedule_seconds = [0.3, 0.6]
        f = _result_file(tmp_path)
        svc = DeliveryService(site.node.settings, site.node.sf)
        job = _job(site.node)
        [did] = svc.send([f], job_id=job)

        def state() -> Delivery:
            with session_scope(site.node.sf) as s:
                d = s.get(Delivery, did)
                assert d is not None
                return d

        assert state().state == DeliveryState.RETRY_WAIT
        assert state().attempts == 1
        svc.start(interval=0.1)
        wait_until(lambda: state().state == DeliveryState.DEAD_LETTER, what="dead letter")
        svc.stop()
        d = state()
        assert d.attempts == 3
        assert d.last_error
        assert "no association" in d.last_error
        attempts = site.node.audits("delivery.attempt")
        assert [e.details["outcome"] for e in attempts] == ["retry_wait", "retry_wait", "dead_letter"]
        # the schedule was followed: each retry no earlier than its delay after the previous attempt
        gaps = [(b.at - a.at).total_seconds() for a, b in itertools.pairwise(attempts)]
        assert gaps[0] >= 0.3 - 0.05
        assert gaps[1] >= 0.6 - 0.05

        site.orthanc.start()  # destination back
        from typer.testing import CliRunner

        from lesiontrack.cli import app

        cfg = tmp_path / "lt.toml"
        cfg.write_text(
            f'data_dir = "{site.node.settings.data_dir}"\ndatabase_url = "{site.node.url}"\n'
            f'[sending]\ndestinations = ["pacs"]\n'
            f'[[pacs]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {site.orthanc.dicom_port}\n'
            f"send = true\n"
        )
        r = CliRunner().invoke(app, ["--config", str(cfg), "send", "--retry", str(job)])
        assert r.exit_code == 0, r.output
        assert "delivered" in r.output
        assert state().state == DeliveryState.DELIVERED
        assert state().attempts == 4
        assert orthanc_has(site.orthanc, str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        assert len(site.node.audits("delivery.manual_retry")) == 1
    finally:
        site.stop()


@pytest.mark.parametrize("method", [RetrieveMethod.C_MOVE, RetrieveMethod.DICOMWEB])
def test_prior_retrieval_skips_objects_already_held(tmp_path: Path, method: RetrieveMethod) -> None:
    site = Site(tmp_path, method=method)
    try:
        ct, seg = prior_files()
        sr = prior_sr(tmp_path / "sr", ct)
        for f in [*ct, seg, sr]:
            site.orthanc.upload(f)
        follow = j2k_series(tmp_path / "follow", patient_id="99000", study_date="20221208")
        storescu(site.node.port, follow, "STORESCU", "-xv")
        follow_uid = str(dcmread(follow[0], stop_before_pixels=True).SeriesInstanceUID)
        finder = PriorFinder(site.node.settings, site.node.sf, site.node.scp.ingestor)
        finder.retrieve(finder.find_priors(follow_uid)[0])
        first = [str(e.object_id) for e in site.node.audits("priors.retrieve")]
        assert len(first) == 3  # SEG series, SR series, CT series
        # a later job (fresh finder, peers queried again) holds everything already: nothing is moved again
        again = PriorFinder(site.node.settings, site.node.sf, site.node.scp.ingestor)
        priors = again.find_priors(follow_uid)
        assert [p.source for p in priors] == ["local"]
        got = again.retrieve(priors[0])
        assert len(got.ct_files) == 3
        assert [str(e.object_id) for e in site.node.audits("priors.retrieve")] == first
        assert sorted(str(e.object_id) for e in site.node.audits("priors.already_held")) == sorted(first[:2])
        # the peer's CT series when it is not known locally as a prior: held → not retrieved either
        remote = again._fetch_unless_held(site.peer, priors[0].study_uid, priors[0].ct_series_uid)
        assert remote is False
        assert len(site.node.audits("priors.retrieve")) == 3
    finally:
        site.stop()
