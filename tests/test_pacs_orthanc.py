"""The Orthanc site guide, run: a real Orthanc loads the Lua script of docs/pacs/orthanc.md and routes to an
embedded LesionTrack service (HTTP on). A Philips "iDose" follow-up is analysed (SEG + SR back in Orthanc), a
localizer and a dose report (Secondary Capture) in the same study are skipped and listed by
``/api/series?state=skipped`` with their reasons, the baseline import is not routed, the Lua completion trigger
completes series although the quiet period is long, and after a rule change ``lesiontrack routing re-evaluate``
analyses a previously skipped follow-up."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from lesiontrack.config.settings import ApiKey
from lesiontrack.db.models import JobState
from lesiontrack.pipeline.jobs.contract import job_results
from tests.support.pacs_guide import guide_json, guide_lua
from tests.support.services import OrthancServer, free_port, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]

KEY = "orthanc-key"


def _rewrite(files: list[Path], dest: Path, **attrs: Any) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in attrs.items():
            setattr(ds, k, v)
        p = dest / f.name
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def localizer(fu: list[Path], dest: Path) -> list[Path]:
    """Two slices of the follow-up study re-labelled as a Siemens topogram (ImageType LOCALIZER)."""
    series = generate_uid()
    out = []
    for i, f in enumerate(fu[:2]):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series, 1, "Topogram  0.6  T20s"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        dest.mkdir(parents=True, exist_ok=True)
        p = dest / f"loc{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def dose_report(fu: Path, dest: Path) -> Path:
    """A GE-style dose screen: Secondary Capture, Modality CT, "Dose Report", in the follow-up study."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset

    ref = pydicom.dcmread(fu, stop_before_pixels=True)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.7")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for k in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber"):
        setattr(ds, k, ref.get(k, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = "CT", generate_uid(), 999, "Dose Report"
    ds.ConversionType, ds.ImageType, ds.InstanceNumber = "WSD", ["DERIVED", "SECONDARY", "SCREEN SAVE"], 1
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.zeros((64, 64), np.uint8).tobytes()
    dest.mkdir(parents=True, exist_ok=True)
    p = dest / "dose.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


class Site:
    def __init__(self, root: Path) -> None:
        from lesiontrack.demo import demo_settings
        from lesiontrack.service import LesionTrackService

        lt_port = free_port()
        self.settings = demo_settings(
            root / "data",
            http=True,
            # long quiet period: only the Lua completion trigger can complete a series within the test
            dicom={"port": lt_port, "series_quiet_seconds": 3600},
            routing={"body_parts": ["ABDOMEN"]},
            sending={"destinations": ["orthanc"], "retry_schedule_seconds": [1, 2, 5]},
        )
        self.settings.http.api_keys.append(ApiKey(name="orthanc", key=KEY, role="operator"))
        self.http = f"http://127.0.0.1:{self.settings.http.port}"
        lua = root / "lesiontrack.lua"
        lua.write_text(guide_lua(self.http, KEY))
        self.orthanc = OrthancServer(root / "orthanc", extra_config=guide_json("127.0.0.1", lt_port, lua)).start()
        self.settings.pacs = self._peer()
        self.service = LesionTrackService(self.settings).start()

    def _peer(self) -> list[Any]:
        from lesiontrack.config.settings import PacsPeer

        return [
            PacsPeer(
                name="orthanc",
                ae_title=self.orthanc.aet,
                host="127.0.0.1",
                port=self.orthanc.dicom_port,
                query=True,
                send=True,
            )
        ]

    def stop(self) -> None:
        self.service.stop()
        self.orthanc.stop()

    def api(self, path: str, key: str = "demo") -> Any:
        req = urllib.request.Request(f"{self.http}{path}", headers={"X-API-Key": key})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def upload(self, files: list[Path]) -> None:
        for f in files:
            self.orthanc.upload(f)

    def job_done(self, series_uid: str, timeout: float = 900) -> Any:
        store = self.service.job_store
        view = wait_for(
            lambda: (v := store.latest_for_series(series_uid)) is not None and v.finished and v,
            timeout,
            f"the analysis of {series_uid}",
        )
        assert view.state is JobState.DONE, view.error
        return view

    def skipped(self) -> dict[str, dict[str, Any]]:
        return {s["series_instance_uid"]: s for s in self.api("/api/series?state=skipped")["items"]}

    def results_in_orthanc(self, study_uid: str) -> set[str]:
        study = self.orthanc.post("/tools/lookup", study_uid)[0]["ID"]
        return {s["MainDicomTags"].get("Modality") for s in self.orthanc.get_json(f"/studies/{study}/series")}


def test_orthanc_lua_routes_follow_ups_skips_visibly_and_reevaluates(tmp_path: Path) -> None:
    from lesiontrack.demo_data import FollowUps, make_patient

    patient = make_patient(
        tmp_path / "patient",
        seed=5,
        shape=(56, 112, 112),
        spacing=(3.0, 3.0, 3.0),
        n_lesions=3,
        follow_ups=FollowUps.MOTION,
    )
    fu1, fu2 = patient.followups
    idose = _rewrite(fu1.files, tmp_path / "fu1", SeriesDescription="Abdomen 5mm iDose 4", BodyPartExamined="ABDOMEN")
    imr = _rewrite(fu2.files, tmp_path / "fu2", SeriesDescription="Thorax 3mm IMR1", BodyPartExamined="CHEST")
    loc = localizer(idose, tmp_path / "loc")
    dose = dose_report(idose[0], tmp_path / "dose")
    loc_uid = str(pydicom.dcmread(loc[0], stop_before_pixels=True).SeriesInstanceUID)
    dose_uid = str(pydicom.dcmread(dose, stop_before_pixels=True).SeriesInstanceUID)

    site = Site(tmp_path)
    try:
        site.upload([*patient.baseline.files, patient.seg_file])  # baseline import: Lua must not route it
        site.upload(idose + loc + [dose])
        site.upload(imr)

        view = site.job_done(fu1.series_uid)
        match = job_results(view.step_outputs).match
        assert match is not None
        assert match.prior.ct_series_uid == patient.baseline.series_uid
        wait_for(lambda: {"SEG", "SR"} <= site.results_in_orthanc(fu1.study_uid), 120, "SEG + SR in Orthanc")

        skipped = wait_for(lambda: (s := site.skipped()) and {loc_uid, dose_uid, fu2.series_uid} <= set(s) and s, 120)
        assert skipped[loc_uid]["routing_reason"] == "ImageType LOCALIZER"
        assert "Secondary Capture" in skipped[dose_uid]["routing_reason"]
        assert "body part CHEST" in skipped[fu2.series_uid]["routing_reason"]
        # the baseline reached LesionTrack only as a retrieved prior, never routed by the script
        base = site.api(f"/api/series/{patient.baseline.series_uid}")
        assert base["routing_reason"].startswith("retrieved as prior")
        assert base["jobs"] == []
        # completed by the trigger (quiet period 1 h), audited as such
        trig = [e for e in site.api("/api/audit?action=api.series_complete")["items"]]
        assert {e["object_id"] for e in trig} >= {fu1.series_uid, loc_uid, dose_uid, fu2.series_uid}
        metrics = site.api("/metrics")
        assert 'lesiontrack_series_skipped_total{reason="localizer"} 1.0' in metrics
        assert 'lesiontrack_series_skipped_total{reason="sop_class"} 1.0' in metrics
        assert 'lesiontrack_series_skipped_total{reason="body_part"} 1.0' in metrics

        # the rule change: chest series too; re-evaluation queues the skipped IMR follow-up, the service runs it
        cfg = tmp_path / "lt.toml"
        cfg.write_text(
            f'data_dir = "{site.settings.data_dir}"\ndatabase_url = "{site.settings.effective_database_url}"\n'
            "[routing]\nbody_parts = []\n"
        )
        from lesiontrack.cli import app

        r = CliRunner().invoke(app, ["--config", str(cfg), "routing", "re-evaluate"])
        assert r.exit_code == 0, r.output
        assert f"{fu2.series_uid}: ANALYSE (job" in r.output
        assert "1 now routed" in r.output
        assert f"{loc_uid}: SKIP - ImageType LOCALIZER" in r.output
        site.job_done(fu2.series_uid)
        assert fu2.series_uid not in site.skipped()
        wait_for(lambda: {"SEG", "SR"} <= site.results_in_orthanc(fu2.study_uid), 120, "SEG + SR of the IMR series")
    finally:
        site.stop()


def test_the_guide_routes_a_follow_up_only_once_it_is_whole(tmp_path: Path) -> None:
    """The guide's Lua does not route a series Orthanc knows to be incomplete (fewer instances than it expects from
    the series' tags): half a follow-up found stable is held back, and routed whole once the rest arrives.
    The receiving end is dcmtk's storescp (this test is about what Orthanc sends)."""
    import subprocess

    from lesiontrack.demo_data import FollowUps, make_patient
    from tests.support.tools import require_tool

    require_tool("storescp")
    patient = make_patient(
        tmp_path / "patient",
        seed=5,
        shape=(40, 80, 80),
        spacing=(3.0, 3.0, 3.0),
        n_lesions=3,
        n_followups=1,
        follow_ups=FollowUps.MOTION,
    )
    n = len(patient.followups[0].files)  # what Orthanc expects: ImagesInAcquisition x NumberOfTemporalPositions
    fu = _rewrite(patient.followups[0].files, tmp_path / "fu", ImagesInAcquisition=n, NumberOfTemporalPositions=1)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    lua = tmp_path / "lesiontrack.lua"
    lua.write_text(guide_lua(f"http://127.0.0.1:{free_port()}", KEY))  # no HTTP listener: the trigger just fails
    scp = subprocess.Popen(
        ["storescp", "+xa", "-aet", "LESIONTRACK", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    orthanc = OrthancServer(tmp_path / "orthanc", extra_config=guide_json("127.0.0.1", port, lua))
    try:
        orthanc.start()
        for f in patient.baseline.files:
            orthanc.upload(f)
        half = len(fu) // 2
        for f in fu[:half]:
            orthanc.upload(f)
        log = tmp_path / "orthanc" / "orthanc.log"
        wait_for(
            lambda: "stable but incomplete" in log.read_text(errors="replace"), 120, "the stable-but-incomplete note"
        )
        assert not list(received.iterdir()), "half a follow-up was routed"
        for f in fu[half:]:
            orthanc.upload(f)
        wait_for(lambda: len(list(received.iterdir())) == len(fu), 120, "the whole follow-up at the receiver")
        sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received.iterdir()}
        assert len(sops) == len(fu)
    finally:
        orthanc.stop()
        scp.terminate()
        scp.wait(10)
