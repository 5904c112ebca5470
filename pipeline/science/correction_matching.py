"""Which tracked lesion each segment of a reader's corrected SEG is: by Tracking UID, else Tracking ID, else segment
label, else spatial overlap with the segment of ours the reader saw — and which of ours the reader deleted.

Pure functions on masks already on one grid (the follow-up CT's); the result says *how* each segment was matched so
the verification record and the audit trail can show it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from lesiontrack.models.imaging.volume import Volume


class MatchedBy(StrEnum):
    TRACKING_UID = "tracking_uid"
    TRACKING_ID = "tracking_id"
    LABEL = "label"
    OVERLAP = "overlap"
    ADDED = "added"  # no lesion of ours: the reader added it


@dataclass(frozen=True)
class SegmentOfInterest:
    """One segment (ours or the reader's) as matching needs it."""

    number: int
    tracking_uid: str
    tracking_id: str
    label: str
    mask: Volume
    candidate: bool = False  # ours only: an unconfirmed new-lesion candidate, not a tracked lesion
    identified: bool = True  # False: the file had no Tracking UID/ID (those above are derived; match by label)


@dataclass(frozen=True)
class SegmentMatch:
    """A corrected segment and the lesion it is (``tracking_uid`` of ours, or its own when added)."""

    segment_number: int
    label: str
    tracking_uid: str
    tracking_id: str
    matched_by: MatchedBy
    dice: float | None = None
    was_candidate: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "segment_number": self.segment_number,
            "label": self.label,
            "tracking_uid": self.tracking_uid,
            "tracking_id": self.tracking_id,
            "matched_by": self.matched_by.value,
            "dice": None if self.dice is None else round(self.dice, 3),
            "was_candidate": self.was_candidate,
        }


@dataclass(frozen=True)
class CorrectionMatch:
    matches: list[SegmentMatch]
    deleted: list[SegmentOfInterest]  # tracked lesions of ours the reader removed
    dropped_candidates: list[SegmentOfInterest]  # unconfirmed candidates of ours the reader did not keep


def _norm(label: str) -> str:
    return " ".join(label.replace("(unconfirmed)", "").split()).casefold()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 0.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def match_correction(
    corrected: Sequence[SegmentOfInterest], ours: Sequence[SegmentOfInterest], min_dice: float = 0.2
) -> CorrectionMatch:
    """Match every corrected segment to at most one segment of ours (each of ours used once), in rule order: Tracking
    UID, Tracking ID, label, then the best overlap ≥ ``min_dice``. Unmatched corrected segments are additions."""
    free = {o.number: o for o in ours}
    found: dict[int, SegmentMatch] = {}

    def take(c: SegmentOfInterest, o: SegmentOfInterest, how: MatchedBy, d: float | None = None) -> None:
        found[c.number] = SegmentMatch(c.number, c.label, o.tracking_uid, o.tracking_id, how, d, o.candidate)
        del free[o.number]

    rules: tuple[tuple[MatchedBy, Callable[[SegmentOfInterest], str]], ...] = (
        (MatchedBy.TRACKING_UID, lambda s: s.tracking_uid if s.identified else ""),
        (MatchedBy.TRACKING_ID, lambda s: s.tracking_id.casefold() if s.identified else ""),
        (MatchedBy.LABEL, lambda s: _norm(s.label)),
    )
    for how, key in rules:
        for c in corrected:
            if c.number in found:
                continue
            hits = [o for o in free.values() if key(o) and key(o) == key(c)]
            if len(hits) == 1:
                take(c, hits[0], how)
    pairs = sorted(
        (
            (dice(c.mask.array, o.mask.array), c.number, o.number)
            for c in corrected
            if c.number not in found
            for o in free.values()
            if c.mask.shape == o.mask.shape
        ),
        reverse=True,
    )
    by_number = {c.number: c for c in corrected}
    for d, cn, on in pairs:
        if d < min_dice:
            break
        if cn in found or on not in free:
            continue
        take(by_number[cn], free[on], MatchedBy.OVERLAP, d)
    for c in corrected:
        if c.number not in found:
            found[c.number] = SegmentMatch(c.number, c.label, c.tracking_uid, c.tracking_id, MatchedBy.ADDED)
    rest = list(free.values())
    return CorrectionMatch(
        [found[c.number] for c in corrected],
        [o for o in rest if not o.candidate],
        [o for o in rest if o.candidate],
    )
