"""docs/conformance.md agrees with the code: the SOP classes and transfer syntaxes it lists for the SCP are exactly
those the Storage SCP's AE accepts (in the acceptor's order of preference), the SCU classes it names are the ones the
SCU code proposes, and the PS3.2 sections are all there."""

from __future__ import annotations

import re
from pathlib import Path

from lesiontrack.config.version import IMPLEMENTATION_VERSION_NAME, VERSION
from lesiontrack.dicom_node.conformance import implementation_markdown, markdown, scp_contexts, scu_sop_classes

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"


def _section(text: str, name: str) -> str:
    m = re.search(rf"<!-- BEGIN {name} -->(.*?)<!-- END {name} -->", text, flags=re.S)
    assert m, f"section {name} missing"
    return m.group(1)


def _uids(text: str) -> list[str]:
    return re.findall(r"`(1\.2\.840\.10008[0-9.]*)`", text)


def test_scp_sop_classes_and_transfer_syntaxes_match_the_scp() -> None:
    text = DOC.read_text()
    contexts = scp_contexts()
    assert _uids(_section(text, "scp-sop-classes")) == [c.sop_class for c in contexts]
    storage = [c for c in contexts if c.sop_class != "1.2.840.10008.1.1"]
    assert _uids(_section(text, "scp-transfer-syntaxes")) == list(storage[0].transfer_syntaxes)
    # and the generated tables are what the page embeds, byte for byte
    assert markdown() in text


def test_statement_names_this_version() -> None:
    """The statement describes the installed version: on a release, regenerate it (dicom_node/conformance.py)."""
    block = _section(DOC.read_text(), "implementation")
    assert implementation_markdown() in DOC.read_text()
    assert f"LesionTrack {VERSION} " in block
    assert f"`{IMPLEMENTATION_VERSION_NAME}`" in block


def test_scp_accepts_what_this_product_is_about() -> None:
    accepted = {c.sop_class for c in scp_contexts()}
    for uid in (
        "1.2.840.10008.1.1",  # Verification
        "1.2.840.10008.5.1.4.1.1.2",  # CT
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    ):
        assert uid in accepted, uid


def test_scu_classes_named_in_the_statement() -> None:
    text = DOC.read_text()
    for service, uids in scu_sop_classes().items():
        if service.startswith("Storage SCP role"):
            continue  # listed by name in the C-GET paragraph
        for uid in uids:
            assert f"`{uid}`" in text, (service, uid)


def test_ps32_structure() -> None:
    headings = re.findall(r"^#{2,4} (.+)$", DOC.read_text(), flags=re.M)
    for needed in (
        "1. Overview",
        "3. Introduction",
        "4. Networking",
        "4.1 Implementation model",
        "4.2.1 SOP classes as SCP",
        "4.2.2 SOP classes as SCU",
        "4.2.3 Association policies",
        "4.3 Network interfaces",
        "6. Support of character sets",
        "7. Security",
        "8.1 IOD contents of created objects",
    ):
        assert any(h.startswith(needed) for h in headings), needed
