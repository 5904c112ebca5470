"""Ingest ceiling without pynetdicom's reactor: would dropping it reach the 0.5× storescp single-association target?

A measuring instrument, not product code. One thread per association reads PDUs from a blocking socket and
answers each C-STORE with Success, storing nothing — the cheapest a Python receiver can be. Every DICOM
structure is still decoded and encoded by pynetdicom (A-ASSOCIATE, P-DATA-TF and its PDVs, DIMSE command sets);
what is left out is pynetdicom's two polling threads per association and its state machine. Runs alternate with
dcmtk ``storescp +B`` (the anchor) and, optionally, with a variant that also does the per-instance work our SCP
must do before answering Success using the product's ``dicom_node.inbound.ingest.Ingestor`` (since issue 18: the door
checks and the durable write; the row, hash bookkeeping and completion follow in its background indexer, whose CPU
shares the machine). Prints one JSON document.

    .venv/bin/python bench/ingest_socket_floor.py [--instances 320] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, A_RELEASE_RP, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    A_RELEASE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context, negotiate_as_acceptor

from bench.ingest import SOURCE, Storescp, make_series, run_senders

if TYPE_CHECKING:
    from lesiontrack.dicom_node.inbound.ingest import Ingestor

Handler = Callable[[FileMetaDataset, bytes], int]
_SUPPORTED = [
    build_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    for cx in AllStoragePresentationContexts
]


def _read_exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ConnectionError("peer closed the connection")
    return data


def _accept(conn: socket.socket, f) -> dict[int, str]:
    header = _read_exactly(f, 6)
    rq = A_ASSOCIATE_RQ()
    rq.decode(header + _read_exactly(f, struct.unpack(">I", header[2:])[0]))
    request = rq.to_primitive()
    results = negotiate_as_acceptor(request.presentation_context_definition_list, _SUPPORTED)[0]
    ac = A_ASSOCIATE()
    ac.application_context_name = request.application_context_name
    ac.calling_ae_title, ac.called_ae_title = request.calling_ae_title, request.called_ae_title
    ac.result = 0x00
    ac.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 0
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.10.1183.99"
    ac.user_information = [max_length, impl]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    conn.sendall(pdu.encode())
    return {cx.context_id: cx.transfer_syntax[0] for cx in results if cx.result == 0 and cx.context_id is not None}


def _serve(conn: socket.socket, handler: Handler) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = conn.makefile("rb", buffering=1 << 20)
    try:
        syntaxes = _accept(conn, f)
        message = C_STORE_RQ()
        while True:
            header = _read_exactly(f, 6)
            body = _read_exactly(f, struct.unpack(">I", header[2:])[0])
            if header[0] == 0x05:  # A-RELEASE-RQ
                rp = A_RELEASE_RP()
                rp.from_primitive(A_RELEASE())
                conn.sendall(rp.encode())
                return
            if header[0] != 0x04:  # anything but P-DATA: give up
                return
            pdata = P_DATA_TF()
            pdata.decode(header + body)
            if not message.decode_msg(pdata.to_primitive()):
                continue
            context_id, request = message.context_id, message.message_to_primitive()
            message = C_STORE_RQ()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(str(request.AffectedSOPClassUID))
            meta.MediaStorageSOPInstanceUID = UID(str(request.AffectedSOPInstanceUID))
            meta.TransferSyntaxUID = UID(syntaxes[context_id or 0])
            response = C_STORE()
            response.MessageIDBeingRespondedTo = request.MessageID
            response.AffectedSOPClassUID = request.AffectedSOPClassUID
            response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
            response.Status = handler(meta, request.DataSet.getvalue())
            rsp = C_STORE_RSP()
            rsp.primitive_to_message(response)
            for primitive in rsp.encode_msg(context_id, 0):
                out = P_DATA_TF()
                out.from_primitive(primitive)
                conn.sendall(out.encode())
    except ConnectionError:
        pass
    finally:
        conn.close()


def _ingest_status(ingestor: Ingestor, meta: FileMetaDataset, data: bytes) -> int:
    return ingestor.ingest(meta, data, calling_ae="BENCH").status


class SocketFloor:
    """A listening socket; one thread per association; ``handler`` answers every C-STORE."""

    def __init__(self, name: str, handler: Handler) -> None:
        self.name, self.handler, self.count = name, handler, 0

    def __enter__(self) -> SocketFloor:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._loop, daemon=True).start()
        return self

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn, self._counted), daemon=True).start()

    def _counted(self, meta: FileMetaDataset, data: bytes) -> int:
        status = self.handler(meta, data)
        self.count += status == 0
        return status

    def received(self) -> int:
        return self.count

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    from lesiontrack.db.session import make_engine, make_session_factory, upgrade
    from lesiontrack.dicom_node.inbound.ingest import Ingestor
    from lesiontrack.dicom_node.inbound.storage import InstanceStore

    tmp = Path(tempfile.mkdtemp(prefix="lt-bench-socket-floor-"))
    try:
        files = make_series(tmp / "series", args.instances, args.source)
        mb = sum(p.stat().st_size for p in files) / 1e6
        runs: dict[str, list[float]] = {}
        for rep in range(args.repeats):
            url = f"sqlite:///{tmp / f'lt{rep}.sqlite3'}"
            upgrade(url)
            ingestor = Ingestor(InstanceStore(tmp / f"data{rep}", fsync=False), make_session_factory(make_engine(url)))
            receivers = (
                Storescp(tmp, fork=False),
                SocketFloor("socket loop, no-op handler", lambda m, d: 0),
                SocketFloor(
                    "socket loop + LesionTrack Ingestor",
                    functools.partial(_ingest_status, ingestor),
                ),
            )
            for recv in receivers:
                with recv:
                    secs, rcs = run_senders(recv.port, [files], "LESIONTRACK")
                    if recv.received() != args.instances or any(rcs):
                        raise SystemExit(f"{recv.name}: {recv.received()} of {args.instances} received, rc {rcs}")
                runs.setdefault(recv.name, []).append(round(args.instances / secs, 1))
            ingestor.close()
            shutil.rmtree(tmp / f"data{rep}", ignore_errors=True)
        median = {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
        anchor = median[Storescp.name]
        print(
            json.dumps(
                {
                    "benchmark": "ingest_socket_floor",
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                        "load_average": os.getloadavg(),
                    },
                    "series": {"instances": args.instances, "megabytes": round(mb, 1)},
                    "instances_per_s": runs,
                    "median_instances_per_s": median,
                    "ratio_to_storescp": {name: round(v / anchor, 3) for name, v in median.items()},
                },
                indent=1,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
