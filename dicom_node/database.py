"""Opening the configured database for the DICOM node's entry points, refusing a schema that is not at head
and (for the service) a database it cannot write to."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import Settings
from lesiontrack.db.session import current_revision, head_revision, make_engine, make_session_factory, upgrade


class SchemaNotCurrent(RuntimeError):
    """The database has not been migrated to the code's head revision."""


class DatabaseUnavailable(RuntimeError):
    """The database cannot be opened at all."""


class DatabaseNotWritable(DatabaseUnavailable):
    """The database (or its folder) is read-only, or another process holds a lock on it."""


def _check_sqlite_files(url: str) -> None:
    """A read-only SQLite file or folder (mode bits, or a read-only file system, which binds root too)."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    for target in (path, path.parent):
        if target.exists() and not os.access(target, os.W_OK):
            kind = "file" if target == path else "folder"
            raise DatabaseNotWritable(
                f"database {kind} {target} is read-only: LesionTrack must write to it (and to its -wal/-shm files)"
            )


def check_writable(engine: Engine, url: str, lock_wait_seconds: float = 5.0) -> None:
    """Try a write (rolled back) so a read-only or locked database stops the service at start-up with a clear
    message, instead of every C-STORE failing later with Out of Resources."""
    where = engine.url.render_as_string(hide_password=True)
    _check_sqlite_files(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text(f"PRAGMA busy_timeout={int(lock_wait_seconds * 1000)}"))
            conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
            conn.rollback()
    except SQLAlchemyError as exc:
        msg = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        low = msg.lower()
        if "locked" in low or "lock" in low:
            why = f"is locked by another process (waited {lock_wait_seconds:g} s)"
        elif "read-only" in low or "readonly" in low or "read only" in low:
            why = "is read-only"
        else:
            why = f"refuses writes ({msg})"
        raise DatabaseNotWritable(f"database {where} {why}: LesionTrack must write to it") from exc


def open_database(
    settings: Settings, upgrade_db: bool = False, require_writable: bool = False
) -> sessionmaker[Session]:
    url = settings.effective_database_url
    if require_writable:
        _check_sqlite_files(url)
    try:
        if upgrade_db:
            upgrade(url)
        rev = current_revision(url)
    except SQLAlchemyError as exc:
        if not require_writable:
            raise
        msg = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        where = url.split("@")[-1] if "@" in url else url
        raise DatabaseUnavailable(f"cannot open database {where}: {msg}") from exc
    if rev != head_revision():
        raise SchemaNotCurrent(
            f"database schema is at {rev or '(empty)'}, not {head_revision()}: run `lesiontrack db upgrade` first"
        )
    engine = make_engine(url)
    if require_writable:
        try:
            check_writable(engine, url)
        except DatabaseNotWritable:
            engine.dispose()
            raise
    return make_session_factory(engine)
