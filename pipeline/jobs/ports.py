"""What the pipeline needs from the DICOM side, as protocols the composition root fills in.

Imports flow ``dicom_node → pipeline → models``; the pipeline therefore never imports ``dicom_node``.
``dicom_node`` implements these protocols and ``lesiontrack`` (the composition root) passes them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

PROMPT_FILE = "points"
"""``PriorAnnotation.modality`` of a prompts JSON file (docs/prompts.md): points/boxes a person placed."""


@dataclass
class PriorAnnotation:
    """A SEG or TID 1500 SR object annotating a prior CT series (or a prompts JSON file given with ``lesiontrack
    track --prompts``: modality :data:`PROMPT_FILE`, a derived SOP Instance UID, no SOP class)."""

    sop_instance_uid: str
    sop_class_uid: str
    modality: str  # "SEG", "SR" or PROMPT_FILE
    files: list[Path] = field(default_factory=list)  # local files once retrieved


@dataclass
class PriorTimepoint:
    """One earlier study of the same patient: its CT series and the annotations referencing it."""

    study_uid: str
    study_date: str | None
    study_time: str | None
    ct_series_uid: str
    ct_files: list[Path] = field(default_factory=list)  # local files once retrieved
    annotations: list[PriorAnnotation] = field(default_factory=list)
    source: str = "local"  # "local" or the PACS peer name


class PriorSource(Protocol):
    """Finds (and retrieves to local disk) the prior timepoints of a follow-up series, oldest first."""

    def find_priors(self, followup_series_uid: str) -> list[PriorTimepoint]: ...

    def retrieve(self, prior: PriorTimepoint) -> PriorTimepoint:
        """Make sure ``ct_files`` and every annotation's ``files`` are on local disk; returns the filled record."""
        ...


class ResultSender(Protocol):
    """Queues result files for delivery to the configured destinations (retries handled by the sender)."""

    def send(self, files: list[Path], job_id: int | None = None) -> list[int]:
        """Returns the ids of the Delivery rows created."""
        ...
