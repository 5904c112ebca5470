"""Bounded integer parameters for the HTTP layer: every id, offset and limit fits the database's 64-bit integers,
so an out-of-range value is a 422 with the parameter named, never an overflow deep in the driver (a 500)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

INT64_MAX = 2**63 - 1

#: a database primary key in a path (``/api/jobs/{job_id}``)
DbId = Annotated[int, Path(ge=0, le=INT64_MAX)]
