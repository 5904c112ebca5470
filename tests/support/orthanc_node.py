"""Orthanc and a DICOM node side by side, for the prior query/retrieve tests, and a prior study's files."""

from __future__ import annotations

from pathlib import Path

from lesiontrack.config.settings import PacsPeer, RetrieveMethod
from tests.support.dicom_node import Node
from tests.support.services import OrthancServer
from tests.support.tools import require_shared_data


def prior_files() -> tuple[list[Path], Path]:
    """Patient 99000, 2003-04-17: a 3-slice CT and the DICOM SEG (liver) that references it."""
    ct = sorted(require_shared_data("interop", "seg_sr", "dcmqi_ct-3slice").glob("*.dcm"))
    seg = require_shared_data("interop", "seg_sr", "dcmqi_segmentations_liver.dcm")
    return ct, seg


class Site:
    """A LesionTrack node plus an Orthanc PACS that knows it as modality 'lesiontrack'."""

    def __init__(
        self,
        root: Path,
        method: RetrieveMethod = RetrieveMethod.C_MOVE,
        dicomweb: bool = False,
        start_orthanc: bool = True,
        **dicom: object,
    ) -> None:
        self.node = Node(root / "node", **dicom)
        self.node.scp.start()
        self.orthanc = OrthancServer(
            root / "orthanc",
            modalities={"lesiontrack": (self.node.settings.dicom.ae_title, "127.0.0.1", self.node.port)},
            enable_dicomweb=dicom_enabled(dicomweb, method),
        )
        if start_orthanc:
            self.orthanc.start()
        self.peer = PacsPeer(
            name="pacs",
            ae_title="ORTHANC",
            host="127.0.0.1",
            port=self.orthanc.dicom_port,
            retrieve_method=method,
            send=True,
            orthanc_url=self.orthanc.url,
            dicomweb_url=self.orthanc.dicomweb_url,
        )
        self.node.settings.pacs = [self.peer]
        self.node.settings.sending.destinations = ["pacs"]

    def stop(self) -> None:
        self.orthanc.stop()
        self.node.scp.stop()
        self.node.engine.dispose()


def dicom_enabled(dicomweb: bool, method: RetrieveMethod) -> bool:
    return dicomweb or method == RetrieveMethod.DICOMWEB
