"""The end-to-end site: Orthanc as the PACS and LesionTrack serving beside it on loopback, and what tests read
back from it (SR lesion UIDs, an instance's bytes, dciodvfy on an object)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from lesiontrack.db.models import Delivery, DeliveryState, JobState
from lesiontrack.db.session import session_scope
from tests.support.services import OrthancServer, free_port, wait_for
from tests.support.tools import require_tool


class Site:
    """Orthanc (the PACS) + LesionTrack (embedded service) wired to each other on loopback."""

    def __init__(self, root: Path, method: str, **settings: Any) -> None:
        from lesiontrack.demo import demo_settings
        from lesiontrack.service import LesionTrackService

        require_tool("/usr/sbin/Orthanc")
        lt_port = free_port()
        self.orthanc = OrthancServer(
            root / "orthanc", modalities={"lesiontrack": ("LESIONTRACK", "127.0.0.1", lt_port)}
        ).start()
        self.settings = demo_settings(
            root / "data",
            http=False,
            dicom={"port": lt_port},
            pacs=[
                {
                    "name": "orthanc",
                    "ae_title": self.orthanc.aet,
                    "host": "127.0.0.1",
                    "port": self.orthanc.dicom_port,
                    "retrieve_method": method,
                    "query": True,
                    "send": True,
                }
            ],
            sending={"destinations": ["orthanc"], "retry_schedule_seconds": [1, 2, 5]},
            **settings,
        )
        self.service = LesionTrackService(self.settings).start()

    def stop(self) -> None:
        self.service.stop()
        self.orthanc.stop()

    def upload(self, files: list[Path]) -> str:
        """Store files in Orthanc over REST; returns the Orthanc id of their series."""
        ids = [self.orthanc.upload(f) for f in files]
        return str(self.orthanc.get_json(f"/instances/{ids[0]}")["ParentSeries"])

    def route(self, series_id: str) -> None:
        """What an Orthanc routing rule does: send the series to LesionTrack."""
        self.orthanc.post("/modalities/lesiontrack/store", {"Resources": [series_id], "Synchronous": True})

    def analyse(self, series_uid: str, timeout: float = 600) -> Any:
        store = self.service.job_store
        wait_for(
            lambda: (store.latest_for_series(series_uid) or None) and store.latest_for_series(series_uid).finished,
            timeout,
            f"the analysis of {series_uid}",
        )
        view = store.latest_for_series(series_uid)
        assert view.state is JobState.DONE, view.error
        sf = self.service.session_factory

        def delivered() -> bool:
            with session_scope(sf) as s:
                ds = s.scalars(select(Delivery).where(Delivery.job_pk == view.id)).all()
                return bool(ds) and all(d.state is DeliveryState.DELIVERED for d in ds)

        wait_for(delivered, 120, "SEG + SR delivered to Orthanc")
        return view

    def results_in_orthanc(self, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
        found = self.orthanc.post("/tools/lookup", study_uid)
        study_id = found[0]["ID"]
        out: dict[str, list[pydicom.Dataset]] = {}
        for series in self.orthanc.get_json(f"/studies/{study_id}/series"):
            modality = series["MainDicomTags"].get("Modality")
            if modality in ("SEG", "SR"):
                for inst in series["Instances"]:
                    raw = get_bytes(self.orthanc, f"/instances/{inst}/file")
                    out.setdefault(modality, []).append(pydicom.dcmread(io.BytesIO(raw)))
        return out


def get_bytes(orthanc: OrthancServer, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"{orthanc.url}{path}", timeout=60) as r:
        return bytes(r.read())


def sr_uids(sr: pydicom.Dataset) -> set[str]:
    uids: set[str] = set()

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == "112040":
                uids.add(str(item.UID))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return uids


def validate_object(tmp: Path, ds: pydicom.Dataset) -> Path:
    """dciodvfy (SEG and SR) and dsrdump (SR); the slow pixelmed SR validation runs once per test on all SRs."""
    from lesiontrack.pipeline.dicom.validate import run_dciodvfy, run_dsrdump

    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    reports = [run_dciodvfy(path)] + ([run_dsrdump(path)] if ds.Modality == "SR" else [])
    for rep in reports:
        assert rep.ok, rep.summary()
    return path
