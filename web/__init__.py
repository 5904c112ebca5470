"""HTTP side of ``lesiontrack serve``: JSON API, Prometheus metrics and the dashboard (see :func:`create_app`)."""

from lesiontrack.web.app import create_app
from lesiontrack.web.jobcontrol import JobControl, JobStoreControl

__all__ = ["JobControl", "JobStoreControl", "create_app"]
