"""Opening the configured database for the DICOM node's entry points, refusing a schema that is not at head."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings


class SchemaNotCurrent(RuntimeError):
    """The database has not been migrated to the code's head revision."""


def open_database(settings: Settings, upgrade_db: bool = False) -> sessionmaker[Session]:
    from db.session import current_revision, head_revision, make_engine, make_session_factory, upgrade

    url = settings.effective_database_url
    if upgrade_db:
        upgrade(url)
    rev = current_revision(url)
    if rev != head_revision():
        raise SchemaNotCurrent(
            f"database schema is at {rev or '(empty)'}, not {head_revision()}: run `lesiontrack db upgrade` first"
        )
    return make_session_factory(make_engine(url))
