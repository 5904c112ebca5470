"""Logging set-up: plain or JSON lines; patient identifiers are kept out of INFO and above.

Code logs UIDs and internal keys only. As a safety net, :class:`PhiFilter` masks the values of
DICOM attributes that identify a patient if a message at INFO or above ever carries ``PatientName=...``
or ``PatientID=...`` style text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

_PHI = re.compile(
    r"(?P<k>Patient(?:Name|ID|BirthDate|Address)|patient_(?:name|id))(?P<sep>\s*[=:]\s*)(?P<v>'[^']*'|\"[^\"]*\"|\S+)"
)


class PhiFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            msg = record.getMessage()
            masked = _PHI.sub(lambda m: f"{m['k']}{m['sep']}***", msg)
            if masked != msg:
                record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("job", "series_uid", "step", "peer"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


#: third-party loggers kept at ``library_level`` (WARNING unless asked): alembic prints ~14 lines per start,
#: highdicom one "copy attributes" line per SEG/SR module, pynetdicom one per PDU at DEBUG
LIBRARY_LOGGERS = ("alembic", "highdicom", "pynetdicom", "urllib3", "httpx", "PIL", "matplotlib", "celery", "kombu")


def setup_logging(level: str = "INFO", json_format: bool = False, library_level: str = "WARNING") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_lesiontrack", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._lesiontrack = True  # type: ignore[attr-defined]
    handler.setFormatter(
        JsonFormatter() if json_format else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handler.addFilter(PhiFilter())
    root.addHandler(handler)
    root.setLevel(level)
    lib = logging.getLevelName(library_level.upper())
    for noisy in LIBRARY_LOGGERS:  # never chattier than asked, never chattier than our own level by default
        logging.getLogger(noisy).setLevel(lib if lib < logging.WARNING else max(lib, root.level))
