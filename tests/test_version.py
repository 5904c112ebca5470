"""One version everywhere: ``lesiontrack --version``, the Implementation Version Name our associations send (as SCP
and as SCU), the SoftwareVersions of the SEG/SR we write and the conformance statement all report the installed
package's version (config/version.py)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from typer.testing import CliRunner

from lesiontrack.cli import app
from lesiontrack.config.settings import PacsPeer
from lesiontrack.config.version import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    VERSION,
    implementation_version_name,
)
from lesiontrack.dicom_node.outbound import scu
from lesiontrack.pipeline.dicom.seg.writer import write_seg
from lesiontrack.pipeline.dicom.sr.writer import LesionReport, SrTimepoint, write_sr
from lesiontrack.pipeline.science.measurements import measure_tracked
from tests.support.dicom_node import Node
from tests.support.segsr import make_series

PACKAGE = version("lesiontrack")


def test_version_is_the_package_version() -> None:
    assert VERSION == PACKAGE
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == PACKAGE
    out = subprocess.run([sys.executable, "-m", "lesiontrack", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == PACKAGE


@pytest.mark.parametrize(
    ("package", "name"),
    [
        ("0.1.0", "LTRACK_0.1.0"),
        ("0.1.0+local", "LTRACK_0.1.0"),
        ("12.34.56.dev789", "LTRACK_12.34.56."),
        ("1.0rc1", "LTRACK_1.0rc1"),
    ],
)
def test_implementation_version_name_fits_sixteen_characters(package: str, name: str) -> None:
    assert implementation_version_name(package) == name
    assert 1 <= len(name) <= 16


def test_our_scp_sends_the_version_in_the_association(node: Node) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.dicom.ae_title)
    try:
        assert assoc.is_established
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    finally:
        assoc.release()


def test_our_scu_sends_the_version_in_the_association(node: Node) -> None:
    seen: list[tuple[str, str]] = []

    def on_requested(event: evt.Event) -> None:
        seen.append(
            (str(event.assoc.requestor.implementation_version_name), event.assoc.requestor.implementation_class_uid)
        )

    peer_ae = AE(ae_title="PEER")
    peer_ae.add_supported_context(Verification)
    server = peer_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_REQUESTED, on_requested)])
    try:
        port = server.server_address[1]
        peer = PacsPeer(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
        assert scu.echo(node.settings, peer) == 0
    finally:
        server.shutdown()
    assert seen == [(IMPLEMENTATION_VERSION_NAME, IMPLEMENTATION_CLASS_UID)]


def test_seg_sr_and_written_ct_carry_the_version(tmp_path: Path) -> None:
    tp = make_series(tmp_path, n_timepoints=1)[0]
    m = measure_tracked(tp.lesions[0], tp.ct, tp.series_uid)
    seg = write_seg(tp.datasets, [tp.lesions[0]])
    sr = write_sr(tp.datasets, seg, [LesionReport(m)], time_point=SrTimepoint("T0", 0))
    for ds in (seg.dataset, sr.dataset):
        assert ds.SoftwareVersions == PACKAGE
    meta = tp.datasets[0].file_meta  # written by models.imaging.dicom_write
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
