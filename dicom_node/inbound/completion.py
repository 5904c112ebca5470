"""Series completion: quiet period with no open association still sending, forced completion, re-open on late data.

DICOM has no "series done" signal, so (like mercure, MONAI Informatics Gateway and Orthanc's StableAge) a series
is complete once ``series_quiet_seconds`` passed without a new instance *and* no association that sent part of it
is still open. Completing a series records the routing decision on it and, when the decision is ANALYSE, calls
the injected ``on_series_complete(series_uid)``. A later instance re-opens the series (see
``dicom_node.inbound.indexer``)
and its next completion triggers again.

The state this needs lives in the database, not in a process (issue 18): the open associations per series are
:class:`db.models.OpenTransfer` rows (written by the indexer with the association's first instance of the
series — from the journal of the receiver process that served it, see :mod:`dicom_node.inbound.journal` — removed when
it ends, reaped when that process dies), the last instance time is ``series.last_received_at``. So
a series sent over associations that different receiver processes serve completes once, in the process that
polls (the service's main process).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import RoutingSettings
from lesiontrack.db.models import (
    CompletionRequest,
    Instance,
    OpenTransfer,
    RoutingDecision,
    Series,
    SeriesState,
    TransferOutcome,
)
from lesiontrack.db.repository import audit
from lesiontrack.db.session import session_scope
from lesiontrack.dicom_node.inbound.integrity import INCOMPLETE, first_header, hold_code, hold_reason
from lesiontrack.dicom_node.inbound.pacs_count import held_count
from lesiontrack.dicom_node.inbound.routing import Route, decide, series_facts

if TYPE_CHECKING:
    from lesiontrack.dicom_node.inbound.sink import IndexSink

log = logging.getLogger(__name__)

#: the annotation objects a person leaves (pipeline.dicom.annotations.refs.PRIOR_ANNOTATION_MODALITIES; not imported:
#: receiver processes load this module without the pipeline)
ANNOTATION_MODALITIES = ("SEG", "SR", "PR", "RTSTRUCT")

SeriesCallback = Callable[[str], None]
#: series UID -> the instance count the PACS that sent it reports (None: unknown); see dicom_node.inbound.pacs_count
CountSource = Callable[[str], "int | None"]


def _still_quiet(s: Session, series: Series, quiet_seconds: float) -> bool:
    cutoff = datetime.now(UTC) - timedelta(seconds=quiet_seconds)
    last = series.last_received_at
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    if last is not None and last > cutoff:
        return False
    return s.scalar(select(OpenTransfer.pid).where(OpenTransfer.series_uid == series.series_instance_uid)) is None


@dataclass(frozen=True)
class CompletionChecks:
    """What :func:`complete_series` checks before a series routed to ANALYSE is analysed."""

    analyse_incomplete: bool = False  # analyse a transfer that looks incomplete instead of holding it
    validate: bool = True  # parse every stored instance first (dicom_node.inbound.integrity)
    quiet_seconds: float | None = None  # still quiet that long when it completes (None: not checked)
    pacs_count: int | None = None  # the instance count the PACS reports (None: not told)
    count_source: CountSource | None = None  # asked for that count when the transfer's end is in doubt


_DEFAULT_CHECKS = CompletionChecks()


def complete_series(
    session_factory: sessionmaker[Session],
    rules: RoutingSettings,
    series_uid: str,
    on_series_complete: SeriesCallback | None = None,
    *,
    forced: bool = False,
    actor: str = "dicom-node",
    on_annotation_complete: SeriesCallback | None = None,
    checks: CompletionChecks = _DEFAULT_CHECKS,
) -> Route | None:
    """Mark one series complete, record the routing decision and trigger analysis when routed.

    ``checks.pacs_count`` is the instance count the PACS says the series has (a completion trigger's count, a C-FIND's
    NumberOfSeriesRelatedInstances); when the transfer's end is in doubt (its last association ended without
    A-RELEASE, or is still open) and no count was given, ``checks.count_source`` is asked for it. With every reported
    instance indexed, the transfer is whole however its associations ended.

    An annotation series (SEG, SR, GSPS, RTSTRUCT) that is not ours goes to ``on_annotation_complete`` (a reader's
    correction of a follow-up we analysed is verified tracking, an annotation arriving after results it changes
    re-analyses them, :mod:`pipeline.jobs.verification`) whatever the routing rules say of CT analysis.

    A series routed to ANALYSE is held (SKIP, with the reason) when its transfer looks incomplete or an instance
    is invalid (:mod:`dicom_node.inbound.integrity`). Returns None when the series is unknown, or (unless ``forced``)
    when
    it is already complete with nothing received since, e.g. because an operator forced its completion from
    another process.
    """
    pacs_count = checks.pacs_count
    if (
        pacs_count is None
        and checks.count_source is not None
        and not forced
        and _transfer_in_doubt(session_factory, series_uid)
    ):
        pacs_count = checks.count_source(series_uid)
    with session_scope(session_factory) as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            return None
        if not forced and series.state == SeriesState.COMPLETE:
            return None
        if checks.quiet_seconds is not None and not _still_quiet(s, series, checks.quiet_seconds):
            return None  # an instance or an association arrived since the poll chose it
        retrigger = series.completed_at is not None
        route = _route(s, series, rules, forced=forced, analyse_incomplete=checks.analyse_incomplete,
                       validate=checks.validate, pacs_count=pacs_count)  # fmt: skip
        # a SEG/SR a person made — in a series of its own, or saved into one of ours (OHIF, docs/viewer.md)
        annotation = (series.modality or "").upper() in ANNOTATION_MODALITIES and (
            not series.created_by_us or _holds_person_object(s, series)
        )
        series.state = SeriesState.COMPLETE
        series.completed_at = datetime.now(UTC)
        series.routing_decision = route.decision
        series.routing_reason = route.reason
        audit(s, actor, "series.complete", "series", series_uid, decision=route.decision.value, reason=route.reason,
              reason_code=route.code, forced=forced, instance_count=series.instance_count, pacs_count=pacs_count,
              retrigger=retrigger)  # fmt: skip
    log.info(
        "series %s complete (%s%s): %s - %s",
        series_uid,
        "forced, " if forced else "",
        "re-trigger" if retrigger else "first",
        route.decision.value,
        route.reason,
    )
    callback = on_series_complete if route.decision == RoutingDecision.ANALYSE else None
    if callback is None and annotation and on_annotation_complete is not None:
        callback = on_annotation_complete
    if callback is not None:
        _trigger(session_factory, actor, series_uid, callback)
    return route


def _route(
    s: Session,
    series: Series,
    rules: RoutingSettings,
    *,
    forced: bool,
    analyse_incomplete: bool,
    validate: bool,
    pacs_count: int | None,
) -> Route:
    """The routing rules' decision for a completed series; one routed to ANALYSE is held (SKIP, with the
    reason) when its transfer looks incomplete or an instance is invalid."""
    route = decide(series_facts(s, series), rules)
    if route.decision == RoutingDecision.ANALYSE:
        hold = hold_reason(
            s, series, first_header(s, series), forced=forced, analyse_incomplete=analyse_incomplete,
            validate=validate, pacs_count=pacs_count, held=held_count(s, series.series_instance_uid),
        )  # fmt: skip
        if hold:
            route = Route(RoutingDecision.SKIP, hold, hold_code(hold))
    return route


def _trigger(session_factory: sessionmaker[Session], actor: str, series_uid: str, callback: SeriesCallback) -> None:
    """Run the series-complete callback; a failure is logged and audited, never raised to the completer."""
    try:
        callback(series_uid)
    except Exception as exc:
        log.exception("series-complete callback (%s) failed", series_uid)
        with session_scope(session_factory) as s:
            audit(s, actor, "series.trigger_failed", "series", series_uid, error=str(exc)[:500])


def _series_known(session_factory: sessionmaker[Session], series_uid: str) -> bool:
    with session_scope(session_factory) as s:
        return s.scalar(select(Series.id).where(Series.series_instance_uid == series_uid)) is not None


def _transfer_in_doubt(session_factory: sessionmaker[Session], series_uid: str) -> bool:
    """The series' last association ended without A-RELEASE or is still open: worth asking the PACS's count."""
    with session_scope(session_factory) as s:
        outcome = s.scalar(select(Series.last_transfer).where(Series.series_instance_uid == series_uid))
    return outcome in (TransferOutcome.ABORTED, TransferOutcome.OPEN)


def _holds_person_object(s: Session, series: Series) -> bool:
    # lazy: importing pipeline.jobs.verification adds ~1.2 s to the DICOM door's start-up (measured); only a
    # SEG/SR series needs it
    from lesiontrack.pipeline.jobs.verification import holds_person_object

    return holds_person_object(s, series)


@dataclass(frozen=True)
class TriggerOutcome:
    """What a completion trigger did: the series completed now (``route``), or it is remembered until the
    instances the PACS sent are indexed (``pending``), or nothing (already complete, nothing received since)."""

    route: Route | None
    pending: bool
    known: bool  # the series has a row (some instance of it was indexed)
    indexed: int  # distinct instances indexed when answered
    expected: int | None  # what the PACS said it sent (None: not told)


def request_completion(
    session_factory: sessionmaker[Session],
    series_uid: str,
    expected_instances: int | None,
    wait_seconds: float,
    actor: str = "pacs-trigger",
) -> None:
    """Remember a PACS's "series is stable" signal (durably: another process may answer it, and a restart
    keeps it) until :func:`answer_request` completes the series or its bound runs out."""
    now = datetime.now(UTC)
    with session_scope(session_factory) as s:
        req = s.get(CompletionRequest, series_uid)
        if req is None:
            s.add(
                CompletionRequest(
                    series_uid=series_uid,
                    expected_instances=expected_instances,
                    requested_at=now,
                    deadline_at=now + timedelta(seconds=wait_seconds),
                    actor=actor[:64],
                )
            )
        else:
            if expected_instances is not None:
                req.expected_instances = expected_instances
            req.requested_at, req.deadline_at = now, now + timedelta(seconds=wait_seconds)


def pending_requests(session_factory: sessionmaker[Session]) -> list[str]:
    with session_scope(session_factory) as s:
        return list(s.scalars(select(CompletionRequest.series_uid).order_by(CompletionRequest.requested_at)))


def answer_request(
    session_factory: sessionmaker[Session],
    rules: RoutingSettings,
    series_uid: str,
    on_series_complete: SeriesCallback | None = None,
    *,
    analyse_incomplete: bool = False,
    validate: bool = True,
    on_annotation_complete: SeriesCallback | None = None,
    count_source: CountSource | None = None,
) -> TriggerOutcome | None:
    """Complete a requested series (:func:`request_completion`) when what its PACS sent is indexed — the count it
    gave, or, without one, once no association is still delivering the series — or when the request's bound ran
    out (then with the true reason of a hold). None when there is no request for it."""
    now = datetime.now(UTC)
    with session_scope(session_factory) as s:
        req = s.get(CompletionRequest, series_uid)
        if req is None:
            return None
        expected, actor = req.expected_instances, req.actor
        overdue = _aware(req.deadline_at) <= now
        series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            if overdue:
                s.delete(req)
                audit(s, actor, "series.trigger_expired", "series", series_uid, expected_instances=expected,
                      reason="no instance of the series was received")  # fmt: skip
                log.warning("completion trigger for unknown series %s expired: nothing received", series_uid)
            return TriggerOutcome(None, pending=not overdue, known=False, indexed=0, expected=expected)
        held = held_count(s, series_uid)
        enough = expected is not None and held >= expected
        if series.state == SeriesState.COMPLETE and (expected is None or enough):
            s.delete(req)  # already complete with everything: nothing new (idempotent)
            return TriggerOutcome(None, pending=False, known=True, indexed=held, expected=expected)
        still_open = s.scalar(select(OpenTransfer.pid).where(OpenTransfer.series_uid == series_uid)) is not None
        ready = enough if expected is not None else (series.instance_count > 0 and not still_open)
        if not ready and not overdue:
            return TriggerOutcome(None, pending=True, known=True, indexed=held, expected=expected)
        s.delete(req)
    route = complete_series(
        session_factory,
        rules,
        series_uid,
        on_series_complete,
        actor=actor,
        on_annotation_complete=on_annotation_complete,
        checks=CompletionChecks(
            analyse_incomplete=analyse_incomplete,
            validate=validate,
            pacs_count=expected,
            count_source=None if expected is not None else count_source,
        ),
    )
    if not ready:
        log.warning("series %s: completion trigger's wait ran out; completed with %d of %s instances",
                    series_uid, held, expected if expected is not None else "?")  # fmt: skip
    return TriggerOutcome(route, pending=False, known=True, indexed=held, expected=expected)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class TransferTracker:
    """How each association of this receiver ended, handed to its :class:`dicom_node.inbound.sink.IndexSink` (the record
    is in the database every process shares).

    The open-transfer rows themselves are written by the indexer, in the transaction that indexes an
    association's first instance of a series (:class:`db.models.OpenTransfer`); an association's end follows
    the instances it delivered: this process's indexer first commits them, then records the outcome and removes
    its rows; a receiver process's journal gets a line after theirs, and the service process reads both in that
    order (:class:`dicom_node.inbound.journal.JournalTailer`).
    """

    def __init__(self, sink: IndexSink):
        self.sink = sink

    def association_released(self, association_uid: str | None) -> None:
        """The peer asked to release (A-RELEASE-RQ): its transfer is complete. Recorded before our A-RELEASE-RP
        goes out, so a node killed right after the sender finished does not count the transfer as dropped."""
        if association_uid:
            self.sink.association_ended(association_uid, released=True)

    def association_closed(self, association_uid: str | None, released: bool | None = None) -> None:
        """The association ended; ``released`` False = A-ABORT or dropped connection (None: not known)."""
        if association_uid and released is not None:
            self.sink.association_ended(association_uid, released=released)


def end_transfers(
    session_factory: sessionmaker[Session], association_uids: list[str], released: bool, actor: str = "dicom-node"
) -> list[str]:
    """Record the end of associations: their series' last transfer, on an abort their instances marked as from
    an incomplete transfer, held series re-sent over a release re-opened; their open-transfer rows removed.
    Returns the series they had delivered."""
    with session_scope(session_factory) as s:
        series_uids = sorted(
            set(s.scalars(select(OpenTransfer.series_uid).where(OpenTransfer.association_uid.in_(association_uids))))
        )
        if not series_uids:
            return []
        outcome = TransferOutcome.RELEASED if released else TransferOutcome.ABORTED
        s.execute(
            update(Series)
            .where(Series.series_instance_uid.in_(series_uids))
            .values(last_transfer=outcome)
            .execution_options(synchronize_session=False)
        )
        if released:
            _requeue_held(s, series_uids, actor)
        else:
            marked = s.execute(
                update(Instance)
                .where(Instance.association_uid.in_(association_uids))
                .values(transfer_incomplete=True)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]  # an UPDATE returns a CursorResult; stubs say Result
            for uid in series_uids:
                audit(s, actor, "series.transfer_aborted", "series", uid, instances_marked=marked)
        s.execute(
            delete(OpenTransfer)
            .where(OpenTransfer.association_uid.in_(association_uids))
            .execution_options(synchronize_session=False)
        )
    if not released:
        log.warning(
            "association ended without A-RELEASE: %d series marked as incompletely transferred", len(series_uids)
        )
    return series_uids


def reap_transfers(
    session_factory: sessionmaker[Session],
    pids: list[int] | None = None,
    actor: str = "dicom-node",
    alive: set[int] | None = None,
) -> int:
    """Open transfers of receiver processes that are gone end as dropped: those of ``pids`` (None = all, at
    start-up), or of every process not in ``alive`` (the periodic safety net)."""
    with session_scope(session_factory) as s:
        q = select(OpenTransfer.association_uid).distinct()
        if pids is not None:
            q = q.where(OpenTransfer.pid.in_(pids))
        if alive is not None:
            q = q.where(OpenTransfer.pid.not_in(sorted(alive)))
        assocs = sorted(set(s.scalars(q)))
    if assocs:
        end_transfers(session_factory, assocs, released=False, actor=actor)
    return len(assocs)


def _requeue_held(s: Session, series_uids: list[str], actor: str) -> None:
    """Series held for an incomplete transfer and now re-sent (even as duplicates only) over a released
    association are re-opened, so they complete again after a fresh quiet period."""
    held = list(
        s.scalars(
            select(Series).where(
                Series.series_instance_uid.in_(series_uids),
                Series.state == SeriesState.COMPLETE,
                Series.routing_reason.like(f"{INCOMPLETE}%"),
            )
        )
    )
    now = datetime.now(UTC)
    for h in held:
        h.state = SeriesState.RECEIVING
        h.last_received_at = now
        audit(s, actor, "series.reopened", "series", h.series_instance_uid,
              reason="re-sent over an association that ended with A-RELEASE")  # fmt: skip


@dataclass(frozen=True)
class CompletionHooks:
    """What a :class:`SeriesCompletion` calls: the series callbacks, the settle before completing, housekeeping."""

    on_series_complete: SeriesCallback | None = None  # a series routed to ANALYSE completed
    on_annotation_complete: SeriesCallback | None = None  # a SEG/SR a person made completed
    settle: Callable[[], object] | None = None  # commits what was acknowledged but not indexed yet
    housekeeping: Callable[[], None] | None = None  # run by the poll every ``housekeeping_seconds``
    housekeeping_seconds: float = 30.0


class SeriesCompletion:
    """Completes quiet series from the state in the database (open transfers, last instance time), so it is
    correct whichever receiver process delivered which part; one background thread polls."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        rules: RoutingSettings,
        quiet_seconds: float,
        hooks: CompletionHooks | None = None,
        *,
        checks: CompletionChecks = _DEFAULT_CHECKS,
        actor: str = "dicom-node",
        clock: Callable[[], float] = time.monotonic,
        trigger_wait_seconds: float = 120.0,
    ) -> None:
        hooks = hooks or CompletionHooks()
        self.on_annotation_complete = hooks.on_annotation_complete
        #: asks the PACS that sent a series how many instances it has (dicom_node.inbound.pacs_count)
        self.count_source = checks.count_source
        self.trigger_wait_seconds = trigger_wait_seconds
        #: commits what was acknowledged but not indexed yet; called before a series would complete, so none
        #: completes while instances of it that the receivers acknowledged still wait for their rows
        self.settle = hooks.settle
        self.analyse_incomplete = checks.analyse_incomplete
        self.validate = checks.validate
        self.session_factory = session_factory
        self.rules = rules
        self.quiet_seconds = quiet_seconds
        self.on_series_complete = hooks.on_series_complete
        self.actor = actor
        self.clock = clock
        self.housekeeping = hooks.housekeeping
        self.housekeeping_seconds = hooks.housekeeping_seconds
        self._not_before = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- completion --------------------------------------------------------------------------------------------
    def due(self) -> list[str]:
        """Series receiving, quiet for ``quiet_seconds`` and with no association still delivering them."""
        if self.clock() < self._not_before:
            return []
        cutoff = datetime.now(UTC) - timedelta(seconds=self.quiet_seconds)
        with session_scope(self.session_factory) as s:
            return list(
                s.scalars(
                    select(Series.series_instance_uid).where(
                        Series.state == SeriesState.RECEIVING,
                        Series.instance_count > 0,
                        Series.last_received_at <= cutoff,
                        ~exists().where(OpenTransfer.series_uid == Series.series_instance_uid),
                        # a PACS's trigger governs the series it names (answer_request), bounded by its deadline
                        ~exists().where(CompletionRequest.series_uid == Series.series_instance_uid),
                    )
                )
            )

    def poll_once(self) -> list[str]:
        done = []
        with self._lock:
            requested = pending_requests(self.session_factory)
            due = self.due()
            if (due or requested) and self.settle is not None:
                self.settle()
                due = self.due()
            for uid in requested:
                try:
                    outcome = self.answer_request(uid)
                    if outcome is not None and outcome.route is not None:
                        done.append(uid)
                except Exception:
                    log.exception("answering the completion trigger of %s failed; will retry", uid)
            for uid in due:
                try:
                    if complete_series(
                        self.session_factory,
                        self.rules,
                        uid,
                        self.on_series_complete,
                        actor=self.actor,
                        on_annotation_complete=self.on_annotation_complete,
                        checks=CompletionChecks(
                            analyse_incomplete=self.analyse_incomplete,
                            validate=self.validate,
                            quiet_seconds=self.quiet_seconds,
                            count_source=self.count_source,
                        ),
                    ):
                        done.append(uid)
                except Exception:
                    log.exception("completing series %s failed; will retry", uid)
        return done

    def force_complete(self, series_uid: str) -> Route | None:
        return complete_series(
            self.session_factory,
            self.rules,
            series_uid,
            self.on_series_complete,
            forced=True,
            actor=self.actor,
            on_annotation_complete=self.on_annotation_complete,
            checks=CompletionChecks(analyse_incomplete=self.analyse_incomplete, validate=self.validate),
        )

    def trigger(
        self, series_uid: str, actor: str = "pacs-trigger", expected_instances: int | None = None
    ) -> TriggerOutcome:
        """An explicit "series is stable" signal (a PACS's OnStableSeries, ``POST /api/series/{uid}/complete``):
        complete as soon as what the PACS sent is indexed instead of after the quiet period.

        What the receivers acknowledged is committed first; then the series completes at once when the
        ``expected_instances`` the PACS names (or, without one, the count a C-FIND to the sending PACS reports)
        are indexed — or, with no count at all, when no association is still delivering it. Otherwise the signal
        is remembered (:class:`db.models.CompletionRequest`) and answered by the poll within a second of the last
        instance, at the latest after ``dicom.trigger_wait_seconds`` (then completed with the true reason of a
        hold). A series not yet known is remembered the same way. Idempotent: a series already complete with
        every expected instance answers ``route=None, pending=False`` and queues no second job."""
        if self.settle is not None:
            self.settle()
        expected = expected_instances
        if expected is None and self.count_source is not None and _series_known(self.session_factory, series_uid):
            expected = self.count_source(series_uid)
        request_completion(self.session_factory, series_uid, expected, self.trigger_wait_seconds, actor)
        with self._lock:
            outcome = self.answer_request(series_uid)
        assert outcome is not None
        return outcome

    def answer_request(self, series_uid: str) -> TriggerOutcome | None:
        """See :func:`answer_request`."""
        return answer_request(
            self.session_factory,
            self.rules,
            series_uid,
            self.on_series_complete,
            analyse_incomplete=self.analyse_incomplete,
            validate=self.validate,
            on_annotation_complete=self.on_annotation_complete,
            count_source=self.count_source,
        )

    def resume_from_db(self) -> int:
        """At start-up (no receiver runs yet): open transfers left by a stop or a crash count as dropped, and
        series left RECEIVING complete no earlier than a fresh quiet period from now."""
        reap_transfers(self.session_factory, None, self.actor)
        with session_scope(self.session_factory) as s:
            s.execute(
                update(Series)
                .where(Series.last_transfer == TransferOutcome.OPEN)
                .values(last_transfer=TransferOutcome.ABORTED)
                .execution_options(synchronize_session=False)
            )
            n = int(
                s.scalar(
                    select(func.count())
                    .select_from(Series)
                    .where(Series.state == SeriesState.RECEIVING, Series.instance_count > 0)
                )
                or 0
            )
        self._not_before = self.clock() + self.quiet_seconds
        return n

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        interval = min(1.0, max(0.05, self.quiet_seconds / 5))

        def loop() -> None:
            last_housekeeping = self.clock()
            while not self._stop.wait(interval):
                try:
                    self.poll_once()
                except Exception:
                    log.exception("series completion poll failed")
                if self.housekeeping is not None and self.clock() - last_housekeeping >= self.housekeeping_seconds:
                    last_housekeeping = self.clock()
                    try:
                        self.housekeeping()
                    except Exception:
                        log.exception("receiver housekeeping failed")

        self._thread = threading.Thread(target=loop, name="series-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
