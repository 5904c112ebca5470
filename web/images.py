"""Finds the DICOM files behind an observation or lesion and renders dashboard PNGs (cached on disk).

Files are located through the ``instance`` table: the SEG by the observation's SEG SOP Instance UID, the CT slice by
the SOP Instance UID the SEG frame was derived from. Thumbnails are immutable per observation and cached under
``<data_dir>/thumbnails``; volume plots are cached under a key made of the lesion's observation ids, so a new
timepoint or a re-analysis draws a new one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import Instance, Lesion, LesionObservation, NewLesionCandidate
from lesiontrack.db.session import session_scope
from lesiontrack.db.status import LesionStatus
from lesiontrack.pipeline.dicom.object_kinds import has_mask, object_kinds
from lesiontrack.pipeline.views import thumbnails
from lesiontrack.pipeline.views.history import build_timeline

log = logging.getLogger(__name__)


def _file_of(session: Session, sop_uid: str) -> Path | None:
    row = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid).order_by(Instance.id.desc()))
    if row is None:
        return None
    path = Path(row.file_path)
    return path if path.is_file() else None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class ImageService:
    def __init__(self, session_factory: sessionmaker[Session], cache_dir: Path | None = None) -> None:
        self.sf = session_factory
        self.cache_dir = cache_dir

    def observation_thumbnail(self, observation_id: int) -> bytes:
        """PNG of the lesion on its timepoint (raises KeyError for an unknown observation)."""
        with session_scope(self.sf) as s:
            obs = s.get(LesionObservation, observation_id)
            if obs is None:
                raise KeyError(f"no observation with id {observation_id}")
            if obs.status is LesionStatus.VANISHED:
                return thumbnails.placeholder_png(f"{obs.lesion.tracking_id}\nvanished")
            return self._segment_thumbnail(
                s,
                f"obs-{observation_id}",
                obs.seg_sop_instance_uid,
                obs.segment_number,
                obs.lesion.tracking_uid,
                obs.lesion.tracking_id,
            )

    def candidate_thumbnail(self, candidate_id: int) -> bytes:
        """PNG of a new-lesion candidate on its follow-up (raises KeyError for an unknown candidate)."""
        with session_scope(self.sf) as s:
            c = s.get(NewLesionCandidate, candidate_id)
            if c is None:
                raise KeyError(f"no new-lesion candidate with id {candidate_id}")
            return self._segment_thumbnail(
                s, f"cand-{candidate_id}", c.seg_sop_instance_uid, c.segment_number, c.tracking_uid, c.tracking_id
            )

    def _segment_thumbnail(
        self,
        s: Session,
        key: str,
        seg_uid: str | None,
        segment: int | None,
        tracking_uid: str,
        label: str,
    ) -> bytes:
        """The axial CT slice through one SEG segment with its contour (cached under ``key``)."""
        cached = self.cache_dir / f"{key}.png" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        seg_path = _file_of(s, seg_uid) if seg_uid else None
        if seg_path is None:
            log.info("no SEG file for %s (SEG %s)", key, seg_uid)
            return thumbnails.placeholder_png(f"{label}\nno SEG on file")
        kind = object_kinds(s, [seg_uid]).get(seg_uid or "")
        if not has_mask(kind):  # e.g. a baseline annotated with RECIST lines: no mask exists, none is pretended
            return thumbnails.placeholder_png(f"{label}\nannotated as {kind or 'a non-SEG object'}\n(no mask)")
        try:
            sl = thumbnails.lesion_slice_from_seg(seg_path, segment, tracking_uid)
        except thumbnails.ThumbnailError as exc:
            log.warning("thumbnail for %s: %s", key, exc)
            return thumbnails.placeholder_png(f"{label}\nSEG unreadable")
        ct_path = _file_of(s, sl.source_sop_instance_uid)
        if ct_path is None:
            return thumbnails.placeholder_png(f"{label}\nCT slice not on file")
        try:
            png = thumbnails.render_thumbnail(thumbnails.ct_slice_hu(ct_path), sl.mask, label=label)
        except thumbnails.ThumbnailError as exc:
            log.warning("thumbnail for %s: %s", key, exc)
            return thumbnails.placeholder_png(f"{label}\nCT unreadable")
        if cached is not None:
            _write_atomic(cached, png)
        return png

    def lesion_plot(self, lesion_id: int) -> bytes:
        """PNG of one lesion's volume (and long axis) over the patient's timepoints (KeyError if unknown)."""
        with session_scope(self.sf) as s:
            lesion = s.get(Lesion, lesion_id)
            if lesion is None:
                raise KeyError(f"no lesion with id {lesion_id}")
            tl = build_timeline(s, lesion.patient_pk)
        row = next(r for r in tl.lesions if r.lesion_id == lesion_id)
        # cached per set of observations (a new timepoint or re-analysis changes the key)
        sig = "-".join(str(c.observation_id) if c else "x" for c in row.cells)
        cached = self.cache_dir / f"plot-{lesion_id}-{sig}.png" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        labels: list[str] = []
        vols: list[float | None] = []
        las: list[float | None] = []
        for tp in tl.timepoints:
            c = row.cells[tp.index]
            labels.append(f"{tp.label}\n{tp.date_iso or ''}")
            if c is None:
                vols.append(None)
                las.append(None)
            elif c.status == LesionStatus.VANISHED:
                vols.append(0.0)
                las.append(0.0)
            else:
                vols.append(c.volume_ml)
                las.append(c.long_axis_mm)
        png = thumbnails.volume_plot(labels, vols, long_axes_mm=las, title=f"{row.tracking_id} — volume over time")
        if cached is not None:
            _write_atomic(cached, png)
        return png
