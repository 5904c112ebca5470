"""HTTP side of ``lesiontrack serve``: JSON API, Prometheus metrics and the dashboard (see :func:`create_app`)."""

from pipeline.web.app import create_app
from pipeline.web.jobcontrol import JobControl, JobStoreControl

__all__ = ["create_app", "JobControl", "JobStoreControl"]
