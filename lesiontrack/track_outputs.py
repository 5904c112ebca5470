"""What ``lesiontrack track`` leaves in ``--out``, derived from the jobs of a local analysis.

Per timepoint a NIfTI label map (label = the lesion's label as on the annotation it was tracked from), the job's
result objects copied to ``dicom/<series>/`` (SEG, TID 1500 SR, OHIF measurements SR: the very files the service
would send), and ``tracking.json``: per timepoint the job's state, reason, new-lesion search, candidates and RECIST;
per lesion per timepoint its status, volume, centre, confidence, review flag and where it was propagated from.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from lesiontrack.local_analysis import LocalAnalysis, TimepointRun
from lesiontrack.pipeline.science.lesions import Timepoint
from lesiontrack.pipeline.science.tracking import label_map, tracking_summary


def safe_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]", "_", text)[:64]


def analysed_timepoints(run: LocalAnalysis) -> dict[str, Timepoint]:
    """Series UID → the timepoint with its lesions (masks) as the jobs left them: each follow-up from its own job,
    the baseline from the first job that propagated from it."""
    out: dict[str, Timepoint] = {}
    for tp in run.timepoints:
        tps = tp.analysis.timepoints if tp.analysis is not None else None
        if not tps:
            continue
        out[tps[1].series_uid] = tps[1]
        out.setdefault(tps[0].series_uid, tps[0])
    return out


def write_outputs(run: LocalAnalysis, out: Path, *, dicom: bool = True) -> dict[str, object]:
    """Label maps, DICOM results and ``tracking.json`` under ``out``; returns the summary written."""
    out.mkdir(parents=True, exist_ok=True)
    index = {tp.series_uid: i for i, tp in enumerate(run.timepoints)}
    analysed = analysed_timepoints(run)
    present = [analysed[tp.series_uid] for tp in run.timepoints if tp.series_uid in analysed]
    lesions = tracking_summary(present)["lesions"]
    for les in lesions:
        for x in les["timepoints"]:
            x["index"] = index[x["series_uid"]]
            src = x["propagated_from"]
            if src is not None:
                src["timepoint_index"] = index.get(src["series_uid"])
    timepoints = [_timepoint(i, tp) for i, tp in enumerate(run.timepoints)]
    summary: dict[str, object] = {
        "timepoints": timepoints,
        "lesions": lesions,
        "source_index": run.baseline_index,
        "confirmed_indices": [i for i, tp in enumerate(run.timepoints) if tp.confirmed],
        "propagation": "annotation",  # every follow-up from the nearest annotation a person made or confirmed
    }
    for t, tp in enumerate(run.timepoints):
        entry = timepoints[t]
        if tp.series_uid in analysed:
            path = out / f"T{t}_{safe_name(tp.series_uid)}_labels.nii.gz"
            label_map(analysed[tp.series_uid]).write(str(path))
            entry["label_map"] = path.name
        written = tp.results.written if tp.results is not None else None
        if dicom and written is not None and written.files:
            folder = out / "dicom" / safe_name(tp.series_uid)
            folder.mkdir(parents=True, exist_ok=True)
            entry["dicom"] = [str(Path(shutil.copy2(f, folder / Path(f).name)).relative_to(out)) for f in written.files]
    return summary


def _timepoint(t: int, tp: TimepointRun) -> dict[str, object]:
    res = tp.results
    entry: dict[str, object] = {
        "index": t,
        "series_uid": tp.series_uid,
        "study_date": tp.study_date,
        "folder": str(tp.folder),
        "role": "baseline" if tp.baseline else "follow-up",
        "confirmed": tp.confirmed,
        "jobs": tp.job_ids,
        "state": None if tp.state is None else tp.state.value,
        "reason": tp.reason,
        "dicom": [],
    }
    if res is not None and res.detect is not None:
        entry["new_lesion_search"] = {"ran": res.detect.ran, "detector": res.detect.detector, "note": res.detect.note}
        entry["candidates"] = [c.model_dump(mode="json") for c in res.detect.candidates]
    if res is not None and res.track is not None:
        entry["review"] = [les.tracking_id for les in res.track.lesions if les.review]
    if res is not None and res.measure is not None:
        entry["recist"] = res.measure.recist.model_dump(mode="json")
    return entry
