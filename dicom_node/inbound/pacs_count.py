"""How many instances of a series the PACS holds: what the PACS tells, used to decide that a transfer is whole.

DICOM has no "series done" message, but a PACS answers a C-FIND (or QIDO-RS) at SERIES level with
NumberOfSeriesRelatedInstances. Completion (:mod:`dicom_node.inbound.completion`) asks the peer that sent a series when
the transfer's end is in doubt (an association that ended without A-RELEASE, a trigger without a count); prior
retrieval (:mod:`dicom_node.outbound.priors`) compares what it indexed with it. A peer is asked only when it is
configured
(``[[pacs]]`` with ``query = true``) and, for a received series, is its sender (calling AE title).
"""

from __future__ import annotations

import logging

from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import PacsPeer, RetrieveMethod, Settings
from lesiontrack.db.models import Instance, Series, Study
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.outbound.scu import find

log = logging.getLogger(__name__)


def remote_series_count(settings: Settings, peer: PacsPeer, study_uid: str, series_uid: str) -> int | None:
    """NumberOfSeriesRelatedInstances of one series on ``peer`` (None: not reported, or the query failed)."""
    try:
        if peer.retrieve_method == RetrieveMethod.DICOMWEB and peer.dicomweb_url:
            res = DICOMwebClient(url=peer.dicomweb_url).search_for_series(
                study_instance_uid=study_uid,
                fields=["NumberOfSeriesRelatedInstances"],
                search_filters={"SeriesInstanceUID": series_uid},
            )
            rows = [Dataset.from_json(r) for r in res]
        else:
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid
            q.NumberOfSeriesRelatedInstances = ""
            rows = [r for r in find(settings, peer, q) if str(r.get("SeriesInstanceUID", "")) == series_uid]
    except Exception as exc:
        log.warning("cannot count series %s on %s: %s", series_uid, peer.name, exc)
        return None
    for r in rows:
        v = r.get("NumberOfSeriesRelatedInstances")
        try:
            return int(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None
    return None


def sending_peer(settings: Settings, s: Session, series: Series) -> PacsPeer | None:
    """The configured, queryable peer whose AE title sent instances of ``series`` (None if none)."""
    aes = set(s.scalars(select(Instance.sender_ae).where(Instance.series_pk == series.id).distinct()))
    for peer in settings.pacs:
        if peer.query and peer.ae_title in aes:
            return peer
    return None


def count_from_sender(settings: Settings, session_factory: sessionmaker[Session], series_uid: str) -> int | None:
    """NumberOfSeriesRelatedInstances the peer that sent ``series_uid`` reports (None: unknown)."""
    if not settings.dicom.confirm_counts_with_pacs:
        return None
    with session_scope(session_factory) as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            return None
        study = s.get(Study, series.study_pk)
        peer = sending_peer(settings, s, series)
        if study is None or peer is None:
            return None
        study_uid = study.study_instance_uid
    n = remote_series_count(settings, peer, study_uid, series_uid)
    log.debug("series %s: %s reports %s instances", series_uid, peer.name, n)
    return n


def held_count(s: Session, series_uid: str) -> int:
    """Distinct SOP instances of ``series_uid`` that have a row here (a re-sent copy counts once)."""
    return int(
        s.scalar(
            select(func.count(func.distinct(Instance.sop_instance_uid)))
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
        )
        or 0
    )
