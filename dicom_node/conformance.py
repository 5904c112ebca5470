"""What the DICOM node negotiates, read from the code that negotiates it — the source of the tables in
docs/conformance.md and of its implementation identification (``python -m lesiontrack.dicom_node.conformance`` prints
them; tests/test_conformance.py checks the document against these functions)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import UID

from lesiontrack.config.settings import Settings
from lesiontrack.config.version import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, SOFTWARE_NAME, VERSION
from lesiontrack.dicom_node.inbound.scp import StorageSCP
from lesiontrack.dicom_node.outbound.scu import GET_STORAGE_CLASSES


@dataclass(frozen=True)
class Context:
    sop_class: str
    transfer_syntaxes: tuple[str, ...]

    @property
    def name(self) -> str:
        return UID(self.sop_class).name


def scp_contexts() -> list[Context]:
    """Presentation contexts the Storage SCP accepts (its AE, as ``lesiontrack serve`` builds it)."""
    ae = StorageSCP._make_ae(_Shim(Settings()))  # type: ignore[arg-type]  # _make_ae reads only .settings
    return [Context(str(cx.abstract_syntax), tuple(str(t) for t in cx.transfer_syntax)) for cx in ae.supported_contexts]


class _Shim:
    """Just enough of a StorageSCP for ``_make_ae`` (no database, no store)."""

    def __init__(self, settings: object) -> None:
        self.settings = settings


def scu_sop_classes() -> dict[str, list[str]]:
    """SOP classes proposed as SCU, by service."""
    return {
        "Verification": ["1.2.840.10008.1.1"],
        "Query (C-FIND)": ["1.2.840.10008.5.1.4.1.2.2.1"],
        "Retrieve (C-MOVE)": ["1.2.840.10008.5.1.4.1.2.2.2"],
        "Retrieve (C-GET)": ["1.2.840.10008.5.1.4.1.2.2.3"],
        "Storage SCP role on C-GET associations": list(GET_STORAGE_CLASSES),
        "Storage (C-STORE of our results)": ["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"],
    }


def implementation_markdown() -> str:
    """The implementation identification of docs/conformance.md: product version, Implementation Class UID and
    Implementation Version Name, as every association and every file we write carries them (config/version.py)."""
    return "\n".join(
        [
            "<!-- BEGIN implementation -->",
            "| Item | Value |",
            "|---|---|",
            f"| Product, version | {SOFTWARE_NAME} {VERSION} (SoftwareVersions of every SEG/SR written) |",
            f"| Implementation Class UID | `{IMPLEMENTATION_CLASS_UID}` |",
            f"| Implementation Version Name | `{IMPLEMENTATION_VERSION_NAME}` |",
            "<!-- END implementation -->",
        ]
    )


def markdown() -> str:
    """The SCP tables of docs/conformance.md (between its BEGIN/END markers)."""
    contexts = scp_contexts()
    storage = [c for c in contexts if c.sop_class != "1.2.840.10008.1.1"]
    ts = storage[0].transfer_syntaxes
    assert all(c.transfer_syntaxes == ts for c in storage), "one transfer syntax list for every storage class"
    lines = ["<!-- BEGIN scp-sop-classes -->", "| SOP Class | UID |", "|---|---|"]
    lines += [f"| {c.name} | `{c.sop_class}` |" for c in contexts]
    lines += ["<!-- END scp-sop-classes -->", "", "<!-- BEGIN scp-transfer-syntaxes -->"]
    lines += ["| # | Transfer Syntax | UID |", "|---|---|---|"]
    lines += [f"| {i} | {UID(t).name} | `{t}` |" for i, t in enumerate(ts, 1)]
    lines += ["<!-- END scp-transfer-syntaxes -->"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(implementation_markdown())
    print()
    print(markdown())
