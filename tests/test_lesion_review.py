"""Per-lesion confidence and review flags (issue 15, item 3) reach every place a radiologist or operator looks.

The real pipeline runs in-process on a phantom patient whose follow-up lies on the baseline's position (registration
'none' keeps it fast); one lesion is erased from the follow-up (in-painted with its surroundings), so the tracker
reports it vanished although the annotation shows it: that result is flagged for review, the stable ones are not.
The flag and its reasons must appear in the SR (qualitative evaluation + confidence NUM, validators at 0 errors),
the API timeline, the dashboard timeline, the job summary, the lesion exports and ``/metrics``. How well the
confidence finds failed segmentations is measured in ``bench/confidence.py``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi
from sqlalchemy import select

from lesiontrack.db.models import LesionObservation
from lesiontrack.db.session import session_scope
from lesiontrack.pipeline.jobs.contract import job_results
from lesiontrack.pipeline.science.confidence import (
    ConfidenceRules,
    Evidence,
    LesionConfidence,
    assess_lesion,
    combine,
    review_text,
)
from tests.support.patient import STILL_SEED, STILL_SHAPE, STILL_SPACING, still_patient
from tests.support.service_site import analyse_first_followup
from tests.support.validators import assert_seg_and_sr_validate

API_KEY = {"X-API-Key": "demo"}
ERASED = 2  # phantom label of the lesion erased from the follow-up


def _erase_lesion(files: list[Path], seed: int, shape: tuple[int, int, int], spacing: tuple[float, ...]) -> None:
    """In-paint lesion ERASED in the follow-up's DICOM slices with the tissue around it (same grid: no motion)."""
    from lesiontrack.synthetic.phantom import make_phantom

    ph = make_phantom(seed=seed, shape=shape, spacing=spacing, n_lesions=3)
    slices = {}
    for f in files:
        ds = pydicom.dcmread(f)
        k = round(float(ph.ct.patient_to_index(np.array([float(v) for v in ds.ImagePositionPatient]))[2]))
        slices[k] = (f, ds)
    assert sorted(slices) == list(range(shape[0]))
    hu = np.stack(
        [
            slices[k][1].pixel_array * float(slices[k][1].RescaleSlope) + float(slices[k][1].RescaleIntercept)
            for k in range(shape[0])
        ]
    ).astype(np.float32)
    lesion = ndi.binary_dilation(ph.lesions.array == ERASED, iterations=2)
    ring = ndi.binary_dilation(lesion, iterations=3) & ~lesion & (ph.lesions.array == 0)
    _, near = ndi.distance_transform_edt(~ring, return_indices=True)
    hu[lesion] = hu[tuple(i[lesion] for i in near)]
    for k, (f, ds) in slices.items():
        px = (hu[k] - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
        ds.PixelData = np.rint(px).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(f)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from lesiontrack.demo import demo_settings

    tmp = tmp_path_factory.mktemp("review")
    settings = demo_settings(
        tmp / "data", http=False, engines={"registration": "none"}, detection={"new_lesions": False}
    )
    patient = still_patient(tmp / "patient", n_followups=1)
    _erase_lesion(list(patient.followups[0].files), STILL_SEED, STILL_SHAPE, STILL_SPACING)
    analysed = analyse_first_followup(settings, patient)
    erased_uid = next(les["tracking_uid"] for les in patient.lesions if les["label"] == ERASED)
    return {
        "sf": analysed.sf,
        "job": analysed.job,
        "client": analysed.client,
        "patient_pk": analysed.patient_pk,
        "erased": erased_uid,
        "uids": [les["tracking_uid"] for les in patient.lesions],
    }


def test_the_erased_lesion_is_flagged_and_the_stable_ones_are_not(site: dict[str, Any]) -> None:
    track = job_results(site["job"].step_outputs).track
    assert track is not None
    by_uid = {les.tracking_uid: les for les in track.lesions}
    erased = by_uid[site["erased"]]
    assert erased.status == "vanished"
    assert erased.review
    assert erased.review_reasons
    assert erased.confidence is not None
    assert erased.confidence < 0.5
    others = [les for uid, les in by_uid.items() if uid != site["erased"]]
    assert others
    assert all(les.status == "present" and not les.review for les in others)
    assert all(les.confidence is not None and les.confidence >= 0.5 for les in others)
    with session_scope(site["sf"]) as s:
        rows = s.scalars(select(LesionObservation).where(LesionObservation.job_pk == site["job"].id)).all()
        flagged = {o.series_instance_uid for o in rows if o.review}
        assert flagged == {site["job"].followup_series_uid}
        assert sum(o.review for o in rows) == 1
        assert all(o.review_reasons for o in rows if o.review)


def test_job_summary_says_how_many_need_review(site: dict[str, Any]) -> None:
    from lesiontrack.pipeline.jobs.job_summary import job_summary

    job = site["job"]
    line = job_summary(job.id, job.followup_series_uid, "done", job.step_outputs, {})
    assert "1 of 3 lesions need review" in line
    unscored = {**job.step_outputs, "track": {**job.step_outputs["track"]}}
    unscored["track"]["lesions"] = [
        {**les, "confidence": None, "review": False} for les in job.step_outputs["track"]["lesions"]
    ]
    assert "review" not in job_summary(job.id, job.followup_series_uid, "done", unscored, {})  # not assessed


def _content(items: Any) -> list[Any]:
    out = []
    for it in items:
        out.append(it)
        out.extend(_content(it.get("ContentSequence", [])))
    return out


def test_sr_states_the_review_flag_per_measurement_group(site: dict[str, Any]) -> None:
    written = job_results(site["job"].step_outputs).written
    assert written is not None
    assert written.sr
    ds = pydicom.dcmread(written.sr)
    flags: dict[str, set[str]] = {}
    confidences: dict[str, float] = {}
    reasons: dict[str, list[str]] = {}
    for group in _content(ds.ContentSequence):
        if group.get("ValueType") != "CONTAINER":
            continue
        kids = group.get("ContentSequence", [])
        uid = next((str(k.UID) for k in kids if k.get("ValueType") == "UIDREF"), None)
        if uid is None:
            continue
        for k in kids:
            name = k.ConceptNameCodeSequence[0].CodeValue if k.get("ConceptNameCodeSequence") else None
            if name == "LT053":
                flags.setdefault(uid, set()).add(str(k.ConceptCodeSequence[0].CodeMeaning))
            if name == "LT056":
                confidences[uid] = float(k.MeasuredValueSequence[0].NumericValue)
            if name == "LT057":  # the SR says why (issue 29 item 5)
                reasons.setdefault(uid, []).append(str(k.TextValue))
    assert flags[site["erased"]] == {"Flagged for review"}
    assert reasons.get(site["erased"])
    for uid in site["uids"]:
        if uid != site["erased"]:
            assert flags[uid] == {"Not flagged for review"}
            assert uid not in reasons
    assert set(confidences) == set(site["uids"])
    assert confidences[site["erased"]] < 0.5


def test_seg_and_sr_with_review_flags_validate(site: dict[str, Any]) -> None:
    written = job_results(site["job"].step_outputs).written
    assert written is not None
    assert written.seg
    assert written.sr
    assert_seg_and_sr_validate(written.seg, written.sr)


def test_api_dashboard_exports_and_metrics_show_the_flag(site: dict[str, Any]) -> None:
    client, pk = site["client"], site["patient_pk"]
    tl = client.get(f"/api/patients/{pk}/timeline", headers=API_KEY).json()
    row = next(r for r in tl["lesions"] if r["tracking_uid"] == site["erased"])
    cell = row["cells"][1]
    assert cell["review"] is True
    assert cell["review_reasons"]
    assert cell["confidence"] < 0.5
    assert tl["timepoints"][1]["lesions_need_review"] == 1
    assert tl["timepoints"][1]["lesions_observed"] == 3
    assert tl["timepoints"][1]["lesions_assessed"] == 3
    assert tl["timepoints"][0]["lesions_assessed"] == 0
    others = [r["cells"][1] for r in tl["lesions"] if r["tracking_uid"] != site["erased"]]
    assert all(c["review"] is False for c in others)

    text = client.get(f"/api/patients/{pk}/export/lesions.csv", headers=API_KEY).text
    rows = list(csv.DictReader(io.StringIO(text)))
    fu = [r for r in rows if r["timepoint_index"] == "1"]
    assert {r["tracking_uid"] for r in fu if r["review"] == "True"} == {site["erased"]}
    assert next(r for r in fu if r["tracking_uid"] == site["erased"])["review_reasons"]

    browser = client
    browser.post("/login", data={"key": "demo", "next": "/"})
    html = browser.get(f"/patients/{pk}").text
    obs = cell["observation_id"]
    start = html.index(f'data-observation-id="{obs}"')
    td_open = html.rindex("<td", 0, start)
    td = html[td_open : html.index("</td>", start)]
    assert "needs-review" in td
    assert 'data-review="true"' in td
    assert ">review</span>" in td
    assert "1 of 3 lesions need review" in html

    metrics = client.get("/metrics", headers=API_KEY).text
    assert 'lesiontrack_lesion_results{review="flagged"} 1.0' in metrics


def test_confidence_scores_a_leak_and_a_clean_result() -> None:
    """Unit check of pipeline.science.confidence on a synthetic sphere: the clean result scores high, a result that
    leaked
    into an abutting structure far beyond the prompt scores low with a reason, and the review text reads right."""
    from lesiontrack.models.imaging.volume import Volume
    from lesiontrack.models.registration.identity import IdentityRegistration

    rng = np.random.default_rng(0)
    k, j, i = np.meshgrid(np.arange(48), np.arange(48), np.arange(48), indexing="ij")
    sphere = (k - 24) ** 2 + (j - 24) ** 2 + (i - 24) ** 2 <= 36
    blob = (k - 24) ** 2 + (j - 24) ** 2 + (i - 36) ** 2 <= 36
    img = np.where(sphere | blob, 40.0, -850.0) + rng.normal(0, 10, sphere.shape)
    ct = Volume(img.astype(np.int16), spacing=np.ones(3))
    m = ct.with_array(sphere.astype(np.uint8))
    reg = IdentityRegistration(ct, ct)
    kw: dict[str, Any] = dict(source_ct=ct, source_mask=m, followup_ct=ct, prompt=m, present=True, reg=reg)
    clean = assess_lesion(result=m, **kw)
    leak = assess_lesion(result=ct.with_array((sphere | blob).astype(np.uint8)), **kw)
    assert clean.confidence >= 0.9
    assert not clean.review
    assert leak.review
    assert leak.confidence < 0.5
    assert any("prompt" in r for r in leak.reasons)
    strict = assess_lesion(result=m, rules=ConfidenceRules(review_threshold=1.01), **kw)
    assert strict.review  # the threshold is what decides
    assert review_text(2, 5) == "2 of 5 lesions need review"
    assert review_text(0, 1) == "none of 1 lesion needs review"


def test_annotation_margin_is_relative_to_the_lesions_own_contrast() -> None:
    """A low-contrast lesion (-25 HU in liver-like tissue, noise sd 13 HU) annotated exactly stands out on its CT
    (the former absolute +10 HU allowance gave it 0.70, as low as a rough annotation); a rough sphere drawn off
    centre over it does not."""
    from lesiontrack.models.imaging.volume import Volume
    from lesiontrack.pipeline.science.confidence import margin

    rng = np.random.default_rng(1)
    k, j, i = np.meshgrid(np.arange(48), np.arange(48), np.arange(48), indexing="ij")
    lesion = (k - 24) ** 2 + (j - 24) ** 2 + (i - 24) ** 2 <= 49
    rough = (k - 24) ** 2 + (j - 24) ** 2 + (i - 29) ** 2 <= 100
    img = np.where(lesion, 80.0, 105.0) + ndi.gaussian_filter(rng.normal(0, 60, lesion.shape), 0.8)
    ct = Volume(img.astype(np.int16), spacing=np.ones(3))
    exact_m, rough_m = margin(ct, lesion), margin(ct, rough)
    assert exact_m is not None
    assert rough_m is not None
    assert exact_m >= 0.8
    assert rough_m <= 0.55


# the evidence of a clear result found where the annotation was, eight weeks on: each check varies one part of it
CLEAR_RESULT: Evidence = {
    "present": True,
    "days": 56,
    "containment": 0.95,
    "shift": 0.05,
    "beyond": 0.0,
    "result_margin": 0.95,
}


def conf(**kw: Any) -> LesionConfidence:
    """pipeline.science.confidence.combine on :data:`CLEAR_RESULT` with ``kw`` changed."""
    return combine(cast(Evidence, {**CLEAR_RESULT, **kw}))


def test_consistency_is_scaled_by_the_interval_and_charged_to_the_odd_one_out() -> None:
    """Evidence-level checks of pipeline.science.confidence.combine: a x2.8 change between neighbours 8 weeks apart is a
    plausible real change, x5 is not, x5 over 16 weeks is; a jump is charged to the result that departs further from
    the annotation's volume; a clear result overrules a poor annotation margin; a second concern lowers the score."""

    assert not conf(volume_ratio=2.8, neighbour_ratio=2.8, neighbour_days=56).review
    fast = conf(volume_ratio=2.9, neighbour_ratio=5.0, neighbour_days=56, days=112)
    assert fast.review
    assert any("neighbouring timepoint" in r for r in fast.reasons)
    assert not conf(volume_ratio=2.9, neighbour_ratio=5.0, neighbour_days=112, days=224).review
    # our neighbour was the odd one out (x5 against the annotation), we are back near the annotation's volume
    assert not conf(volume_ratio=1.0, neighbour_ratio=0.2, neighbour_days=56, days=112).review
    # a rough annotation (margin 0.3): flagged unless the result stands out clearly on the follow-up
    assert conf(annotation_margin=0.3, result_margin=0.75).review
    assert not conf(annotation_margin=0.3, result_margin=0.95).review
    one = conf(annotation_margin=0.6, result_margin=0.82).confidence
    two = conf(annotation_margin=0.6, result_margin=0.82, ncc=0.6).confidence
    assert 0 < two < one < 1


def test_every_recorded_reason_flags_the_lesion() -> None:
    """Issue 29 item 5: a reason of doubt is recorded exactly when it flags the lesion. A mild local Jacobian
    (0.57..1.47, score about 0.86) is not a reason of doubt: it stays a signal with its value, no reason is recorded
    and the lesion is not flagged; a result with a reason always says "flagged"."""
    mild = conf(jac_lo=0.57, jac_hi=1.47)
    jac = mild.signal("jacobian")
    assert jac is not None
    assert jac.score < 1
    assert not mild.review
    assert mild.reasons == []
    folded = conf(jac_lo=-0.1, jac_hi=1.2)
    assert folded.review
    assert "registration folds near the lesion" in folded.reasons
    for ev in (
        {"ncc": 0.5},
        {"ncc": 0.7, "annotation_margin": 0.65, "result_margin": 0.85},
        {"volume_ratio": 0.8, "diameter_ratio": 1.12},
        {"volume_ratio": 0.885, "registration_ratio": 1.3},
        {"annotation_margin": 0.7},
    ):
        c = conf(**ev)
        assert bool(c.reasons) == c.review, (ev, c)


def test_a_change_that_contradicts_itself_or_the_registration_is_flagged() -> None:
    """Issue 29 item 5: volume and RECIST diameter changing in opposite directions, or a volume change the
    registration's Jacobian does not explain (it stretched the lesion's region by +30 %, the result says -11.5 %),
    flag the lesion and say why; measurement noise, a coherent change and a rigid registration do not."""

    contra = conf(volume_ratio=0.75, diameter_ratio=1.12)
    assert contra.review
    assert any("signs disagree" in r for r in contra.reasons)
    assert not conf(volume_ratio=0.97, diameter_ratio=1.03).review  # noise
    assert not conf(volume_ratio=1.41, diameter_ratio=1.12).review  # coherent growth
    assert not conf(volume_ratio=0.5, diameter_ratio=0.8).review  # coherent shrinkage

    short = conf(volume_ratio=0.885, registration_ratio=1.3)
    assert short.review
    assert any("Jacobian" in r for r in short.reasons)
    assert not conf(volume_ratio=1.41, registration_ratio=1.3).review  # growth beyond the registration's: expected
    assert not conf(volume_ratio=0.885, registration_ratio=1.04).review  # a near-rigid registration says nothing
    assert conf(volume_ratio=1.3, registration_ratio=0.7).review  # the registration shrank it, the result grew


def test_registration_volume_ratio_reads_the_jacobian_of_the_mapping() -> None:
    """The registration's implied volume change of a region: 1 / mean Jacobian determinant of the follow-up →
    source mapping (a uniform 10 % stretch along each axis: x1.331)."""
    from lesiontrack.models.imaging.volume import Volume
    from lesiontrack.pipeline.science.confidence import registration_volume_ratio

    class Stretch:
        def map_points_to_baseline(self, pts: np.ndarray) -> np.ndarray:
            return np.asarray(pts, float) / 1.1

    grid = Volume(np.zeros((20, 20, 20), np.int16), spacing=np.ones(3))
    region = np.zeros((20, 20, 20), bool)
    region[5:15, 5:15, 5:15] = True
    ratio = registration_volume_ratio(Stretch(), region, grid)
    assert ratio is not None
    assert abs(ratio - 1.331) < 1e-3
    assert registration_volume_ratio(Stretch(), np.zeros_like(region), grid) is None


def test_a_result_short_of_the_registrations_own_change_is_flagged_end_to_end() -> None:
    """Issue 29 item 5, through :func:`assess_lesion` (the tracking loop's call): the registration stretches the
    lesion's region by x1.30 (it followed a growing lesion), the result is under-segmented (x0.90 against the
    annotation): flagged, with the reason naming the registration's Jacobian; the same registration with a result
    that follows the growth is not flagged."""
    from lesiontrack.models.imaging.volume import Volume

    scale, centre = 1.09, np.array([20.0, 20.0, 20.0])

    class Scaling:  # follow-up → annotation mapping of a uniform expansion about the lesion's centre
        def map_points_to_baseline(self, pts: np.ndarray) -> np.ndarray:
            return centre + (np.asarray(pts, float) - centre) / scale

    k, j, i = np.meshgrid(np.arange(41), np.arange(41), np.arange(41), indexing="ij")
    r = np.sqrt((k - 20) ** 2 + (j - 20) ** 2 + (i - 20) ** 2)

    def ct(radius: float) -> Volume:
        return Volume(np.where(r <= radius, 40, -850).astype(np.int16), spacing=np.ones(3))

    source_ct, followup_ct = ct(6.0), ct(6.0 * scale)
    kw: dict[str, Any] = dict(
        source_ct=source_ct,
        source_mask=source_ct.with_array((r <= 6.0).astype(np.uint8)),
        followup_ct=followup_ct,
        prompt=followup_ct.with_array((r <= 6.0 * scale).astype(np.uint8)),
        present=True,
        reg=Scaling(),
        days=56,
    )
    short = assess_lesion(result=followup_ct.with_array((r <= 5.8).astype(np.uint8)), **kw)
    assert short.review, short
    assert any("Jacobian" in reason for reason in short.reasons), short
    sig = short.signal("registration_change")
    assert sig is not None
    assert sig.score < 0.5
    follows = assess_lesion(result=followup_ct.with_array((r <= 6.0 * scale).astype(np.uint8)), **kw)
    assert not follows.review, follows
    assert follows.reasons == [], follows
