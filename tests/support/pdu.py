"""Raw DICOM upper-layer traffic for the door's guard tests: an A-ASSOCIATE-RQ by hand, a bare socket, the reply
PDU's type, and an echo with its own timeouts."""

from __future__ import annotations

import socket
import struct

ATTACKER = "127.0.0.2"  # Linux routes all of 127/8 to loopback: a second peer address without a network


def associate_rq(called: str = "LESIONTRACK", calling: str = "STORESCU", context_id: int = 1) -> bytes:
    """A well-formed A-ASSOCIATE-RQ for Verification, with ``context_id`` patched in (even IDs are invalid)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    p = A_ASSOCIATE()
    p.application_context_name = "1.2.840.10008.3.1.1.1"
    p.calling_ae_title, p.called_ae_title = calling, called
    cx = build_context("1.2.840.10008.1.1")
    cx.context_id = 1
    p.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    p.user_information = [ml]
    raw = bytearray(A_ASSOCIATE_RQ(p).encode())
    pos = 74  # items after the fixed part
    while pos < len(raw):
        item_type, item_len = raw[pos], struct.unpack(">H", raw[pos + 2 : pos + 4])[0]
        if item_type == 0x20:
            raw[pos + 4] = context_id
        pos += 4 + item_len
    return bytes(raw)


def connect(port: int, source: str = ATTACKER) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(30)
    return s


def reply_type(s: socket.socket) -> int | None:
    """The type of the first PDU the node sends back (None: connection closed without a reply)."""
    try:
        data = s.recv(16)
    except ConnectionResetError:
        return None
    return data[0] if data else None


def echo(port: int, aec: str = "LESIONTRACK") -> int:
    """echoscu with its own ACSE/DIMSE timeouts: success means it got through within them."""
    from tests.support.tools import require_tool

    require_tool("echoscu")
    import subprocess

    return subprocess.run(
        ["echoscu", "-to", "15", "-ta", "15", "-td", "15", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=60,
    ).returncode
