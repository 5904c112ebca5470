"""The one INFO line an operator reads per analysis job: series, prior used, lesions, how many need review, RECIST,
step timings and delivery — built from the job's recorded step outputs, UIDs only (no patient identifiers)."""

from __future__ import annotations

from collections.abc import Mapping

from lesiontrack.pipeline.science.confidence import review_text


def _get(d: object, *path: str) -> object:
    for key in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def job_summary(
    job_id: int,
    series_uid: str,
    state: str,
    outputs: Mapping[str, object],
    timings: Mapping[str, float],
    reason: str | None = None,
) -> str:
    """``job 7 done: series 1.2… | prior 20260105 (orthanc, SEG) | 3 lesions: 2 present, 1 vanished | …``."""
    parts = [f"job {job_id} {state}: series {series_uid}"]
    prior = _get(outputs, "match_priors", "prior")
    if isinstance(prior, Mapping):
        kinds = ",".join(str(a.get("modality")) for a in prior.get("annotations") or [] if isinstance(a, Mapping))
        found = _get(outputs, "match_priors", "priors_found")
        parts.append(
            f"prior {prior.get('study_date')} ({prior.get('source')}, {kinds or 'no annotation'}"
            f"{f', {len(found)} found' if isinstance(found, list) else ''})"
        )
    lesions = _get(outputs, "track", "lesions")
    if isinstance(lesions, list):
        by: dict[str, int] = {}
        for les in lesions:
            by[str(_get(les, "status"))] = by.get(str(_get(les, "status")), 0) + 1
        notes = sum(1 for les in lesions if _get(les, "notes"))
        detail = ", ".join(f"{n} {k}" for k, n in sorted(by.items()))
        parts.append(f"{len(lesions)} lesions ({detail}){f', {notes} with notes' if notes else ''}")
        flagged = sum(1 for les in lesions if _get(les, "review") is True)
        assessed = sum(1 for les in lesions if _get(les, "confidence") is not None)
        if assessed or flagged:  # a reader's adopted correction, say, is not scored: nothing is said about review
            parts.append(review_text(flagged, len(lesions)))
    recist = _get(outputs, "measure", "recist", "overall_response")
    if recist:
        parts.append(f"RECIST {recist}")
    if timings:
        total = sum(v for v in timings.values() if isinstance(v, (int, float)))
        steps = " ".join(f"{k} {v:.1f}" for k, v in timings.items() if isinstance(v, (int, float)))
        parts.append(f"{total:.1f} s ({steps})")
    send = outputs.get("send")
    if isinstance(send, Mapping):
        n = len(send.get("deliveries") or [])
        dest = send.get("destinations")
        parts.append(
            f"delivery: {n} queued{f' to {dest}' if dest else ''}" + (f" ({send['note']})" if send.get("note") else "")
        )
    if reason:
        parts.append(f"reason: {reason}")
    return " | ".join(parts)
