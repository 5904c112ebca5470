"""Validation at the door and series integrity (issue 19): every invalid-dataset class is refused with a DIMSE
failure and an audit row, or (the expensive checks) marked invalid before analysis; an aborted or dropped
transfer, or one short of ImagesInAcquisition, is not analysed until re-sent and released or forced."""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid

from lesiontrack.db.models import RoutingDecision, SeriesState, TransferOutcome
from tests.support.dicom_node import Node, dataset_bytes, ge_files, j2k_series, pynetdicom_store, storescu, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"

# the running DICOM node (fixture `node`, tests/conftest.py) as these tests need it
pytestmark = pytest.mark.dicom_node(allowed_calling_aes=["STORESCU", "PYSCU"], series_quiet_seconds=1.0, min_slices=3)


def part10(path: Path, body: bytes, *, sop_class: str, sop_uid: str, ts: str) -> Path:
    """A Part 10 file with the given meta (what the sender puts in its C-STORE request) and a verbatim body."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def encoded(ds: Dataset) -> bytes:
    """``ds`` in explicit VR little endian, without file meta (pydicom writes what it is given: no validation)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def good_dataset(i: int = 0) -> Dataset:
    ds = dcmread(ge_files()[i])
    ds.SOPInstanceUID = generate_uid()
    return ds


def mutant(tmp_path: Path, name: str, ds: Dataset, body: bytes | None = None, **meta: str) -> Path:
    kw = {"sop_class": str(ds.get("SOPClassUID", CT)), "sop_uid": str(ds.SOPInstanceUID), "ts": EXPLICIT} | meta
    return part10(tmp_path / f"{name}.dcm", encoded(ds) if body is None else body, **kw)


def nested(depth: int) -> Sequence:
    inner = Dataset()
    inner.ReferencedSOPClassUID = CT
    for _ in range(depth):
        item = Dataset()
        item.ReferencedSeriesSequence = Sequence([inner])
        inner = item
    return inner.ReferencedSeriesSequence


def door_mutants(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """One file per invalid-dataset class of issue 19, each with the DIMSE status it must get."""
    out: dict[str, tuple[Path, int]] = {}

    ds = good_dataset()
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498." + "2" * 39  # request fine, dataset UID too long
    out["65-character Series Instance UID"] = (mutant(tmp_path, "series65", ds), 0xA900)

    ds = good_dataset()
    ds.StudyInstanceUID = "1.2.840.abc.7"
    out["UID with letters"] = (mutant(tmp_path, "charset", ds), 0xA900)

    ds = good_dataset()
    out["request says MR, dataset says CT"] = (mutant(tmp_path, "mr_vs_ct", ds, sop_class=MR), 0xA900)

    ds = good_dataset()
    del ds.SOPClassUID
    out["missing SOPClassUID"] = (mutant(tmp_path, "no_class", ds, sop_class=CT), 0xA900)

    ds = good_dataset()
    out["native pixel data under JPEG 2000"] = (mutant(tmp_path, "native_j2k", ds, ts=J2K_LOSSLESS), 0xC000)

    ds = good_dataset()
    body = bytearray(encoded(ds))
    at = body.index(b"\x08\x00\x60\x00CS")  # Modality
    body[at + 4 : at + 6] = b"QZ"
    out["unknown VR"] = (mutant(tmp_path, "unknown_vr", ds, bytes(body)), 0xC000)

    ds = good_dataset()
    ds.ReferencedSeriesSequence = nested(200)
    out["200-deep sequence nesting"] = (mutant(tmp_path, "deep", ds), 0xC000)

    ds = good_dataset()
    raw = encoded(ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(raw) + comp.flush()
    corrupt = deflated[:100] + bytes(b ^ 0x5A for b in deflated[100:400]) + deflated[400:]
    out["corrupt deflate stream"] = (mutant(tmp_path, "deflate", ds, corrupt, ts=DEFLATED), 0xC000)
    out["truncated deflate stream"] = (mutant(tmp_path, "deflate_trunc", ds, deflated[:-5000], ts=DEFLATED), 0xC000)

    ds = good_dataset()
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.is_undefined_length_sequence_item = False
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = False
    body = bytearray(encoded(ds))
    at = body.index(b"\x08\x00\x55\x11UI")  # ReferencedSOPInstanceUID inside the defined-length item
    body[at + 6 : at + 8] = (200).to_bytes(2, "little")  # claims more than its item holds
    out["corrupt content inside a defined-length sequence"] = (mutant(tmp_path, "defseq", ds, bytes(body)), 0xC000)
    return out


def raw_store(port: int, paths: list[Path]) -> list[int]:
    """Send Part 10 files as they are (only their file meta is read here, never the dataset)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = []
    for p in paths:
        with open(p, "rb") as fp:
            read_preamble(fp, False)
            metas.append(_read_file_meta_info(fp))
    ae = AE(ae_title="PYSCU")
    for cx in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(*cx)
    assoc = ae.associate("127.0.0.1", port, ae_title="LESIONTRACK")
    assert assoc.is_established
    statuses = []
    for p in paths:
        rsp = assoc.send_c_store(p)
        statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    assoc.release()
    return statuses


def test_each_invalid_dataset_class_is_refused_at_the_door_with_an_audit_row(node: Node, tmp_path: Path) -> None:
    cases = door_mutants(tmp_path)
    good = mutant(tmp_path, "good", good_dataset(1))
    statuses = raw_store(node.port, [p for p, _ in cases.values()] + [good])
    got = dict(zip(cases, statuses, strict=False))
    assert got == {name: want for name, (_, want) in cases.items()}
    assert statuses[-1] == 0x0000  # the node keeps serving
    assert node.count() == 1
    assert len(node.files()) == 1
    refused = node.audits("instance.refused")
    assert len(refused) == len(cases)
    assert all(r.details and r.details["status"] in ("0xA900", "0xC000") and r.details["reason"] for r in refused)
    uid65 = [r for r in refused if "65 characters" in r.details["reason"]]
    assert len(uid65) == 1


def test_a_65_character_sop_instance_uid_is_refused(node: Node, tmp_path: Path) -> None:
    """pynetdicom will not even send it; dcmtk's storescu does (its request carries the UID cut to 64)."""
    import subprocess

    from tests.support.tools import require_tool

    require_tool("storescu")
    ds = good_dataset()
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498." + "1" * 39
    assert len(ds.SOPInstanceUID) == 65
    f = mutant(tmp_path, "uid65", ds)
    r = subprocess.run(
        ["storescu", "-v", "-aet", "STORESCU", "-aec", "LESIONTRACK", "127.0.0.1", str(node.port), str(f)],
        capture_output=True,
        timeout=60,
    )
    assert b"DataSetDoesNotMatchSOPClass" in r.stdout + r.stderr  # 0xA900
    assert node.count() == 0
    assert node.files() == []
    (refused,) = node.audits("instance.refused")
    assert refused.details
    assert refused.details["status"] == "0xA900"
    assert "65 characters" in refused.details["reason"]


def test_encapsulated_pixel_data_under_a_native_transfer_syntax_is_refused(node: Node, tmp_path: Path) -> None:
    src = j2k_series(tmp_path / "j2k")[0]
    ds = dcmread(src, stop_before_pixels=True)
    bad = part10(tmp_path / "encaps_native.dcm", dataset_bytes(src), sop_class=str(ds.SOPClassUID),
                 sop_uid=str(ds.SOPInstanceUID), ts=EXPLICIT)  # fmt: skip
    assert raw_store(node.port, [bad, src]) == [0xC000, 0x0000]


def test_pixel_data_inconsistent_with_rows_and_columns_is_refused_at_the_door(node: Node, tmp_path: Path) -> None:
    series_uid = generate_uid()
    files = []
    for i in range(4):
        ds = good_dataset(i)
        ds.SeriesInstanceUID = series_uid
        if i == 2:
            ds.Rows = 600  # Pixel Data no longer Rows x Columns x BitsAllocated/8 bytes long
        files.append(mutant(tmp_path, f"px{i}", ds))
    assert pynetdicom_store(node.port, files) == [0, 0, 0xA900, 0]
    assert "Pixel Data is" in node.audits("instance.refused")[0].details["reason"]


def test_a_series_with_a_missing_slice_waits_then_is_skipped_visibly_and_a_late_slice_lifts_it(
    node: Node, tmp_path: Path
) -> None:
    uid, files = _series(tmp_path, 8)
    late = files.pop(4)  # one slice in the middle does not arrive
    storescu(node.port, files, "PYSCU")
    wait_until(lambda: node.series_state(uid) == SeriesState.COMPLETE, what="completion after the window")
    s = node.series(uid)
    assert s is not None
    assert s.routing_decision == RoutingDecision.SKIP
    assert (s.routing_reason or "").startswith("slice gap: about 1 slice(s) missing"), s.routing_reason
    assert node.triggers == []
    skip = [a for a in node.audits("series.complete") if a.details["decision"] == "skip"]
    assert skip
    assert skip[-1].details["reason_code"] == "slice_gap"
    assert node.scp.force_complete(uid).decision == RoutingDecision.SKIP  # forcing does not fill the gap
    storescu(node.port, [late], "PYSCU")  # the missing slice arrives late: the series re-opens and completes
    wait_until(lambda: node.triggers == [uid], what="analysis once the series is whole")


def test_instances_that_disagree_on_orientation_are_not_one_volume(node: Node, tmp_path: Path) -> None:
    uid, files = _series(tmp_path, 5)
    ds = good_dataset(5)
    ds.SeriesInstanceUID = uid
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal slice in an axial series
    files.append(mutant(tmp_path, "sagittal", ds))
    storescu(node.port, files, "PYSCU")
    wait_until(lambda: node.series_state(uid) == SeriesState.COMPLETE, what="completion")
    s = node.series(uid)
    assert s is not None
    assert s.routing_decision == RoutingDecision.SKIP
    assert (s.routing_reason or "").startswith("inconsistent geometry")
    assert "ImageOrientationPatient" in (s.routing_reason or "")
    assert node.triggers == []


def _series(tmp_path: Path, n: int, **attrs: object) -> tuple[str, list[Path]]:
    uid = generate_uid()
    files = []
    for i in range(n):
        ds = good_dataset(i)
        ds.SeriesInstanceUID = uid
        for k, v in attrs.items():
            setattr(ds, k, v)
        files.append(mutant(tmp_path, f"{uid[-6:]}_{i}", ds))
    return uid, files


def test_aborted_transfer_is_not_analysed_until_forced(node: Node, tmp_path: Path) -> None:
    uid, files = _series(tmp_path, 8)
    assert pynetdicom_store(node.port, files, abort_after=5) == [0] * 5
    wait_until(lambda: node.series_state(uid) == SeriesState.COMPLETE, what="completion")
    s = node.series(uid)
    assert s is not None
    assert s.last_transfer == TransferOutcome.ABORTED
    assert s.routing_decision == RoutingDecision.SKIP
    assert "incomplete transfer" in (s.routing_reason or "")
    assert all(i.transfer_incomplete for i in node.instances())
    assert node.audits("series.transfer_aborted")
    assert node.triggers == []
    route = node.scp.force_complete(uid)  # the operator decides the fragment is what there is
    assert route is not None
    assert route.decision == RoutingDecision.ANALYSE
    assert node.triggers == [uid]


def test_dropped_connection_holds_the_series_and_a_released_resend_of_duplicates_lifts_it(
    node: Node, tmp_path: Path
) -> None:
    import socket

    from pynetdicom import AE

    uid, files = _series(tmp_path, 5)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CT, EXPLICIT)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LESIONTRACK")
    assert assoc.is_established
    for f in files:
        assert assoc.send_c_store(dcmread(f)).Status == 0
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # the sender dies: no A-RELEASE, no A-ABORT
    assoc.kill()
    wait_until(lambda: node.series_state(uid) == SeriesState.COMPLETE, what="completion")
    s = node.series(uid)
    assert s is not None
    assert s.last_transfer == TransferOutcome.ABORTED
    assert s.routing_decision == RoutingDecision.SKIP
    assert node.triggers == []
    # the sender re-sends the same five instances (all duplicates) and releases: the transfer is now confirmed
    storescu(node.port, files, "PYSCU")
    wait_until(lambda: node.triggers == [uid], what="analysis after a released re-send")
    assert node.series(uid).last_transfer == TransferOutcome.RELEASED


def test_fewer_instances_than_images_in_acquisition_are_held(node: Node, tmp_path: Path) -> None:
    uid, files = _series(tmp_path, 4, ImagesInAcquisition=6)
    storescu(node.port, files, "PYSCU")
    wait_until(lambda: node.series_state(uid) == SeriesState.COMPLETE, what="completion")
    s = node.series(uid)
    assert s is not None
    assert s.expected_instances == 6
    assert s.last_transfer == TransferOutcome.RELEASED
    assert "4 of 6 instances" in (s.routing_reason or "")
    assert node.triggers == []


def test_incomplete_transfers_can_be_analysed_when_configured(tmp_path: Path) -> None:
    n = Node(tmp_path, allowed_calling_aes=["PYSCU"], series_quiet_seconds=1.0, analyse_incomplete_transfers=True)
    n.settings.routing.min_slices = 3
    with n.scp:
        uid, files = _series(tmp_path, 6)
        assert pynetdicom_store(n.port, files, abort_after=4) == [0] * 4
        wait_until(lambda: n.triggers == [uid], what="analysis of the fragment (configured)")
    n.engine.dispose()
