"""Where the tests find the repository and ../shared data, and how they require a tool: skip on a developer
machine that lacks it, fail in CI (CI=true), which installs them all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("LESIONTRACK_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip on a developer machine that lacks something the test needs — but fail in CI, which provides it."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def require_tool(*names: str) -> None:
    """Skip when a command-line tool is missing — but fail in CI, which installs them all."""
    missing = [n for n in names if shutil.which(n) is None and not Path(n).exists()]
    if missing:
        unavailable(f"required tool(s) not installed: {', '.join(missing)} (.ci/run installs them)")


def require_shared_data(*relative: str) -> Path:
    """Path inside ../shared/data; skip outside CI if absent, fail in CI."""
    path = SHARED_DATA.joinpath(*relative)
    if not path.exists():
        unavailable(f"test data missing: {path}")
    return path
