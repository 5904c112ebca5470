"""JSON API routes: jobs (list, detail, retry, re-analyse), patients → studies → series, lesions with observations,
timelines, exports, result files and the read-only audit trail. URLs carry internal ids and DICOM UIDs only."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lesiontrack.db.models import (
    AnalysisJob,
    AuditEvent,
    Instance,
    JobState,
    Lesion,
    Patient,
    RoutingDecision,
    Series,
    SeriesState,
    Study,
)
from lesiontrack.db.repository import audit
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs import candidates, verification
from lesiontrack.pipeline.science.recist import RecistRules
from lesiontrack.pipeline.views import exports
from lesiontrack.pipeline.views.history import PatientTimeline, build_timeline
from lesiontrack.web import schemas as sc
from lesiontrack.web.auth import Principal, require_operator, require_read
from lesiontrack.web.jobcontrol import CorrectionIntake, JobControl, SeriesControl
from lesiontrack.web.params import INT64_MAX, DbId

log = logging.getLogger(__name__)


def recist_rules(request: Request) -> RecistRules:
    """The RECIST thresholds of the running service's ``[recist]`` settings (the API's and the dashboard's)."""
    return RecistRules.from_settings(request.app.state.settings.recist)


router = APIRouter(prefix="/api", dependencies=[Depends(require_read)])
Operator = Annotated[Principal, Depends(require_operator)]


T = TypeVar("T")


def _not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"{what} not found")


def _found(row: T | None, what: str) -> T:
    """The row looked up, or a 404 '<what> not found'."""
    if row is None:
        raise _not_found(what)
    return row


@contextmanager
def _control_answers(what: str) -> Iterator[None]:
    """A control's refusals as HTTP answers: KeyError → 404 '<what> not found', ValueError → 409 with its message."""
    try:
        yield
    except KeyError as exc:
        raise _not_found(what) from exc
    except ValueError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc


def _session(request: Request) -> Iterator[Session]:
    """The request's transaction (commit on success, roll back on error), ended before the response is sent."""
    with session_scope(request.app.state.session_factory) as s:
        yield s


#: a route's database session (one transaction around the route function)
Db = Annotated[Session, Depends(_session, scope="function")]


def _patient(s: Db, patient_pk: DbId) -> Patient:
    return _found(s.get(Patient, patient_pk), f"patient {patient_pk}")


#: the patient of a ``{patient_pk}`` path, or a 404
PatientRow = Annotated[Patient, Depends(_patient)]


# -- jobs ---------------------------------------------------------------------------------------------
@router.get("/jobs", response_model=sc.JobList, tags=["jobs"], summary="List analysis jobs (newest first)")
def list_jobs(
    s: Db,
    state: JobState | None = None,
    series_uid: str | None = None,
    patient: int | None = Query(None, ge=0, le=INT64_MAX, description="internal patient id"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=INT64_MAX),
    include_superseded: bool = Query(
        False, description="also list jobs a newer job of the same series superseded (hidden by default)"
    ),
) -> sc.JobList:
    q = select(AnalysisJob)
    if not include_superseded and state is not JobState.SUPERSEDED:
        q = q.where(AnalysisJob.superseded_by.is_(None))
    if state is not None:
        q = q.where(AnalysisJob.state == state)
    if series_uid:
        q = q.where(AnalysisJob.followup_series_uid == series_uid)
    if patient is not None:
        q = q.where(AnalysisJob.patient_pk == patient)
    total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = s.scalars(q.order_by(AnalysisJob.id.desc()).offset(offset).limit(limit))
    counts = {st.value: 0 for st in JobState}
    for st, n in s.execute(select(AnalysisJob.state, func.count(AnalysisJob.id)).group_by(AnalysisJob.state)):
        counts[JobState(st).value] = n
    return sc.JobList(total=total, items=[sc.JobSummary.of(j) for j in rows], counts=counts)


@router.get(
    "/jobs/{job_id}",
    response_model=sc.JobDetail,
    tags=["jobs"],
    summary="One job with its steps, step timings, outputs and audit events",
)
def get_job(s: Db, job_id: DbId) -> sc.JobDetail:
    job = _found(s.get(AnalysisJob, job_id), f"job {job_id}")
    events = s.scalars(
        select(AuditEvent)
        .where(AuditEvent.object_type == "job", AuditEvent.object_id == str(job_id))
        .order_by(AuditEvent.id)
    )
    return sc.JobDetail.detail(job, list(events))


def _job_control(request: Request) -> JobControl:
    control = request.app.state.job_control
    if control is None:
        raise HTTPException(status_code=503, detail="job control is not available in this process")
    return control


@router.post(
    "/jobs/{job_id}/retry",
    status_code=202,
    response_model=sc.JobQueued,
    tags=["jobs"],
    summary="Re-run a finished job as a new job (operator role)",
)
def retry_job(request: Request, job_id: DbId, who: Operator) -> sc.JobQueued:
    control = _job_control(request)
    with session_scope(request.app.state.session_factory) as s:
        _found(s.get(AnalysisJob, job_id), f"job {job_id}")
    with _control_answers(f"job {job_id}"):
        new_id = control.retry(job_id)
    with session_scope(request.app.state.session_factory) as s:
        audit(s, who.actor, "api.job_retry", "job", job_id, new_job_id=new_id)
    log.info("job %s retried by %s as job %s", job_id, who.actor, new_id)
    return sc.JobQueued(job_id=new_id, detail=f"job {job_id} re-queued as job {new_id}")


@router.post(
    "/series/{series_uid}/reanalyse",
    status_code=202,
    response_model=sc.JobQueued,
    tags=["jobs"],
    summary="Queue a new analysis of a follow-up series (operator role)",
)
def reanalyse_series(request: Request, series_uid: str, who: Operator) -> sc.JobQueued:
    control = _job_control(request)
    with session_scope(request.app.state.session_factory) as s:
        _found(s.scalar(select(Series.id).where(Series.series_instance_uid == series_uid)), f"series {series_uid}")
    with _control_answers(f"series {series_uid}"):
        job_id = control.reanalyse(series_uid)
    with session_scope(request.app.state.session_factory) as s:
        audit(s, who.actor, "api.series_reanalyse", "series", series_uid, job_id=job_id)
    log.info("series %s re-analysis requested by %s: job %s", series_uid, who.actor, job_id)
    return sc.JobQueued(job_id=job_id, detail=f"series queued for analysis as job {job_id}")


# -- patients → studies → series ------------------------------------------------------------------------
def _patient_out(s: Session, p: Patient) -> sc.PatientOut:
    studies = s.scalar(select(func.count(Study.id)).where(Study.patient_pk == p.id)) or 0
    lesions = s.scalar(select(func.count(Lesion.id)).where(Lesion.patient_pk == p.id)) or 0
    latest = s.scalar(select(func.max(Study.study_date)).where(Study.patient_pk == p.id))
    return sc.PatientOut(
        id=p.id,
        patient_id=p.patient_id,
        issuer=p.issuer,
        study_count=studies,
        lesion_count=lesions,
        latest_study_date=latest,
    )


@router.get(
    "/patients",
    response_model=list[sc.PatientOut],
    tags=["patients"],
    summary="Patients (internal ids; no names are stored)",
)
def list_patients(
    s: Db, limit: int = Query(200, ge=1, le=5000), offset: int = Query(0, ge=0, le=INT64_MAX)
) -> list[sc.PatientOut]:
    return [_patient_out(s, p) for p in s.scalars(select(Patient).order_by(Patient.id).offset(offset).limit(limit))]


@router.get("/patients/{patient_pk}", response_model=sc.PatientOut, tags=["patients"])
def get_patient(s: Db, patient: PatientRow) -> sc.PatientOut:
    return _patient_out(s, patient)


@router.get(
    "/patients/{patient_pk}/studies",
    response_model=list[sc.StudyOut],
    tags=["patients"],
    summary="A patient's studies with their series, oldest first",
)
def patient_studies(s: Db, patient: PatientRow) -> list[sc.StudyOut]:
    studies = s.scalars(
        select(Study).where(Study.patient_pk == patient.id).order_by(Study.study_date, Study.study_time, Study.id)
    )
    return [sc.StudyOut.of(st) for st in studies]


@router.get("/studies/{study_uid}", response_model=sc.StudyOut, tags=["patients"])
def get_study(s: Db, study_uid: str) -> sc.StudyOut:
    return sc.StudyOut.of(
        _found(s.scalar(select(Study).where(Study.study_instance_uid == study_uid)), f"study {study_uid}")
    )


@router.get("/studies/{study_uid}/series", response_model=list[sc.SeriesOut], tags=["patients"])
def study_series(s: Db, study_uid: str) -> list[sc.SeriesOut]:
    return get_study(s, study_uid).series


SERIES_STATES = ("skipped", "analysed", "pending", "receiving", "complete")


@router.get(
    "/series",
    response_model=sc.SeriesList,
    tags=["patients"],
    summary="Received series, newest first; state=skipped lists every series the routing rules skipped, with why",
)
def list_series(
    s: Db,
    state: str | None = Query(None, description="skipped | analysed | pending | receiving | complete"),
    since: datetime | None = Query(None, description="completed at or after (ISO 8601)"),
    include_own: bool = Query(False, description="also list LesionTrack's own SEG/SR series"),
    limit: int = Query(200, ge=1, le=5000),
    offset: int = Query(0, ge=0),
) -> sc.SeriesList:
    q = select(Series)
    if state is not None:
        if state not in SERIES_STATES:
            raise HTTPException(status_code=422, detail=f"state must be one of {', '.join(SERIES_STATES)}")
        q = q.where(
            {
                "skipped": Series.routing_decision == RoutingDecision.SKIP,
                "analysed": Series.routing_decision == RoutingDecision.ANALYSE,
                "pending": Series.routing_decision == RoutingDecision.PENDING,
                "receiving": Series.state == SeriesState.RECEIVING,
                "complete": Series.state == SeriesState.COMPLETE,
            }[state]
        )
    if not include_own:
        q = q.where(Series.created_by_us.is_(False))
    if since is not None:
        q = q.where(Series.completed_at >= since)
    total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = s.scalars(q.order_by(Series.id.desc()).offset(offset).limit(limit))
    return sc.SeriesList(total=total, items=[sc.SeriesOut.of(r) for r in rows])


def _series_control(request: Request) -> SeriesControl:
    control = request.app.state.job_control
    if not isinstance(control, SeriesControl):
        raise HTTPException(status_code=503, detail="series control is not available in this process")
    return control


@router.post(
    "/series/{series_uid}/complete",
    response_model=sc.SeriesCompleted,
    tags=["jobs"],
    summary="Completion trigger: the PACS says the series is stable; route it now, no quiet period (operator role)",
)
def complete_series_now(
    request: Request,
    response: Response,
    series_uid: str,
    who: Operator,
    expected_instances: int | None = Query(
        None,
        ge=1,
        le=1_000_000,
        description="how many instances of the series the PACS sent (Orthanc's Lua: the series' instance count); "
        "the series completes once that many are indexed. Without it LesionTrack asks the sending PACS by C-FIND, "
        "or waits for the associations delivering the series to end",
    ),
) -> sc.SeriesCompleted:
    control = _series_control(request)
    done = control.complete_series(series_uid, expected_instances)
    with session_scope(request.app.state.session_factory) as s:
        se = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        pending = done is not None and done.pending
        audit(s, who.actor, "api.series_complete", "series", series_uid, completed=done is not None and not pending,
              pending=pending, expected_instances=expected_instances)  # fmt: skip
        decision = se.routing_decision.value if se is not None else "pending"
        reason = se.routing_reason if se is not None else None
    if done is not None and done.pending:
        response.status_code = 202
        told = f"{done.expected_instances}" if done.expected_instances is not None else "all"
        return sc.SeriesCompleted(
            series_instance_uid=series_uid,
            completed=False,
            pending=True,
            indexed_instances=done.indexed,
            expected_instances=done.expected_instances,
            routing_decision=decision,
            routing_reason=reason,
            detail=f"accepted: completes once {told} instances are indexed ({done.indexed or 0} so far)",
        )
    if done is None:
        return sc.SeriesCompleted(
            series_instance_uid=series_uid,
            completed=False,
            routing_decision=decision,
            routing_reason=reason,
            detail="already complete; nothing received since",
        )
    return sc.SeriesCompleted(
        series_instance_uid=series_uid,
        completed=True,
        indexed_instances=done.indexed,
        expected_instances=done.expected_instances,
        routing_decision=done.decision,
        routing_reason=done.reason,
        job_id=done.job_id,
        detail=f"{done.decision}: {done.reason}",
    )


@router.post(
    "/series/{series_uid}/analyse",
    status_code=202,
    response_model=sc.JobQueued,
    tags=["jobs"],
    summary="Analyse anyway: queue a series the routing rules skipped (operator role)",
)
def analyse_anyway(request: Request, series_uid: str, who: Operator) -> sc.JobQueued:
    control = _series_control(request)
    with _control_answers(f"series {series_uid}"):
        job_id = control.analyse_anyway(series_uid, who.actor)
    return sc.JobQueued(job_id=job_id, detail=f"skipped series queued for analysis as job {job_id}")


@router.get(
    "/series/{series_uid}",
    response_model=sc.SeriesDetail,
    tags=["patients"],
    summary="One series with its routing decision and analysis jobs",
)
def get_series(s: Db, series_uid: str) -> sc.SeriesDetail:
    se = _found(s.scalar(select(Series).where(Series.series_instance_uid == series_uid)), f"series {series_uid}")
    jobs = s.scalars(
        select(AnalysisJob).where(AnalysisJob.followup_series_uid == series_uid).order_by(AnalysisJob.id.desc())
    )
    return sc.SeriesDetail(**sc.SeriesOut.of(se).model_dump(), jobs=[sc.JobSummary.of(j) for j in jobs])


# -- lesions ---------------------------------------------------------------------------------------------
@router.get(
    "/patients/{patient_pk}/lesions",
    response_model=list[sc.LesionOut],
    tags=["lesions"],
    summary="A patient's lesions, each with all its observations",
)
def patient_lesions(s: Db, patient: PatientRow) -> list[sc.LesionOut]:
    lesions = s.scalars(select(Lesion).where(Lesion.patient_pk == patient.id).order_by(Lesion.id))
    return [sc.LesionOut.of(lesion) for lesion in lesions]


@router.get("/lesions/{lesion_id}", response_model=sc.LesionOut, tags=["lesions"])
def get_lesion(s: Db, lesion_id: DbId) -> sc.LesionOut:
    return sc.LesionOut.of(_found(s.get(Lesion, lesion_id), f"lesion {lesion_id}"))


@router.get("/lesions/by-tracking-uid/{tracking_uid}", response_model=sc.LesionOut, tags=["lesions"])
def get_lesion_by_uid(s: Db, tracking_uid: str) -> sc.LesionOut:
    lesion = s.scalar(select(Lesion).where(Lesion.tracking_uid == tracking_uid))
    return sc.LesionOut.of(_found(lesion, f"lesion with Tracking UID {tracking_uid}"))


def _timeline(request: Request, s: Session, patient_pk: int) -> PatientTimeline:
    try:
        return build_timeline(s, patient_pk, recist_rules(request))
    except KeyError as exc:
        raise _not_found(f"patient {patient_pk}") from exc


@router.get(
    "/patients/{patient_pk}/timeline",
    tags=["lesions"],
    summary="Lesions × timepoints with measurements, change and RECIST 1.1 per timepoint",
)
def patient_timeline(request: Request, s: Db, patient_pk: DbId) -> dict[str, Any]:
    return _timeline(request, s, patient_pk).to_dict()


@router.get(
    "/observations/{observation_id}/thumbnail.png",
    tags=["lesions"],
    response_class=Response,
    summary="PNG: axial CT slice through the lesion with its contour",
)
def observation_thumbnail(request: Request, observation_id: DbId) -> Response:
    try:
        png = request.app.state.images.observation_thumbnail(observation_id)
    except KeyError as exc:
        raise _not_found(f"observation {observation_id}") from exc
    return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})


@router.get(
    "/lesions/{lesion_id}/plot.png",
    tags=["lesions"],
    response_class=Response,
    summary="PNG: the lesion's volume and long axis over time",
)
def lesion_plot(request: Request, lesion_id: DbId) -> Response:
    try:
        png = request.app.state.images.lesion_plot(lesion_id)
    except KeyError as exc:
        raise _not_found(f"lesion {lesion_id}") from exc
    return Response(png, media_type="image/png", headers={"cache-control": "no-store"})


# -- exports -------------------------------------------------------------------------------------------
def _timeline_and_subject(request: Request, s: Session, patient_pk: int) -> tuple[PatientTimeline, str]:
    p = _patient(s, patient_pk)
    return build_timeline(s, patient_pk, recist_rules(request)), p.patient_id


def _download(text: str, media_type: str, filename: str) -> Response:
    return Response(text, media_type=media_type, headers={"content-disposition": f'attachment; filename="{filename}"'})


@router.get(
    "/patients/{patient_pk}/export/lesions.csv",
    tags=["exports"],
    response_class=Response,
    summary="CSV: one row per lesion per timepoint",
)
def export_lesions_csv(request: Request, s: Db, patient_pk: DbId) -> Response:
    tl, subject = _timeline_and_subject(request, s, patient_pk)
    return _download(exports.lesions_csv(tl, subject), "text/csv", f"patient-{patient_pk}-lesions.csv")


@router.get("/patients/{patient_pk}/export/lesions.json", tags=["exports"], summary="JSON of the lesions CSV")
def export_lesions_json(request: Request, s: Db, patient_pk: DbId) -> Response:
    tl, subject = _timeline_and_subject(request, s, patient_pk)
    return Response(exports.lesions_json(tl, subject), media_type="application/json")


@router.get(
    "/patients/{patient_pk}/export/cdisc/{domain}.csv",
    tags=["exports"],
    response_class=Response,
    summary="CSV: CDISC SDTM-style TU, TR or RS domain",
)
def export_cdisc_csv(request: Request, s: Db, patient_pk: DbId, domain: str) -> Response:
    if domain.upper() not in ("TU", "TR", "RS"):
        raise HTTPException(status_code=404, detail=f"unknown CDISC domain {domain!r} (TU, TR or RS)")
    tl, subject = _timeline_and_subject(request, s, patient_pk)
    return _download(exports.cdisc_csv(tl, subject, domain), "text/csv", f"patient-{patient_pk}-{domain.upper()}.csv")


@router.get("/patients/{patient_pk}/export/cdisc.json", tags=["exports"], summary="JSON: TU, TR and RS together")
def export_cdisc_json(request: Request, s: Db, patient_pk: DbId) -> Response:
    tl, subject = _timeline_and_subject(request, s, patient_pk)
    return Response(exports.cdisc_json(tl, subject), media_type="application/json")


# -- result objects and audit -----------------------------------------------------------------------------
@router.get(
    "/instances/{sop_instance_uid}/file",
    tags=["objects"],
    response_class=FileResponse,
    summary="Download a stored DICOM object (e.g. our SEG or SR) as application/dicom",
)
def instance_file(s: Db, sop_instance_uid: str) -> FileResponse:
    row = s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid).order_by(Instance.id.desc()))
    path = Path(row.file_path) if row is not None else None
    if path is None or not path.is_file():
        raise _not_found(f"instance {sop_instance_uid}")
    return FileResponse(path, media_type="application/dicom", filename=f"{sop_instance_uid}.dcm")


@router.get(
    "/audit",
    response_model=sc.AuditList,
    tags=["audit"],
    summary="The append-only audit trail (read-only), oldest first",
)
def audit_trail(
    s: Db,
    object_type: str | None = None,
    object_id: str | None = None,
    action: str | None = None,
    after_id: int = Query(0, ge=0, le=INT64_MAX),
    limit: int = Query(200, ge=1, le=5000),
) -> sc.AuditList:
    q = select(AuditEvent).where(AuditEvent.id > after_id)
    if object_type:
        q = q.where(AuditEvent.object_type == object_type)
    if object_id:
        q = q.where(AuditEvent.object_id == object_id)
    if action:
        q = q.where(AuditEvent.action == action)
    items = [sc.AuditOut.of(e) for e in s.scalars(q.order_by(AuditEvent.id).limit(limit))]
    return sc.AuditList(items=items, next_after_id=items[-1].id if len(items) == limit else None)


# -- new-lesion candidates ------------------------------------------------------------------------------
@router.get(
    "/patients/{patient_pk}/candidates",
    response_model=list[sc.CandidateOut],
    tags=["lesions"],
    summary="New-lesion candidates of the patient's follow-ups (latest search of each), with their decisions",
)
def patient_candidates(request: Request, s: Db, patient_pk: DbId) -> list[sc.CandidateOut]:
    return [sc.CandidateOut.of(c) for c in _timeline(request, s, patient_pk).candidates]


@router.get("/candidates/{candidate_id}", response_model=sc.CandidateOut, tags=["lesions"])
def get_candidate(s: Db, candidate_id: DbId) -> sc.CandidateOut:
    try:
        return sc.CandidateOut.of(candidates.get_candidate(s, candidate_id))
    except candidates.CandidateNotFound as exc:
        raise _not_found(f"candidate {candidate_id}") from exc


@router.get(
    "/candidates/{candidate_id}/thumbnail.png",
    tags=["lesions"],
    response_class=Response,
    summary="PNG: axial CT slice through a new-lesion candidate with its contour",
)
def candidate_thumbnail(request: Request, candidate_id: DbId) -> Response:
    try:
        png = request.app.state.images.candidate_thumbnail(candidate_id)
    except KeyError as exc:
        raise _not_found(f"candidate {candidate_id}") from exc
    return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})


def decide_candidate(request: Request, candidate_id: DbId, confirm: bool, who: Principal) -> sc.CandidateDecision:
    """Record an operator's decision; a confirmation queues the re-analysis that issues the new SEG + SR."""
    sf = request.app.state.session_factory
    control = _job_control(request) if confirm else None  # 503 before anything is recorded
    try:
        view = candidates.decide(sf, candidate_id, confirm, actor=who.actor)
    except candidates.CandidateNotFound as exc:
        raise _not_found(f"candidate {candidate_id}") from exc
    except candidates.CandidateDecisionError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    job_id = None
    if control is not None:
        job_id = control.reanalyse(view.series_uid)
        with session_scope(sf) as s:
            audit(s, who.actor, "api.candidate_reanalyse", "candidate", candidate_id, job_id=job_id)
        detail = f"{view.tracking_id} confirmed; follow-up re-analysed as job {job_id} (new SEG + SR)"
    else:
        detail = f"{view.tracking_id} rejected; RECIST unchanged"
    log.info("candidate %s %s by %s", candidate_id, "confirmed" if confirm else "rejected", who.actor)
    return sc.CandidateDecision(candidate=sc.CandidateOut.of(view), job_id=job_id, detail=detail)


@router.post(
    "/candidates/{candidate_id}/confirm",
    response_model=sc.CandidateDecision,
    tags=["lesions"],
    summary="Confirm a new-lesion candidate (operator role): it becomes a tracked new lesion; new SEG + SR",
)
def confirm_candidate(request: Request, candidate_id: DbId, who: Operator) -> sc.CandidateDecision:
    return decide_candidate(request, candidate_id, True, who)


@router.post(
    "/candidates/{candidate_id}/reject",
    response_model=sc.CandidateDecision,
    tags=["lesions"],
    summary="Reject a new-lesion candidate (operator role); RECIST is unchanged",
)
def reject_candidate(request: Request, candidate_id: DbId, who: Operator) -> sc.CandidateDecision:
    return decide_candidate(request, candidate_id, False, who)


# -- verified tracking (issue 16) -----------------------------------------------------------------------------
@router.get(
    "/patients/{patient_pk}/verifications",
    response_model=list[sc.VerificationOut],
    tags=["verification"],
    summary="Timepoints a person verified (corrections from the PACS or uploaded, and results accepted as is)",
)
def patient_verifications(s: Db, patient: PatientRow) -> list[sc.VerificationOut]:
    return [sc.VerificationOut.of(v) for v in verification.verifications(s, patient.id)]


def verify_series_as_is(request: Request, series_uid: str, who: Principal) -> sc.VerificationQueued:
    """Accept our latest result of a follow-up unchanged; later follow-ups are re-analysed from it."""
    sf = request.app.state.session_factory
    try:
        vid, jobs = verification.verify_as_is(sf, series_uid, operator=who.actor)
    except verification.VerificationError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    log.info("series verified as is by an operator: verification %s, %d re-analyses", vid, len(jobs))
    return sc.VerificationQueued(
        verification_id=vid, jobs=jobs, detail=f"verified as is; {len(jobs)} later follow-up(s) re-analysed"
    )


@router.post(
    "/series/{series_uid}/verify",
    response_model=sc.VerificationQueued,
    tags=["verification"],
    summary="Mark an analysed follow-up verified as is (operator role); later follow-ups are re-analysed from it",
)
def verify_series(request: Request, series_uid: str, who: Operator) -> sc.VerificationQueued:
    return verify_series_as_is(request, series_uid, who)


def take_correction(request: Request, data: bytes, who: Principal) -> sc.VerificationQueued:
    control = request.app.state.job_control
    if not isinstance(control, CorrectionIntake):
        raise HTTPException(status_code=503, detail="uploads need the DICOM node's store (lesiontrack serve)")
    if not data:
        raise HTTPException(status_code=400, detail="empty upload: send one DICOM SEG or TID 1500 SR (Part 10)")
    try:
        taken = control.take_correction(data, who.actor)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    return sc.VerificationQueued(jobs=taken.jobs, detail=taken.detail)


@router.post(
    "/corrections",
    response_model=sc.VerificationQueued,
    status_code=202,
    tags=["verification"],
    summary="Upload a corrected SEG / TID 1500 SR (body: application/dicom, operator role); it is stored like a "
    "received instance and, if it corrects an analysed follow-up, adopted",
)
async def upload_correction(request: Request, who: Operator) -> sc.VerificationQueued:
    return take_correction(request, await request.body(), who)


@router.post(
    "/verifications/{verification_id}/reanalyse",
    response_model=sc.VerificationQueued,
    tags=["verification"],
    summary="Re-analyse the follow-ups after a verified timepoint (operator role; for reanalyse_later = operator)",
)
def reanalyse_after_verification(request: Request, verification_id: DbId, who: Operator) -> sc.VerificationQueued:
    try:
        jobs = verification.reanalyse_later(request.app.state.session_factory, verification_id, actor=who.actor)
    except verification.VerificationError as exc:
        raise _not_found(f"verification {verification_id}") from exc
    return sc.VerificationQueued(
        verification_id=verification_id, jobs=jobs, detail=f"{len(jobs)} later follow-up(s) re-analysed"
    )
