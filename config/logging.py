"""Logging set-up: plain or JSON lines; patient identifiers are kept out of INFO and above.

Code logs UIDs and internal keys only. As a safety net, :class:`PhiFilter` masks the values of
DICOM attributes that identify a patient if a message at INFO or above ever carries ``PatientName=...``
or ``PatientID=...`` style text. Values from the wire are never logged by libraries either:
:func:`install_library_filters` puts :class:`WireValueFilter` on pydicom's logger (whose warnings quote the value
that failed to parse, e.g. a Patient Name sent with the VR UI) and routes Python warnings into logging
(pydicom's, which repeat its log records, are dropped there), so every library message passes our filters.
:class:`ControlCharFilter` escapes control characters (a calling AE title with NUL bytes, say), so a log stays
text.

Log context: :func:`log_context` / :func:`update_log_context` set ``job``, ``series_uid``, ``step`` and ``peer`` in a
context variable (per thread / task); :class:`ContextFilter` copies them onto every record, so JSON lines can be
filtered per job or per peer. The job runner sets job/series/step, the Storage SCP the peer of an association.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

CONTEXT_FIELDS = ("job", "series_uid", "step", "peer")
# an immutable (key, value) tuple, replaced on every change
_CONTEXT: ContextVar[tuple[tuple[str, object], ...]] = ContextVar("lesiontrack_log_context", default=())


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Every log record made in this block (same thread / task) carries ``fields``; None values are left out."""
    token = _CONTEXT.set(_merged(fields))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def update_log_context(**fields: object) -> None:
    """Add or change context fields until the enclosing :func:`log_context` block ends (e.g. the current step)."""
    _CONTEXT.set(_merged(fields))


def current_log_context() -> dict[str, object]:
    return dict(_CONTEXT.get())


def _merged(fields: dict[str, object]) -> tuple[tuple[str, object], ...]:
    out = dict(_CONTEXT.get())
    out.update((k, v) for k, v in fields.items() if v is not None)
    return tuple(out.items())


class ContextFilter(logging.Filter):
    """Copies the current log context onto the record (fields the call passed in ``extra`` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


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


_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"")
_PYDICOM_VALUE = re.compile(r"(Invalid value for VR \w{2})\b.*", re.S)


def withhold_values(message: str) -> str:
    """A library's message with every quoted value replaced (values from the wire may be PHI)."""
    return _QUOTED.sub("'<value withheld>'", _PYDICOM_VALUE.sub(r"\1 (value withheld)", message))


class WireValueFilter(logging.Filter):
    """On library loggers (pydicom, py.warnings): quoted values in a record are withheld, at every level;
    pydicom's own warnings arriving through py.warnings are dropped (pydicom logs each one as well)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.name == "py.warnings" and "/pydicom/" in msg:
            return False
        masked = withhold_values(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        return True


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def escape_control(text: str) -> str:
    """Control characters (except newline and tab) as ``\\xNN`` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def printable(value: object) -> str:
    """A value from the wire (an AE title, say) fit for a log line or a column: every control character,
    newline included, escaped; surrounding spaces stripped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", str(value)).strip()


class ControlCharFilter(logging.Filter):
    """Escapes control characters in the message, so a value with NUL bytes cannot turn the log into binary."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if _CONTROL.search(msg):
            record.msg, record.args = escape_control(msg), None
        return True


_library_filters_installed = False


def install_library_filters() -> None:
    """Route Python warnings into logging and put :class:`WireValueFilter` on the loggers libraries use for
    values from the wire (idempotent; :func:`setup_logging` and the Storage SCP call it)."""
    global _library_filters_installed
    if _library_filters_installed:
        return
    _library_filters_installed = True
    logging.captureWarnings(True)
    f = WireValueFilter()
    for name in ("pydicom", "py.warnings"):
        logging.getLogger(name).addFilter(f)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _OurHandler(logging.StreamHandler[TextIO]):
    """The stderr handler setup_logging installs (replaced, not stacked, when called again)."""


#: third-party loggers kept at ``library_level`` (WARNING unless asked): alembic prints ~14 lines per start,
#: highdicom one "copy attributes" line per SEG/SR module, pynetdicom one per PDU at DEBUG
LIBRARY_LOGGERS = ("alembic", "highdicom", "pynetdicom", "urllib3", "httpx", "PIL", "matplotlib", "celery", "kombu")


def setup_logging(level: str = "INFO", json_format: bool = False, library_level: str = "WARNING") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _OurHandler):
            root.removeHandler(h)
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_format else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handler.addFilter(ContextFilter())
    handler.addFilter(PhiFilter())
    handler.addFilter(ControlCharFilter())
    install_library_filters()
    root.addHandler(handler)
    root.setLevel(level)
    lib = logging.getLevelName(library_level.upper())
    for noisy in LIBRARY_LOGGERS:  # never chattier than asked, never chattier than our own level by default
        logging.getLogger(noisy).setLevel(lib if lib < logging.WARNING else max(lib, root.level))
