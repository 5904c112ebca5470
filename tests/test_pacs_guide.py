"""docs/pacs/orthanc.md, followed as written (issue 29): Orthanc's configuration is the guide's ``json`` block, its
routing the guide's ``lua`` block, LesionTrack's configuration the guide's ``toml`` block — only host names, ports,
paths and the data folder replaced by loopback values, plus the small phantom's working spacing — and LesionTrack
runs as the guide says: ``lesiontrack db upgrade``, then ``lesiontrack serve`` (a real subprocess, receiver
processes and all defaults of the guide).

Two patients: one whose baseline carries a radiologist's DICOM-SEG, one whose baseline carries only a TID 1500 SR
with RECIST long/short axis lines (as OHIF saves them). Their baselines are imported into Orthanc (not routed: no
earlier study), then three follow-ups each are uploaded to Orthanc and routed by its Lua script when stable. Each
follow-up must be analysed the first time (one job, one attempt, nothing skipped), with the prior retrieved by
LesionTrack from Orthanc, every baseline lesion in its report, and exactly one SEG, one TID 1500 SR and at most one
OHIF measurements SR back in Orthanc. The time from the first follow-up's upload to the last result is printed and
written to ``guide_timings.json`` in the test's folder (a figure, not an assertion)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from lesiontrack.db.models import JobState
from tests.support.e2e_site import sr_uids
from tests.support.pacs_guide import guide_json, guide_lua, guide_toml
from tests.support.services import LESIONTRACK, OrthancServer, free_port, wait_for, wait_for_port

pytestmark = [pytest.mark.services, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


# -- the radiologist's RECIST lines ---------------------------------------------------------------------------------
def recist_sr(patient: Any, dest: Path) -> Path:
    """A reader's TID 1500 SR on the baseline: per lesion a long axis and a short axis POLYLINE on the slice where
    the lesion is largest (OHIF's bidirectional measurement), under the lesion's Tracking UID and name. No SEG."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from lesiontrack.models.imaging.dicom_read import read_series
    from lesiontrack.pipeline.dicom.seg.reader import read_seg

    ct = read_series(patient.baseline.files)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.baseline.files]
    by_z = {round(float(d.ImagePositionPatient[2]), 2): d for d in datasets}
    groups = []
    for segment in read_seg(patient.seg_file, ct).segments:
        m = np.asarray(segment.mask.array) > 0
        assert m.shape == ct.shape
        k = int(np.argmax(m.sum(axis=(1, 2))))
        sl = np.argwhere(m[k])
        (j0, i0), (j1, i1) = sl.min(0), sl.max(0)
        ds = by_z[round(float(ct.index_to_patient([0, 0, k])[2]), 2)]
        src = hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID)
        cx, cy = (i0 + i1) / 2 + 0.5, (j0 + j1) / 2 + 0.5
        horiz = np.array([[i0 + 0.5, cy], [i1 + 0.5, cy]], np.float32)
        vert = np.array([[cx, j0 + 0.5], [cx, j1 + 0.5]], np.float32)
        sx, sy = float(ct.spacing[0]), float(ct.spacing[1])
        long_mm, short_mm = (i1 - i0 + 1) * sx, (j1 - j0 + 1) * sy
        if short_mm > long_mm:
            (horiz, long_mm), (vert, short_mm) = (vert, short_mm), (horiz, long_mm)
        meas = [
            hd.sr.Measurement(
                codes.SCT.LongAxis,
                float(long_mm),
                codes.UCUM.Millimeter,
                referenced_coordinates=[hd.sr.CoordinatesForMeasurement("POLYLINE", horiz, src)],
            ),
            hd.sr.Measurement(
                codes.SCT.ShortAxis,
                float(short_mm),
                codes.UCUM.Millimeter,
                referenced_coordinates=[hd.sr.CoordinatesForMeasurement("POLYLINE", vert, src)],
            ),
        ]
        tid = hd.sr.TrackingIdentifier(uid=segment.identity.tracking_uid, identifier=segment.identity.tracking_id)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(tracking_identifier=tid, measurements=meas))
    observer = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Reader^One"),
        )
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=datasets,
        content=hd.sr.MeasurementReport(observer, codes.LN.CTUnspecifiedBodyRegion, groups),
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Reading workstation",
        series_description="Baseline RECIST measurements",
    )
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "recist_sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


# -- configuration from the guide -----------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_table(name: str, table: dict[str, Any], out: list[str], array: bool = False) -> None:
    out.append(f"[[{name}]]" if array else f"[{name}]")
    nested = []
    for k, v in table.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            nested.append((k, v))
        else:
            out.append(f"{k} = {_toml_value(v)}")
    for k, v in nested:
        if isinstance(v, dict):
            _toml_table(f"{name}.{k}", v, out)
        else:
            for item in v:
                _toml_table(f"{name}.{k}", item, out, array=True)


def dump_toml(cfg: dict[str, Any]) -> str:
    out: list[str] = []
    tables = []
    for k, v in cfg.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            tables.append((k, v))
        else:
            out.append(f"{k} = {_toml_value(v)}")
    for k, v in tables:
        if isinstance(v, dict):
            _toml_table(k, v, out)
        else:
            for item in v:
                _toml_table(k, item, out, array=True)
    return "\n".join(out) + "\n"


class GuideSite:
    """Orthanc and ``lesiontrack serve`` configured from docs/pacs/orthanc.md."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dicom_port, self.http_port = free_port(), free_port()
        cfg = guide_toml()
        self.key = str(cfg["http"]["api_keys"][0]["key"])  # the key the guide's Lua script sends too
        self.http = f"http://127.0.0.1:{self.http_port}"
        lua = root / "lesiontrack.lua"
        lua.write_text(guide_lua(self.http, self.key))
        self.orthanc = OrthancServer(root / "orthanc", extra_config=guide_json("127.0.0.1", self.dicom_port, lua))
        self.orthanc.start()
        cfg["data_dir"] = str(root / "data")
        cfg["dicom"] |= {"port": self.dicom_port, "bind_address": "127.0.0.1"}
        cfg["http"] |= {"port": self.http_port, "bind_address": "127.0.0.1"}
        [peer] = cfg["pacs"]
        peer["host"], peer["port"] = "127.0.0.1", self.orthanc.dicom_port
        # the small phantom is registered at 4 mm (the demo: 3 mm; clinical CT: the default 2 mm) — not a site setting
        cfg["engines"] = {"working_spacing_mm": 4.0}
        self.config = root / "lesiontrack.toml"
        self.config.write_text(dump_toml(cfg))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONTRACK_")}
        self.env |= {"PYTHONPATH": str(REPO), "LESIONTRACK_CONFIG": str(self.config)}
        up = subprocess.run([*LESIONTRACK, "db", "upgrade"], env=self.env, capture_output=True, text=True, cwd=root)
        assert up.returncode == 0, up.stderr + up.stdout
        with open(root / "serve.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*LESIONTRACK, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=root
            )
        wait_for_port(self.dicom_port, timeout=120)
        wait_for_port(self.http_port, timeout=120)
        from lesiontrack.config.settings import load_settings
        from lesiontrack.db.session import make_engine, make_session_factory

        settings = load_settings(self.config)
        self.engine = make_engine(settings.effective_database_url)
        self.sf = make_session_factory(self.engine)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.engine.dispose()
        self.orthanc.stop()

    def api(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.http}{path}", headers={"X-API-Key": self.key})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def upload(self, files: list[Path]) -> None:
        for f in files:
            self.orthanc.upload(f)

    def jobs(self, series_uid: str) -> list[Any]:
        from lesiontrack.pipeline.jobs.store import JobStore

        return [v for v in JobStore(self.sf).list() if v.followup_series_uid == series_uid]

    def finished(self, series_uid: str) -> Any:
        jobs = self.jobs(series_uid)
        return bool(jobs) and all(j.finished for j in jobs) and jobs

    def results_in_orthanc(self, study_uid: str) -> dict[int, list[pydicom.Dataset]]:
        """Our objects in the follow-up study, by series number (901 SEG, 902 TID 1500 SR, 903 OHIF SR)."""
        found = self.orthanc.post("/tools/lookup", study_uid)
        out: dict[int, list[pydicom.Dataset]] = {}
        for series in self.orthanc.get_json(f"/studies/{found[0]['ID']}/series"):
            if series["MainDicomTags"].get("Modality") not in ("SEG", "SR"):
                continue
            for inst in series["Instances"]:
                with urllib.request.urlopen(f"{self.orthanc.url}/instances/{inst}/file", timeout=60) as r:
                    ds = pydicom.dcmread(io.BytesIO(r.read()))
                out.setdefault(int(ds.SeriesNumber), []).append(ds)
        return out

    def delivered(self, study_uid: str) -> bool:
        objs = self.results_in_orthanc(study_uid)
        return bool(objs.get(901)) and bool(objs.get(902))


def _check_follow_up(site: GuideSite, fu: Any, base_uids: set[str], prior_series: str, tmp: Path) -> None:
    jobs = site.jobs(fu.series_uid)
    assert len(jobs) == 1, [(j.id, j.state, j.error) for j in jobs]
    job = jobs[0]
    assert job.state is JobState.DONE, job.error
    assert job.attempts == 1, f"analysed only at attempt {job.attempts}"
    from lesiontrack.pipeline.jobs.contract import job_results

    match = job_results(job.step_outputs).match
    assert match is not None
    assert match.prior.ct_series_uid == prior_series
    objs = site.results_in_orthanc(fu.study_uid)
    counts = {k: len(v) for k, v in objs.items()}
    assert counts.get(901) == 1, counts
    assert counts.get(902) == 1, counts
    assert counts.get(903, 0) <= 1, counts
    assert set(counts) <= {901, 902, 903}, counts
    reported = sr_uids(objs[902][0])
    assert base_uids <= reported, f"baseline lesions missing from the report: {base_uids - reported}"


def _run_patient(site: GuideSite, patient: Any, prior_annotation: Path, tmp: Path) -> float:
    base_uids = {les["tracking_uid"] for les in patient.lesions}
    site.upload([*patient.baseline.files, prior_annotation])  # the import: no earlier study, not routed
    t0 = time.monotonic()
    for fu in patient.followups:
        site.upload(fu.files)  # Orthanc routes each one when it is stable (the guide's Lua)
    for fu in patient.followups:
        series_uid, study_uid = fu.series_uid, fu.study_uid
        wait_for(partial(site.finished, series_uid), 900, f"the analysis of {series_uid}")
        wait_for(partial(site.delivered, study_uid), 300, f"the results of {series_uid} in Orthanc")
    elapsed = time.monotonic() - t0
    for fu in patient.followups:
        _check_follow_up(site, fu, base_uids, patient.baseline.series_uid, tmp)
    skipped = {s["series_instance_uid"]: s["routing_reason"] for s in site.api("/api/series?state=skipped")["items"]}
    routed = {fu.series_uid for fu in patient.followups}
    assert not routed & set(skipped), {u: skipped[u] for u in routed & set(skipped)}
    # the baseline was never routed by the script: it reached LesionTrack only as a retrieved prior
    base = site.api(f"/api/series/{patient.baseline.series_uid}")
    assert base["routing_reason"].startswith("retrieved as prior"), base
    assert base["jobs"] == [], base
    return elapsed


def test_the_orthanc_guide_as_written_two_patients_three_follow_ups(tmp_path: Path) -> None:
    from lesiontrack.demo_data import FollowUps, make_patient

    small = {
        "shape": (40, 80, 80),
        "spacing": (3.0, 3.0, 3.0),
        "n_lesions": 3,
        "n_followups": 3,
        "follow_ups": FollowUps.MOTION,
    }
    chest = make_patient(tmp_path / "seg-patient", seed=5, **small)
    abdomen = make_patient(tmp_path / "sr-patient", seed=8, **small)
    lines = recist_sr(abdomen, tmp_path / "sr-patient" / "baseline_sr")
    site = GuideSite(tmp_path)
    try:
        timings = {
            "baseline SEG patient": _run_patient(site, chest, chest.seg_file, tmp_path),
            "baseline SR lines patient": _run_patient(site, abdomen, lines, tmp_path),
        }
        from lesiontrack.pipeline.jobs.contract import job_results

        sr_job = site.jobs(abdomen.followups[0].series_uid)[0]
        match = job_results(sr_job.step_outputs).match
        assert match is not None, "prompted from the reader's lines"
        assert match.prior.annotation.modality == "SR", "prompted from the reader's lines"
    finally:
        site.stop()
    (tmp_path / "guide_timings.json").write_text(json.dumps(timings, indent=1))
    print(f"\nfirst follow-up uploaded -> last result in Orthanc, per patient (3 follow-ups): {timings}")
