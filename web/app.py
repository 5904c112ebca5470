"""The FastAPI application of ``lesiontrack serve``: health/readiness, Prometheus metrics, the JSON API and the
server-rendered dashboard. Built by :func:`create_app`; the composition root passes settings, a session factory and
a :class:`web.jobcontrol.JobControl` (None = read-only deployment: retry/re-analyse answer 503)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.config.settings import Settings
from lesiontrack.db.session import head_revision
from lesiontrack.web import api, dashboard, metrics
from lesiontrack.web.auth import KeyRing, require_read
from lesiontrack.web.images import ImageService
from lesiontrack.web.jobcontrol import JobControl
from lesiontrack.web.schemas import Health

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


def _version() -> str:
    try:
        return metadata.version("lesiontrack")
    except metadata.PackageNotFoundError:
        return "unknown"


async def _overflow(request: Request, exc: Exception) -> JSONResponse:
    log.warning("integer out of range on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": "an integer parameter is out of range"}, status_code=422)


_DESCRIPTION = (
    "Longitudinal lesion tracking on CT: analysis jobs, patients → studies → series, lesions with "
    "their observations, RECIST timelines, read-centre exports and the audit trail.\n\n"
    "Authenticate with `X-API-Key: <key>` or `Authorization: Bearer <key>` (keys and roles in "
    "`http.api_keys`). Role `read` reads everything; `operator` may also retry and re-analyse. "
    "`/health` and `/ready` need no key."
)
_TAGS = ("health", "jobs", "patients", "lesions", "exports", "objects", "audit")
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"

#: liveness, readiness and metrics (registered before the API, so they lead the OpenAPI schema)
health_router = APIRouter()


@health_router.get("/health", response_model=Health, tags=["health"], summary="Liveness: the process answers")
def health(request: Request) -> Health:
    return Health(status="ok", version=request.app.version)


@health_router.get(
    "/ready",
    response_model=Health,
    tags=["health"],
    summary="Readiness: the database answers and its schema is at the latest migration",
    responses={503: {"model": Health}},
)
def ready(request: Request) -> Response:
    try:
        with request.app.state.session_factory() as s:
            s.execute(text("SELECT 1"))
            rev = MigrationContext.configure(s.connection()).get_current_revision()
    except Exception as exc:
        body = Health(status="not ready", database="unreachable", detail=type(exc).__name__)
        return JSONResponse(body.model_dump(), status_code=503)
    head = head_revision()
    if rev != head:
        body = Health(
            status="not ready",
            database="ok",
            schema_revision=rev,
            detail=f"schema at {rev}, expected {head}: run `lesiontrack db upgrade`",
        )
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(
        Health(status="ready", database="ok", schema_revision=rev, version=request.app.version).model_dump()
    )


@health_router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    dependencies=[Depends(require_read)],
    summary="Prometheus metrics (text exposition format; needs a read key)",
)
def prometheus(request: Request) -> Response:
    return Response(metrics.render(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


def _openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


async def _security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    response.headers.setdefault("x-content-type-options", "nosniff")
    response.headers.setdefault("referrer-policy", "no-referrer")
    if response.headers.get("content-type", "").startswith("text/html"):
        response.headers.setdefault("content-security-policy", _CSP)
    return response


def create_app(
    settings: Settings,
    session_factory: sessionmaker[Session],
    job_control: JobControl | None = None,
    *,
    thumbnail_cache: Path | None = None,
) -> FastAPI:
    """Build the app. ``thumbnail_cache`` defaults to ``<data_dir>/thumbnails``."""
    app = FastAPI(
        title="LesionTrack",
        version=_version(),
        description=_DESCRIPTION,
        openapi_tags=[{"name": n} for n in _TAGS],
        # FastAPI's Swagger UI / ReDoc pages load their scripts from a CDN; the dashboard serves its own offline
        # reference at /api-docs, built from /openapi.json.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.http.public_openapi else None,  # else served below, behind a key
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.job_control = job_control
    app.state.keys = KeyRing(settings.http)
    app.state.images = ImageService(session_factory, thumbnail_cache or Path(settings.data_dir) / "thumbnails")
    app.state.metrics = metrics.make_registry(session_factory)
    if app.state.keys.empty:
        log.warning("no API keys configured (http.api_keys): the API and dashboard will refuse every request")

    app.include_router(health_router)
    if not settings.http.public_openapi:
        app.add_api_route(
            "/openapi.json", _openapi_schema, include_in_schema=False, dependencies=[Depends(require_read)]
        )
    app.add_exception_handler(OverflowError, _overflow)  # a backstop: bounded parameters make this unreachable

    app.include_router(api.router)
    app.include_router(dashboard.router)
    app.add_exception_handler(dashboard.LoginRequired, dashboard.login_redirect)  # type: ignore[arg-type]  # starlette types handlers as taking Exception
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.middleware("http")(_security_headers)
    return app
