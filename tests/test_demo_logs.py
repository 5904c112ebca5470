"""A full ``make demo`` run (``lesiontrack --log-level INFO demo``, small phantom) read as an operator would: one
INFO line per DICOM association and one per analysis job, no per-instance lines, no alembic/highdicom chatter, no
patient identifier at INFO; and the closing message says the service has stopped and how to browse the results."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lesiontrack.config.settings import load_settings
from tests.support.services import LESIONTRACK

pytestmark = pytest.mark.slow


def test_demo_logs_one_line_per_association_and_job(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    r = subprocess.run(
        [
            *LESIONTRACK,
            "--log-level",
            "INFO",
            "demo",
            "--workdir",
            str(work),
            "--size",
            "40x96x96",
            "--spacing-mm",
            "3",
            "--lesions",
            "2",
            "--followups",
            "2",
            "--no-keep-running",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [
        ln for ln in r.stderr.splitlines() if re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR)", ln)
    ]
    assocs = [ln for ln in lines if "dicom_node.inbound.scp: association from" in ln]
    # baseline CT + its SEG in one association, then each of the two follow-ups
    assert len(assocs) == 3, "\n".join(assocs)
    assert all(" INFO " in ln and "released" in ln and "instances stored" in ln for ln in assocs)
    assert re.search(r": 41 instances stored, .* 2 series, released", assocs[0])
    jobs = [ln for ln in lines if re.search(r"pipeline\.jobs\.analysis: job \d+ (done|nothing_to_track|failed):", ln)]
    ids = [re.search(r"job (\d+) ", ln).group(1) for ln in jobs]
    assert sorted(ids) == ["1", "2", "3"], "\n".join(jobs)
    assert sum(" done:" in ln for ln in jobs) == 2
    assert all(
        "prior " in ln and "lesions" in ln and " s (" in ln and "delivery:" in ln for ln in jobs if " done:" in ln
    )
    noisy = [ln for ln in lines if re.search(r"(alembic|highdicom)", ln) or re.search(r"\bstored 1\.2\.", ln)]
    assert noisy == []
    # no patient identifiers at INFO or above (the synthetic patient's ID and name)
    assert not [ln for ln in lines if "DEMO-0011" in ln or "Demo^Phantom" in ln]
    assert "the service has stopped" in r.stdout
    m = re.search(r"lesiontrack --config (\S+) serve", r.stdout)
    assert m is not None, r.stdout[-2000:]
    cfg = load_settings(Path(m.group(1)))
    assert Path(cfg.data_dir) == (work / "data").resolve()
    assert cfg.http.api_keys[0].name == "demo"
    assert f"http://127.0.0.1:{cfg.http.port}/" in r.stdout
