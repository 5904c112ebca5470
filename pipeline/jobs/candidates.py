"""New-lesion candidates in the database: what each follow-up's search found, and operators' decisions on them.

A candidate is an unconfirmed finding — it appears in the follow-up's SEG and SR as such and never makes RECIST PD
by itself. An operator confirms or rejects it (audited). A confirmation is followed by a re-analysis of the
follow-up: the confirmed candidate becomes a tracked lesion there (origin "new", its own Tracking UID), RECIST is
recomputed and a new SEG + SR are issued (the earlier ones are kept and named as predecessors). Rejecting keeps
RECIST as it was and keeps that region out of later searches of the same series.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import numpy as np
from pydantic import ConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.db.models import AnalysisJob, CandidateState, NewLesionCandidate, NewLesionSearchRun
from lesiontrack.db.repository import audit
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.contract import CandidateRecord
from lesiontrack.pipeline.jobs.store import ACTIVE_STATES, utcnow
from lesiontrack.pipeline.science.recist import NewLesionSearch


def candidate_name(number: int, tissue: str) -> str:
    """A candidate's Tracking ID and segment label: "Candidate 1 (liver)"."""
    return f"Candidate {number} ({tissue})"


def confirmed_name(candidate_id: str, tissue: str | None = None) -> str:
    """The Tracking ID a confirmed candidate is tracked under: "Candidate 2 (lung)" → "N2 lung" (also for the
    names of earlier versions, "C2 lung (unconfirmed)"); ``tissue`` defaults to the one in the name."""
    words = candidate_id.replace("(unconfirmed)", "").replace("(", " ").replace(")", " ").split()
    number, rest = None, words
    if len(words) >= 2 and words[0] == "Candidate" and words[1].isdigit():
        number, rest = words[1], words[2:]
    elif words and words[0][:1] == "C" and words[0][1:].isdigit():
        number, rest = words[0][1:], words[1:]
    site = tissue or " ".join(rest) or "new lesion"
    return f"N{number} {site}" if number else f"N {site}"


class CandidateNotFound(KeyError):
    pass


class CandidateDecisionError(ValueError):
    """The decision cannot be taken (already decided, or the follow-up is still being analysed)."""


class CandidateView(CandidateRecord):
    """A detached snapshot of one candidate (API, CLI, dashboard): the detect step's finding
    (:class:`pipeline.jobs.contract.CandidateRecord`) as stored, with where it is, its contrast and the decision on
    it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    patient_pk: int
    series_uid: str
    mean_hu: float
    contrast_hu: float
    state: CandidateState
    decided_by: str | None
    decided_at: datetime | None
    seg_sop_instance_uid: str | None
    segment_number: int | None
    job_id: int | None

    @classmethod
    def from_row(cls, c: NewLesionCandidate, job_id: int | None) -> CandidateView:
        return cls(
            id=c.id,
            patient_pk=c.patient_pk,
            series_uid=c.series_instance_uid,
            tracking_uid=c.tracking_uid,
            tracking_id=c.tracking_id,
            tissue=c.tissue,
            centre_mm=(c.centre_x_mm, c.centre_y_mm, c.centre_z_mm),
            volume_mm3=c.volume_mm3,
            diameter_mm=c.diameter_mm,
            mean_hu=c.mean_hu,
            contrast_hu=c.contrast_hu,
            confidence=c.confidence,
            reasons=[str(r) for r in c.reasons or []],
            state=CandidateState(c.state),
            decided_by=c.decided_by,
            decided_at=c.decided_at,
            seg_sop_instance_uid=c.seg_sop_instance_uid,
            segment_number=c.segment_number,
            job_id=job_id,
        )


def _latest_runs(session: Session, series_uids: Iterable[str]) -> dict[str, NewLesionSearchRun]:
    uids = sorted(set(series_uids))
    if not uids:
        return {}
    newest = (
        select(func.max(NewLesionSearchRun.id))
        .where(NewLesionSearchRun.series_instance_uid.in_(uids))
        .group_by(NewLesionSearchRun.series_instance_uid)
    )
    runs = session.scalars(select(NewLesionSearchRun).where(NewLesionSearchRun.id.in_(newest)))
    return {r.series_instance_uid: r for r in runs}


def search_states(session: Session, series_uids: Iterable[str]) -> dict[str, NewLesionSearch]:
    """Per series: did the (latest) new-lesion search run, and how many of its candidates are undecided."""
    runs = _latest_runs(session, series_uids)
    out: dict[str, NewLesionSearch] = {}
    for uid, run in runs.items():
        undecided = session.scalar(
            select(func.count(NewLesionCandidate.id)).where(
                NewLesionCandidate.search_pk == run.id, NewLesionCandidate.state == CandidateState.UNCONFIRMED
            )
        )
        out[uid] = NewLesionSearch(True, int(undecided or 0))
    return out


def latest_candidates(session: Session, series_uids: Iterable[str]) -> list[CandidateView]:
    """The candidates of the latest search of each series (what the current report shows), and every candidate an
    operator decided on in earlier searches of them (the decision stays visible)."""
    uids = sorted(set(series_uids))
    runs = _latest_runs(session, uids)
    if not runs:
        return []
    rows = session.scalars(
        select(NewLesionCandidate)
        .where(
            NewLesionCandidate.search_pk.in_([r.id for r in runs.values()])
            | (
                NewLesionCandidate.series_instance_uid.in_(uids)
                & (NewLesionCandidate.state != CandidateState.UNCONFIRMED)
            )
        )
        .order_by(NewLesionCandidate.id)
    )
    job_of = {
        r.id: r.job_pk
        for r in session.scalars(select(NewLesionSearchRun).where(NewLesionSearchRun.series_instance_uid.in_(uids)))
    }
    return [CandidateView.from_row(c, job_of.get(c.search_pk)) for c in rows]


def decided_masks(sf: sessionmaker[Session], series_uid: str) -> tuple[list[CandidateView], list[np.ndarray]]:
    """Candidates of ``series_uid`` an operator decided on (any earlier search), with their masks."""
    with session_scope(sf) as s:
        rows = list(
            s.scalars(
                select(NewLesionCandidate)
                .where(
                    NewLesionCandidate.series_instance_uid == series_uid,
                    NewLesionCandidate.state != CandidateState.UNCONFIRMED,
                )
                .order_by(NewLesionCandidate.id)
            )
        )
        views = [CandidateView.from_row(c, None) for c in rows]
        paths = [c.mask_path for c in rows]
    masks = []
    for v, p in zip(views, paths, strict=True):
        if not Path(p).is_file():
            raise FileNotFoundError(f"mask of candidate {v.tracking_id} ({v.tracking_uid}) is missing: {p}")
        masks.append(load_mask(Path(p)))
    return views, masks


def save_mask(path: Path, mask: np.ndarray) -> None:
    """A candidate's mask as its bounding-box crop (compressed), the offset and the full grid shape."""
    idx = np.argwhere(mask)
    lo = idx.min(0) if idx.size else np.zeros(mask.ndim, int)
    hi = idx.max(0) + 1 if idx.size else np.zeros(mask.ndim, int)
    crop = mask[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))]
    np.savez_compressed(path, crop=crop, offset=lo, shape=np.array(mask.shape))


def load_mask(path: Path) -> np.ndarray:
    with np.load(path) as data:
        crop, lo, shape = data["crop"].astype(bool), data["offset"], tuple(int(v) for v in data["shape"])
    mask = np.zeros(shape, bool)
    mask[tuple(slice(int(a), int(a) + n) for a, n in zip(lo, crop.shape, strict=True))] = crop
    return mask


def get_candidate(session: Session, candidate_id: int) -> CandidateView:
    c = session.get(NewLesionCandidate, candidate_id)
    if c is None:
        raise CandidateNotFound(f"no new-lesion candidate with id {candidate_id}")
    run = session.get(NewLesionSearchRun, c.search_pk)
    return CandidateView.from_row(c, run.job_pk if run else None)


def decide(
    sf: sessionmaker[Session], candidate_id: int, confirm: bool, *, actor: str, reason: str = ""
) -> CandidateView:
    """Confirm or reject a candidate (audited). After a confirmation the caller queues a re-analysis of the
    candidate's follow-up (through its job port), which issues a new SEG + SR with the lesion tracked."""
    with session_scope(sf) as s:
        c = s.get(NewLesionCandidate, candidate_id)
        if c is None:
            raise CandidateNotFound(f"no new-lesion candidate with id {candidate_id}")
        if c.state is not CandidateState.UNCONFIRMED:
            raise CandidateDecisionError(
                f"candidate {c.tracking_id} was already {c.state.value} by {c.decided_by or 'someone'}"
            )
        running = s.scalar(
            select(AnalysisJob.id).where(
                AnalysisJob.followup_series_uid == c.series_instance_uid, AnalysisJob.state.in_(ACTIVE_STATES)
            )
        )
        if running is not None:
            raise CandidateDecisionError(
                f"series {c.series_instance_uid} is being analysed (job {running}); decide once it has finished"
            )
        c.state = CandidateState.CONFIRMED if confirm else CandidateState.REJECTED
        c.decided_by, c.decided_at = actor, utcnow()
        audit(
            s,
            actor,
            "candidate.confirmed" if confirm else "candidate.rejected",
            "candidate",
            c.id,
            tracking_uid=c.tracking_uid,
            series_uid=c.series_instance_uid,
            reason=reason or None,
        )
        s.flush()
        return get_candidate(s, candidate_id)
