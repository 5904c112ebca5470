"""The one version LesionTrack reports, taken from the installed package's metadata (pyproject ``version``).

``lesiontrack --version``, the Implementation Version Name our associations send, the SoftwareVersions of every
SEG/SR we write and the conformance statement all read it from here, so a release changes it in one place.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

PACKAGE_NAME = "lesiontrack"
SOFTWARE_NAME = "LesionTrack"
# Implementation Version Name (0002,0013) and the A-ASSOCIATE item 55H: 1-16 characters of the default repertoire
_IMPLEMENTATION_PREFIX = "LTRACK_"
_MAX_IMPLEMENTATION_VERSION = 16


def package_version() -> str:
    """The installed distribution's version; ``0.0.0+local`` when the code runs from a tree that was never
    installed (no metadata to read)."""
    try:
        return version(PACKAGE_NAME)
    except PackageNotFoundError:
        return "0.0.0+local"


def implementation_version_name(package: str) -> str:
    """``LTRACK_<version>`` cut to 16 characters: the local part (``+...``) is dropped and characters outside
    letters, digits, ``.``, ``_`` and ``-`` become ``_``, as the DICOM default repertoire allows."""
    public = re.sub(r"[^A-Za-z0-9._-]", "_", package.split("+", 1)[0])
    return (_IMPLEMENTATION_PREFIX + public)[:_MAX_IMPLEMENTATION_VERSION]


VERSION = package_version()
IMPLEMENTATION_VERSION_NAME = implementation_version_name(VERSION)
# Our Implementation Class UID: fixed across versions (the version travels in the name), under pydicom's root,
# derived deterministically from the product name.
IMPLEMENTATION_CLASS_UID = generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[f"{SOFTWARE_NAME} implementation"])
