"""Log hygiene at the door (issue 32): values from the wire never reach a log line (pydicom's "Invalid value for VR"
warnings withheld, through logging and through Python warnings), control characters in logged values are
escaped, and an expected destination outage is one WARNING line per attempt (pynetdicom's ERROR lines about our
own requests demoted), with ERROR only once a person must act (dead letter)."""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.uid import UID, generate_uid

from lesiontrack.config.logging import _OurHandler, printable, setup_logging
from lesiontrack.db.models import DeliveryState
from lesiontrack.db.session import make_engine, make_session_factory, upgrade
from lesiontrack.dicom_node.inbound.integrity import check_instance_file
from lesiontrack.dicom_node.outbound.sending import DeliveryService, deliver_files
from tests.support.dicom_node import Node
from tests.support.pdu import associate_rq, connect, reply_type
from tests.support.services import free_port

NAME = "Doeinvalid^Johnathan"


@pytest.fixture
def our_logging() -> Iterator[io.StringIO]:
    """setup_logging as `lesiontrack serve` does, its handler writing into the returned buffer; undone after."""
    root = logging.getLogger()
    level = root.level
    setup_logging("DEBUG", library_level="DEBUG")
    buf = io.StringIO()
    for h in root.handlers:
        if isinstance(h, _OurHandler):
            h.setStream(buf)
    try:
        yield buf
    finally:
        for h in list(root.handlers):
            if isinstance(h, _OurHandler):
                root.removeHandler(h)
        root.setLevel(level)
        for name in ("pydicom", "pynetdicom"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _file_with_name_as_ui(path: Path) -> Path:
    """A CT-like file whose Patient Name arrived with the VR UI (pydicom warns, quoting the value)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    value = NAME.encode() + (b"\0" if len(NAME) % 2 else b"")
    elem = struct.pack("<HH2sH", 0x0010, 0x0010, b"UI", len(value)) + value
    at = raw.index(struct.pack("<HH", 0x0020, 0x000D))  # before Study Instance UID: tag order kept
    path.write_bytes(raw[:at] + elem + raw[at:])
    return path


def test_pydicom_value_warnings_are_withheld_in_logs_and_warnings(tmp_path: Path, our_logging: io.StringIO) -> None:
    path = _file_with_name_as_ui(tmp_path / "x.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # as install_library_filters left it (pytest's own capture undone here)
        try:
            assert check_instance_file(path, decode_pixels=False) is None
        finally:
            logging.captureWarnings(False)
    err = our_logging.getvalue()
    assert "Invalid value for VR UI (value withheld)" in err  # the problem is still said
    assert NAME not in err
    assert "Johnathan" not in err


def test_control_characters_in_logged_values_are_escaped(our_logging: io.StringIO) -> None:
    assert printable("EV\x00IL\nAE ") == "EV\\x00IL\\x0aAE"
    logging.getLogger("dicom_node.test").warning("calling AE %s", "NUL\x00\x00AE")
    err = our_logging.getvalue()
    assert "NUL\\x00\\x00AE" in err
    assert "\x00" not in err


def test_calling_ae_with_nul_bytes_is_logged_escaped(tmp_path: Path, our_logging: io.StringIO) -> None:
    """pynetdicom quotes the AE title it cannot accept; our log handler writes it escaped (the log stays text)."""
    n = Node(tmp_path, allowed_calling_aes=["STORESCU"])
    with n.scp:
        s = connect(n.port, "127.0.0.1")
        try:
            rq = bytearray(associate_rq(calling="EVXXIL"))
            at = rq.index(b"EVXXIL")
            rq[at + 2 : at + 4] = b"\x00\x00"  # pynetdicom will not build it; a faulty modality sends it
            s.sendall(bytes(rq))
            assert reply_type(s) == 0x03  # refused: an A-ASSOCIATE-RJ
        finally:
            s.close()
    n.engine.dispose()
    err = our_logging.getvalue()
    assert "EV\\x00\\x00IL" in err
    assert "\x00" not in err


def test_destination_outage_is_one_warning_per_attempt_and_error_only_for_the_dead_letter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lesiontrack.config.settings import load_settings

    caplog.set_level(logging.DEBUG)
    for name in ("pynetdicom", "pydicom"):  # what `serve` keeps of them (setup_logging's library level)
        logging.getLogger(name).setLevel(logging.WARNING)
    port = free_port()  # nothing listens: the destination is down
    settings = load_settings(
        None,
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'lt.sqlite3'}",
        pacs=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "send": True}],
        sending={"destinations": ["pacs"], "retry_schedule_seconds": [0, 0], "claim_seconds": 600},
    )
    upgrade(settings.database_url)
    path = _file_with_name_as_ui(tmp_path / "result.dcm")
    clock = lambda: datetime.now(UTC)  # noqa: E731
    svc = DeliveryService(settings, make_session_factory(make_engine(settings.database_url)), clock, deliver_files)
    (delivery,) = svc.send([path], attempt_now=False)
    states = [svc.attempt(delivery) for _ in range(3)]
    assert states == [DeliveryState.RETRY_WAIT, DeliveryState.RETRY_WAIT, DeliveryState.DEAD_LETTER]
    lib = [r for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.WARNING]
    assert lib == [], [r.getMessage() for r in lib]
    ours = [
        r
        for r in caplog.records
        if r.name == "lesiontrack.dicom_node.outbound.sending" and r.levelno >= logging.WARNING
    ]
    assert [r.levelno for r in ours] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert all("attempt" in r.getMessage() for r in ours)


def test_noise_filter_reports_each_new_association_thread_even_when_its_ident_is_reused() -> None:
    """The filter keeps the first ERROR of each association thread (at WARNING) and drops its repeats; a later thread
    that the OS gives a finished thread's ident is a new association and is reported too."""
    import threading

    from lesiontrack.dicom_node.inbound.association_guard import PynetdicomNoiseFilter

    f = PynetdicomNoiseFilter()
    kept: list[list[bool]] = []

    def association() -> None:
        records = [logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1, "bad PDU", None, None) for _ in "ab"]
        for r in records:
            r.thread = 4242  # as if every thread had the same ident (the OS reuses them)
        kept.append([f.filter(r) for r in records])

    for _ in range(2):
        t = threading.Thread(target=association)
        t.start()
        t.join()
    assert kept == [[True, False], [True, False]]
