"""HTTP side of ``lesiontrack serve``: JSON API, Prometheus metrics and the dashboard (see :func:`create_app`)."""

from web.app import create_app
from web.jobcontrol import JobControl, JobStoreControl

__all__ = ["JobControl", "JobStoreControl", "create_app"]
