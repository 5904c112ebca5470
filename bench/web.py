"""Dashboard/API cost on one longitudinal patient: timeline model, timeline page, thumbnails (cold = read SEG + CT
slice and draw; warm = cached PNG), volume plot, CSV and CDISC exports. Prints JSON.

    .venv/bin/python bench/web.py [--repeat 5]

The patient is the procedural CT phantom (``tests/test_api_data.phantom_timepoints``: 3 timepoints, 160×160 slices,
4–6 lesions) measured and written as SEG + SR by the pipeline's own writers, in SQLite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ms(fn, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from lesiontrack.config.settings import Settings
    from lesiontrack.db.models import LesionObservation
    from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
    from lesiontrack.pipeline.views import exports
    from lesiontrack.pipeline.views.history import build_timeline
    from lesiontrack.web import create_app
    from tests.support.patient import build_patient, phantom_timepoints

    tmp = Path(tempfile.mkdtemp(prefix="lt-bench-web-"))
    url = f"sqlite:///{tmp / 'lt.sqlite3'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    built = build_patient(sf, phantom_timepoints(tmp), tmp)
    key = "bench-key"
    app = create_app(Settings(data_dir=tmp, http={"api_keys": [{"name": "b", "key": key, "role": "read"}]}), sf)
    client = TestClient(app)
    h = {"X-API-Key": key}
    with session_scope(sf) as s:
        obs_ids = [
            o.id
            for o in s.scalars(select(LesionObservation).where(LesionObservation.seg_sop_instance_uid.is_not(None)))
        ]
    pk = built.patient_pk

    def timeline_model() -> None:
        with session_scope(sf) as s:
            build_timeline(s, pk)

    cold = []
    for oid in obs_ids:  # first request renders from SEG + CT and fills the cache
        t = time.perf_counter()
        assert client.get(f"/api/observations/{oid}/thumbnail.png", headers=h).status_code == 200
        cold.append(1000 * (time.perf_counter() - t))
    warm = _ms(
        lambda: [client.get(f"/api/observations/{oid}/thumbnail.png", headers=h) for oid in obs_ids], args.repeat
    )
    with session_scope(sf) as s:
        tl = build_timeline(s, pk)
    lesion_id = tl.lesions[0].lesion_id
    plot_cold = []
    for row in tl.lesions:  # first request draws with matplotlib and fills the cache
        t = time.perf_counter()
        assert client.get(f"/api/lesions/{row.lesion_id}/plot.png", headers=h).status_code == 200
        plot_cold.append(1000 * (time.perf_counter() - t))
    result = {
        "benchmark": "web",
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "patient": {
            "timepoints": len(tl.timepoints),
            "lesions": len(tl.lesions),
            "observations_with_seg": len(obs_ids),
        },
        "timeline_model": _ms(timeline_model, args.repeat),
        "timeline_page_html": _ms(lambda: client.get(f"/patients/{pk}", headers=h), args.repeat),
        "thumbnail_cold_ms_median": round(statistics.median(cold), 2),
        "thumbnail_warm_ms_per_image": round(warm["median_ms"] / len(obs_ids), 2),
        "thumbnail_cold_over_warm": round(statistics.median(cold) / (warm["median_ms"] / len(obs_ids)), 1),
        "volume_plot_cold_ms_median": round(statistics.median(plot_cold), 2),
        "volume_plot_warm": _ms(lambda: client.get(f"/api/lesions/{lesion_id}/plot.png", headers=h), args.repeat),
        "lesions_csv": _ms(lambda: exports.lesions_csv(tl, built.patient_id), args.repeat),
        "cdisc_all": _ms(lambda: exports.cdisc_json(tl, built.patient_id), args.repeat),
        "api_jobs_list": _ms(lambda: client.get("/api/jobs", headers=h), args.repeat),
        "metrics_scrape": _ms(lambda: client.get("/metrics", headers=h), args.repeat),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
