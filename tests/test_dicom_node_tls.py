"""DICOM TLS both ways: dcmtk peers talk TLS to our Storage SCP, and our SCU talks TLS to a dcmtk storescp."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lesiontrack.config.settings import ConfigError, Settings, load_settings
from lesiontrack.dicom_node.outbound.scu import DimseError, echo, store_files
from lesiontrack.dicom_node.outbound.sending import DeliveryError, deliver_files
from tests.support.dicom_node import (
    ENV,
    Node,
    dataset_bytes,
    echoscu,
    ge_files,
    storescu,
)
from tests.support.services import free_port, wait_for_port
from tests.support.tools import require_tool, unavailable


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A throw-away key and self-signed certificate (it is its own CA)."""
    require_tool("openssl")
    key, crt = folder / f"{name}.key.pem", folder / f"{name}.crt.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
        ],
        check=True,
        capture_output=True,
    )
    return key, crt


def require_dcmtk_tls() -> None:
    require_tool("echoscu", "storescp")
    if "--enable-tls" not in subprocess.run(["storescp", "--help"], capture_output=True, text=True, check=False).stdout:
        unavailable("dcmtk built without TLS (Debian's dcmtk has it)")


def test_tls_association_to_our_scp(tmp_path: Path) -> None:
    require_dcmtk_tls()
    key, crt = self_signed(tmp_path, "lesiontrack")
    n = Node(
        tmp_path / "n",
        tls={"enabled": True, "cert_file": crt, "key_file": key, "ca_file": crt, "require_client_cert": True},
    )
    with n.scp:
        tls = ["+tls", str(key), str(crt), "+cf", str(crt)]
        assert echoscu(n.port, "STORESCU", *tls) == 0
        assert echoscu(n.port) != 0  # plain DICOM refused on the TLS port
        storescu(n.port, ge_files()[:2], "STORESCU", *tls)
        assert n.count() == 2


class TlsStorescp:
    """dcmtk ``storescp`` on loopback, TLS only, trusting ``client_crt``, writing what it receives bit for bit."""

    def __init__(self, folder: Path, key: Path, crt: Path, client_crt: Path) -> None:
        self.crt = crt
        self.out = folder / "received"
        self.out.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "storescp",
                "-aet",
                "TLSPACS",
                "+tls",
                str(key),
                str(crt),
                "+cf",
                str(client_crt),
                "--require-peer-cert",
                "+B",
                "-od",
                str(self.out),
                str(self.port),
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port, timeout=30)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def tls_pacs(tmp_path: Path) -> Iterator[tuple[TlsStorescp, Path, Path]]:
    require_dcmtk_tls()
    pacs_key, pacs_crt = self_signed(tmp_path, "pacs")
    our_key, our_crt = self_signed(tmp_path, "lesiontrack")
    pacs = TlsStorescp(tmp_path / "pacs", pacs_key, pacs_crt, client_crt=our_crt)
    try:
        yield pacs, our_key, our_crt
    finally:
        pacs.stop()


def _settings(tmp_path: Path, key: Path, crt: Path, ca: Path, port: int, peer_tls: bool = True) -> Settings:
    peer = {"name": "pacs", "ae_title": "TLSPACS", "host": "127.0.0.1", "port": port, "send": True, "tls": peer_tls}
    return load_settings(
        None,
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'x.sqlite3'}",
        dicom={"tls": {"enabled": True, "cert_file": crt, "key_file": key, "ca_file": ca}},
        pacs=[peer],
        sending={"destinations": ["pacs"]},
    )


def test_outgoing_echo_and_store_over_tls_to_dcmtk(tls_pacs: tuple[TlsStorescp, Path, Path], tmp_path: Path) -> None:
    pacs, our_key, our_crt = tls_pacs
    settings = _settings(tmp_path, our_key, our_crt, pacs.crt, pacs.port)
    peer = settings.peer("pacs")
    assert echo(settings, peer) == 0x0000
    files = ge_files()[:3]
    outcomes = store_files(settings, peer, files)
    assert [o.status for o in outcomes] == [0, 0, 0]
    # the sending service's C-STORE path goes over the same TLS association
    assert deliver_files(settings, peer, files[:1]) == "C-STORE 1 objects"
    received = pacs.files()
    assert len(received) == 3  # the resend overwrote storescp's file of the same UID
    assert sorted(dataset_bytes(p) for p in received) == sorted(dataset_bytes(f) for f in files)


def test_outgoing_tls_refuses_an_untrusted_pacs_and_a_plain_peer(
    tls_pacs: tuple[TlsStorescp, Path, Path], tmp_path: Path
) -> None:
    pacs, our_key, our_crt = tls_pacs
    _other_key, other_crt = self_signed(tmp_path, "someone-else")
    untrusting = _settings(tmp_path, our_key, our_crt, other_crt, pacs.port)  # we do not trust the PACS's cert
    with pytest.raises(DimseError, match="no association with pacs"):
        echo(untrusting, untrusting.peer("pacs"))
    plain = _settings(tmp_path, our_key, our_crt, pacs.crt, pacs.port, peer_tls=False)
    with pytest.raises(DeliveryError, match="C-STORE"):
        deliver_files(plain, plain.peer("pacs"), ge_files()[:1])
    assert pacs.files() == []


def test_outgoing_tls_without_certificates_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_settings(None, data_dir=tmp_path, dicom={"tls": {"enabled": True}})
