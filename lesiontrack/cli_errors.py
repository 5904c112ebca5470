"""Bad input to the file-based commands (``track``, ``register``, ``synth``) ends with one line naming the file
and the problem and a non-zero exit code, never a traceback.

:class:`InputError` carries (path, problem); the readers here turn whatever a library raises on a bad file into
one. :func:`guarded` wraps a command: an :class:`InputError` exits 2, any other unexpected exception exits 1 with
its type and message (the traceback goes to the log at DEBUG, for a developer).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import click
import typer

if TYPE_CHECKING:
    from lesiontrack.models.imaging.volume import Volume

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


class InputError(Exception):
    """One input file or folder is unusable."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_dicom_series(folder: Path, what: str = "series", series_uid: str | None = None) -> Volume:
    """``models.imaging.dicom_read.read_series`` with every failure named after the folder."""
    # the imaging stack (pydicom, SciPy, SimpleITK) loads when a command reads an image, not at CLI start
    from lesiontrack.models.imaging.dicom_read import read_series

    try:
        return read_series(folder, series_uid=series_uid)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(folder, f"cannot read the {what} as a DICOM image series ({_why(exc)})") from exc


def read_image(path: Path, what: str = "image") -> Volume:
    """A NIfTI/NRRD/MHA file (or a DICOM series folder) as a Volume, failures named after the path."""
    from lesiontrack.models.imaging.volume import Volume  # SimpleITK: loaded on first use (see read_dicom_series)

    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return read_dicom_series(path, what)
    try:
        return Volume.read(str(path))
    except Exception as exc:
        raise InputError(path, f"cannot read the {what} as NIfTI/NRRD/MHA ({_why(exc)})") from exc


def check_registrable(volume: Volume, path: Path, what: str) -> None:
    """Registration needs at least 2 voxels along every axis and finite values."""
    shape = tuple(int(s) for s in volume.shape)
    if min(shape) < 2:
        raise InputError(path, f"the {what} has shape {shape}: at least 2 slices (and 2 rows/columns) are needed")


def guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a Typer command so that no bad input ends in a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException, click.exceptions.Exit):
            raise
        except InputError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from exc
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            log.debug("unexpected failure", exc_info=exc)
            typer.secho(f"error: {_why(exc)}", fg="red", err=True)
            raise typer.Exit(1) from exc

    return wrapper  # functools.wraps keeps the command signature Typer reads
