"""Server-rendered dashboard (Jinja2, no external assets): job queue with retry, skipped series with "analyse
anyway", patient list, per-patient lesion timeline with thumbnails and plots, job detail. Browsers log in with an
API key on ``/login`` (see :mod:`web.auth`); the queue page refreshes itself from ``/api/jobs`` with a few lines of
local JavaScript."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select

from lesiontrack.db.models import AnalysisJob, AuditEvent, JobState, Lesion, Patient, Series, Study
from lesiontrack.db.repository import audit
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.views.history import build_timeline
from lesiontrack.web.api import (
    analyse_anyway,
    decide_candidate,
    get_job,
    list_series,
    recist_rules,
    retry_job,
    take_correction,
    verify_series_as_is,
)
from lesiontrack.web.auth import SESSION_COOKIE, SESSION_SECONDS, Principal, identify
from lesiontrack.web.params import DbId

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))


class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


async def login_redirect(request: Request, exc: LoginRequired) -> Response:
    return RedirectResponse(f"/login?next={quote(exc.next_url)}", status_code=303)


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f}%"


templates.env.filters["fmt"] = _fmt
templates.env.filters["pct"] = _pct


def _user(request: Request) -> Principal:
    principal = identify(request)
    if principal is None:
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return principal


def _render(request: Request, name: str, principal: Principal | None, **ctx: object) -> HTMLResponse:
    token = request.cookies.get(SESSION_COOKIE, "")
    csrf = request.app.state.keys.csrf_token(token) if token else ""
    return templates.TemplateResponse(request, name, {"user": principal, "csrf": csrf, **ctx})


def _safe_next(url: str | None) -> str:
    return url if url and url.startswith("/") and not url.startswith("//") else "/"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/", error: str | None = None) -> HTMLResponse:
    return _render(request, "login.html", None, next=_safe_next(next), error=error)


@router.post("/login")
async def login(request: Request) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    key = (form.get("key") or [""])[0].strip()
    next_url = _safe_next((form.get("next") or ["/"])[0])
    principal = request.app.state.keys.by_key(key) if key else None
    if principal is None:
        return _render(request, "login.html", None, next=next_url, error="Unknown key.")
    token = request.app.state.keys.make_session(principal)
    with session_scope(request.app.state.session_factory) as s:
        audit(s, principal.actor, "dashboard.login", "api_key", principal.name)
    resp = RedirectResponse(next_url, status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return resp


@router.post("/logout")
def logout() -> Response:
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/", response_class=HTMLResponse)
def queue(
    request: Request,
    state: str | None = None,
    msg: str | None = None,
    series: str | None = None,
    superseded: bool = False,
) -> HTMLResponse:
    user = _user(request)
    with session_scope(request.app.state.session_factory) as s:
        q = select(AnalysisJob).order_by(AnalysisJob.id.desc()).limit(200)
        if series:  # one series' history: every job, superseded ones included, with their SEG/SR
            q = q.where(AnalysisJob.followup_series_uid == series)
        elif not superseded and state != JobState.SUPERSEDED.value:  # superseded results hidden unless asked
            q = q.where(AnalysisJob.superseded_by.is_(None))
        if state:
            try:
                q = q.where(AnalysisJob.state == JobState(state))
            except ValueError as exc:
                raise HTTPException(status_code=400, detail=f"unknown job state {state!r}") from exc
        jobs = list(s.scalars(q))
        counts = {
            k: v
            for k, v in s.execute(select(AnalysisJob.state, func.count(AnalysisJob.id)).group_by(AnalysisJob.state))
        }
        rows = [
            {
                "id": j.id,
                "series": j.followup_series_uid,
                "patient_pk": j.patient_pk,
                "state": j.state.value,
                "step": j.step or "",
                "attempts": j.attempts,
                "error": j.error or "",
                "created": j.created_at,
                "finished": j.finished_at,
                "seconds": sum(v for v in (j.step_timings or {}).values() if isinstance(v, (int, float))),
                "retryable": j.state in (JobState.FAILED, JobState.DONE, JobState.NOTHING_TO_TRACK),
            }
            for j in jobs
        ]
    return _render(
        request,
        "jobs.html",
        user,
        jobs=rows,
        counts={st.value: counts.get(st, 0) for st in JobState},
        state=state or "",
        series=series or "",
        superseded=superseded,
        msg=msg,
        can_retry=user.allows("operator"),
    )


async def _operator_form(request: Request, what: str, *, csrf: str | None = None) -> Principal:
    """The operator behind a dashboard form post: its CSRF token (form field, or ``csrf`` for an upload whose body is
    the file) must match the session, its role be operator."""
    user = _user(request)
    if csrf is None:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        csrf = (form.get("csrf") or [""])[0]
    token = request.cookies.get(SESSION_COOKIE, "")
    if not token or csrf != request.app.state.keys.csrf_token(token):
        raise HTTPException(status_code=403, detail="missing or stale form token; reload the page")
    if not user.allows("operator"):
        raise HTTPException(status_code=403, detail=f"role '{user.role}' may not {what}")
    return user


@router.post("/jobs/{job_id}/retry")
async def retry_from_dashboard(request: Request, job_id: DbId) -> Response:
    user = await _operator_form(request, "retry jobs")
    result = retry_job(request, job_id, user)
    return RedirectResponse(f"/?msg={quote(result.detail)}", status_code=303)


@router.get("/series/skipped", response_class=HTMLResponse)
def skipped_page(request: Request, msg: str | None = None) -> HTMLResponse:
    user = _user(request)
    with session_scope(request.app.state.session_factory) as s:
        page = list_series(s, state="skipped", since=None, include_own=False, limit=500, offset=0)
    return _render(
        request,
        "skipped.html",
        user,
        series=page.items,
        total=page.total,
        msg=msg,
        can_analyse=user.allows("operator"),
    )


@router.post("/series/{series_uid}/analyse")
async def analyse_from_dashboard(request: Request, series_uid: str) -> Response:
    user = await _operator_form(request, "start analyses")
    result = analyse_anyway(request, series_uid, user)
    return RedirectResponse(f"/series/skipped?msg={quote(result.detail)}", status_code=303)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: DbId) -> HTMLResponse:
    user = _user(request)
    with session_scope(request.app.state.session_factory) as s:
        job = get_job(s, job_id)
    return _render(request, "job.html", user, job=job, can_retry=user.allows("operator"))


@router.get("/patients", response_class=HTMLResponse)
def patients_page(request: Request) -> HTMLResponse:
    user = _user(request)
    with session_scope(request.app.state.session_factory) as s:
        rows = []
        for p in s.scalars(select(Patient).order_by(Patient.id)):
            rows.append(
                {
                    "id": p.id,
                    "patient_id": p.patient_id,
                    "studies": s.scalar(select(func.count(Study.id)).where(Study.patient_pk == p.id)),
                    "lesions": s.scalar(select(func.count(Lesion.id)).where(Lesion.patient_pk == p.id)),
                    "latest": s.scalar(select(func.max(Study.study_date)).where(Study.patient_pk == p.id)),
                }
            )
    return _render(request, "patients.html", user, patients=rows)


@router.get("/patients/{patient_pk}", response_class=HTMLResponse)
def timeline_page(request: Request, patient_pk: DbId, msg: str | None = None) -> HTMLResponse:
    user = _user(request)
    with session_scope(request.app.state.session_factory) as s:
        p = s.get(Patient, patient_pk)
        if p is None:
            raise HTTPException(status_code=404, detail=f"patient {patient_pk} not found")
        tl = build_timeline(s, patient_pk, recist_rules(request))
        subject = p.patient_id
        last_event = s.scalar(select(func.max(AuditEvent.id)))
    labels = {tp.series_uid: tp.label for tp in tl.timepoints}
    return _render(
        request,
        "timeline.html",
        user,
        tl=tl,
        subject=subject,
        patient_pk=patient_pk,
        last_event=last_event,
        msg=msg,
        tp_label=labels,
        can_decide=user.allows("operator"),
    )


@router.get("/api-docs", response_class=HTMLResponse)
def api_docs(request: Request) -> HTMLResponse:
    """The API reference, rendered from the app's OpenAPI schema (no external assets)."""
    user = _user(request)
    spec = request.app.openapi()
    ops = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            params = [f"{p['name']} ({p['in']})" for p in op.get("parameters", [])]
            ops.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "tag": (op.get("tags") or [""])[0],
                    "params": ", ".join(params),
                    "operator": path.endswith(("/retry", "/reanalyse", "/analyse", "/complete")),
                    "open": path in ("/health", "/ready"),
                }
            )
    return _render(request, "api_docs.html", user, ops=ops, version=spec.get("info", {}).get("version"))


@router.post("/candidates/{candidate_id}/{decision}")
async def decide_from_dashboard(request: Request, candidate_id: DbId, decision: str) -> Response:
    """Confirm / reject buttons of the timeline page (operator role, same form token as job retries)."""
    if decision not in ("confirm", "reject"):
        raise HTTPException(status_code=404, detail=f"unknown decision {decision!r}")
    user = await _operator_form(request, "decide on candidates")
    result = decide_candidate(request, candidate_id, decision == "confirm", user)
    return RedirectResponse(
        f"/patients/{result.candidate.patient_pk}?msg={quote(result.detail)}#candidates", status_code=303
    )


@router.post("/series/{series_uid}/verify")
async def verify_from_dashboard(request: Request, series_uid: str) -> Response:
    """ "Mark verified" on a timepoint of the timeline page (operator role): our result accepted as is."""
    user = await _operator_form(request, "verify timepoints")
    result = verify_series_as_is(request, series_uid, user)
    return RedirectResponse(f"{_patient_url(request, series_uid)}?msg={quote(result.detail)}", status_code=303)


@router.post("/corrections/upload")
async def upload_from_dashboard(request: Request) -> Response:
    """The timeline page's "Upload corrected SEG" (body: the file; the form token in the X-CSRF header)."""
    user = await _operator_form(request, "upload corrections", csrf=request.headers.get("x-csrf", ""))
    result = take_correction(request, await request.body(), user)
    return JSONResponse(result.model_dump())


def _patient_url(request: Request, series_uid: str) -> str:
    with session_scope(request.app.state.session_factory) as s:
        pk = s.scalar(
            select(Study.patient_pk)
            .join(Series, Series.study_pk == Study.id)
            .where(Series.series_instance_uid == series_uid)
        )
    return f"/patients/{pk}" if pk is not None else "/"
