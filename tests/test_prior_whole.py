"""A prior is used only when it is whole (issue 29): the PACS holds the first half of the baseline CT (its import is
still under way) and the radiologist's SEG of all of it. LesionTrack retrieves what the PACS has, sees that the SEG
references CT instances it does not hold, and the job waits (retry_wait, the reason recorded) — nothing is analysed
or sent from the first half. Once the second half reaches the PACS, the retry retrieves it and the one result sent
reports every baseline lesion. Real Orthanc, embedded service, real analysis steps on a small phantom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from lesiontrack.db.models import AuditEvent, Delivery, JobState
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.contract import RetrievePriorsOutput, job_results, read_output
from tests.support.e2e_site import Site, sr_uids
from tests.support.services import wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_a_prior_arriving_in_two_halves_is_never_analysed_half(tmp_path: Path) -> None:
    from lesiontrack.demo_data import FollowUps, make_patient

    patient = make_patient(
        tmp_path / "patient",
        seed=7,
        shape=(48, 96, 96),
        spacing=(3.0, 3.0, 3.0),
        n_lesions=3,
        n_followups=1,
        follow_ups=FollowUps.MOTION,
    )
    base = sorted(patient.baseline.files)
    first, second = base[: len(base) // 2], base[len(base) // 2 :]
    fu = patient.followups[0]
    site = Site(tmp_path, "C-MOVE", worker={"retry_backoff_seconds": [1.0], "max_attempts": 50})
    try:
        site.upload([*first, patient.seg_file])  # the PACS has half the baseline CT, and the whole SEG
        site.route(site.upload(fu.files))
        store = site.service.job_store

        def waiting() -> Any:
            v = store.latest_for_series(fu.series_uid)
            return v is not None and v.state is JobState.RETRY_WAIT and v.error and v

        view = wait_for(waiting, 300, "the job to wait for the rest of the prior")
        assert "not held here" in (view.error or ""), view.error
        with session_scope(site.service.session_factory) as s:
            assert s.scalars(select(Delivery)).first() is None, "nothing may be sent from half a prior"
        assert "SEG" not in site.results_in_orthanc(fu.study_uid)

        site.upload(second)  # the rest of the prior reaches the PACS
        done = site.analyse(fu.series_uid, timeout=600)
        results = job_results(done.step_outputs)
        retrieved = read_output(done.step_outputs, RetrievePriorsOutput)
        assert retrieved is not None
        assert retrieved.ct_files == len(base)
        objs = site.results_in_orthanc(fu.study_uid)
        assert len(objs.get("SEG", [])) == 1, {k: len(v) for k, v in objs.items()}
        report = next(d for d in objs["SR"] if int(d.SeriesNumber) == 902)
        base_uids = {les["tracking_uid"] for les in patient.lesions}
        assert base_uids <= sr_uids(report), "every baseline lesion is in the one result"
        with session_scope(site.service.session_factory) as s:
            waits = [
                e
                for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "job.state"))
                if (e.details or {}).get("to") == "retry_wait"
            ]
        assert waits, "the wait is visible in the audit trail"
        seg = pydicom.dcmread(patient.seg_file, stop_before_pixels=True)
        assert results.match is not None
        assert results.match.prior.annotation.sop_instance_uid == str(seg.SOPInstanceUID)
    finally:
        site.stop()
