"""Imaging core: the Volume type, DICOM series I/O, the CT phantom, longitudinal synthesis and metrics."""

from lesiontrack.models.imaging.volume import Volume, empty_like

__all__ = ["Volume", "empty_like"]
