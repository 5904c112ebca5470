"""The one lesion-status enum, shared by the database, the pipeline, the SR writer/reader and the web layer.

It lives beneath the pipeline (db is the lowest layer that stores it) so every layer can use it without an
upward import. Values are the strings stored in ``observations.status`` and in job outputs; do not rename them.
"""

from __future__ import annotations

import enum


class LesionStatus(enum.StrEnum):
    """A tracked lesion's status at one timepoint."""

    PRESENT = "present"  # seen and segmented
    VANISHED = "vanished"  # looked for where it was expected, not found (RECIST: disappeared)
    NEW = "new"  # first seen at this timepoint (not at baseline)
    NOT_EVALUATED = "not_evaluated"  # not assessed at this timepoint (e.g. outside the field of view); never stored
    # as an observation, used by the patient history / RECIST so an SR never asserts what was not assessed
