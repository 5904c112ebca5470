"""Issue 31 item 3: a radiologist's annotation on a follow-up is a person-made prompt source at that timepoint.

An arrow on a lesion that tracking lost re-finds it there and from there on (nearest-annotation propagation), while
the lesions that annotation does not mark are still propagated to that timepoint from their own nearest annotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bench.drawn_lesions import drawings
from lesiontrack.config.settings import Settings
from lesiontrack.db.models import JobState, Lesion, LesionOrigin
from lesiontrack.db.session import make_engine, make_session_factory, session_scope, upgrade
from lesiontrack.demo import demo_settings
from lesiontrack.demo_data import DemoPatient
from lesiontrack.dicom_node.inbound.ingest import Ingestor, ingest_file
from lesiontrack.dicom_node.inbound.scp import storage_root
from lesiontrack.dicom_node.inbound.storage import InstanceStore
from lesiontrack.models.engines import build_segmentation
from lesiontrack.models.imaging.dicom_read import read_series
from lesiontrack.models.segmentation.drawing import Drawing, DrawingKind
from lesiontrack.pipeline.dicom.annotations.common import drawing_prompt
from lesiontrack.pipeline.dicom.seg.reader import read_seg_prompts_and_gaps
from lesiontrack.pipeline.jobs.contract import LoadVolumesOutput, TrackOutput, WriteSegSrOutput, read_output
from lesiontrack.pipeline.jobs.followup_annotations import person_annotations_on
from lesiontrack.pipeline.jobs.steps import build_pipeline
from lesiontrack.pipeline.science.lesions import LesionStatus
from lesiontrack.pipeline.science.tracking import Confirmed, NoRegistrationEngine, track_lesions
from lesiontrack.service import build_analysis_service, build_ports
from lesiontrack.synthetic.annotations import Mark, write_gsps
from tests.support.correction import write_correction
from tests.support.phantom import LESIONS, dice, mask_prompts, phantom_volumes, series
from tests.support.still_patient import still_patient


def test_an_arrow_on_a_lost_lesion_at_a_follow_up_re_finds_it_there_and_from_there_on() -> None:
    # the patient moves 25 mm at T2 and no registration corrects it: propagated from T0 every lesion is missed there
    shift = (25.0, 0.0, 0.0)
    radii = [[les.radius_mm for les in LESIONS]] * 4
    phantom = series(seed=5, shifts_mm=((0, 0, 0), (0, 0, 0), shift, shift), radii_per_tp=radii)
    tps = phantom_volumes(phantom)
    prompts = mask_prompts(phantom[0])
    lung = next(p for p in prompts if p.identity.label == 1)
    truth2 = phantom[2].labels.array == 1
    kji = np.argwhere(truth2).mean(axis=0)
    tip = phantom[2].labels.index_to_patient(kji[::-1])
    arrow = Drawing(DrawingKind.ARROW, [np.stack([tip, tip + np.array([0.0, -20.0, 0.0])])], what="GSPS arrow")
    track_lesions(
        tps,
        prompts,
        source_index=0,
        registration=NoRegistrationEngine(),
        segmentation=build_segmentation("adaptive"),
        confirmed=Confirmed({2: [drawing_prompt(lung.identity, arrow, "GSPS on T2")]}, partial=True),
    )
    for t in (1, 2, 3):  # every lesion has a result at every timepoint, the arrow's timepoint included
        assert sorted(les.identity.label for les in tps[t].lesions) == [p.identity.label for p in prompts]
    at2 = {les.identity.label: les for les in tps[2].lesions}
    at3 = {les.identity.label: les for les in tps[3].lesions}
    assert at2[1].status is LesionStatus.PRESENT
    assert at2[1].meta.get("prompt_origin") == "arrow"
    assert dice(at2[1].mask.array > 0, truth2) > 0.6
    assert at3[1].status is LesionStatus.PRESENT
    assert at3[1].propagated_from is not None
    assert at3[1].propagated_from.timepoint_index == 2
    assert at3[1].propagated_from.by_person
    assert dice(at3[1].mask.array > 0, phantom[3].labels.array == 1) > 0.6
    assert at3[1].meta.get("review")  # from an arrow: flagged until a person confirms it
    for label in (2, 3, 5):  # the lesions the arrow does not mark: still from T0's annotation
        assert at2[label].propagated_from is not None
        assert at2[label].propagated_from.timepoint_index == 0
        assert at3[label].propagated_from is not None
        assert at3[label].propagated_from.timepoint_index == 0


def test_through_the_service_an_arrow_on_the_follow_up_is_a_prompt_at_that_timepoint(tmp_path: Path) -> None:
    """Baseline: a GSPS with a long-axis line per lesion. Follow-up: the radiologist's GSPS with an arrow on one
    lesion, labelled as on the baseline. The follow-up's job segments that lesion there from the arrow (a person's
    prompt at that timepoint, under the baseline's identity) and propagates the others from the baseline."""
    settings = demo_settings(tmp_path / "data", http=False, engines={"registration": "none"})
    settings.detection.new_lesions = False
    upgrade(settings.effective_database_url)
    sf = make_session_factory(make_engine(settings.effective_database_url))
    ingested = _ingest_patient_with_lines_and_an_arrow(tmp_path, settings, sf)
    patient, drawn, target, arrow = ingested.patient, ingested.drawn, ingested.target, ingested.arrow
    service = build_analysis_service(settings, sf, build_pipeline, ports=build_ports(settings, sf))
    job = service.store.create(patient.followups[0].series_uid)
    assert service.run(job) is JobState.DONE, service.store.get(job).error
    outputs = service.store.get(job).step_outputs
    loaded = read_output(outputs, LoadVolumesOutput)
    assert loaded is not None
    assert loaded.followup_annotations == [str(pydicom.dcmread(arrow, stop_before_pixels=True).SOPInstanceUID)]
    assert [(r.tracking_id, r.prompt_origin) for r in loaded.followup_lesions] == [(target, "arrow")]
    assert {r.prompt_object for r in [*loaded.lesions, *loaded.followup_lesions]} == {"GSPS"}
    # under the baseline's identity (same label): one lesion, not a new one
    assert {r.tracking_uid for r in loaded.followup_lesions} <= {r.tracking_uid for r in loaded.lesions}
    tracked = read_output(outputs, TrackOutput)
    assert tracked is not None
    assert sorted(r.tracking_id for r in tracked.lesions) == sorted(drawn)
    assert all(r.status == "present" for r in tracked.lesions)
    by_id = {r.tracking_id: r for r in tracked.lesions}
    assert not any("propagated from" in n for n in by_id[target].notes)  # segmented here, from the arrow
    conf = by_id[target].confidence
    assert by_id[target].review
    assert conf is not None
    assert conf < 0.5
    assert any("arrow" in r for r in by_id[target].review_reasons)  # an arrow's lesion: flagged until confirmed
    for other in set(drawn) - {target}:
        assert any("propagated from" in n or "registered directly" in n for n in by_id[other].notes)
    with session_scope(sf) as s:  # each lesion says it was first marked in a GSPS, not a generic "SR" (issue 31 B)
        assert {les.origin for les in s.scalars(select(Lesion))} == {LesionOrigin.GSPS}
    # the next follow-up: the arrow's GSPS is the nearest annotation a person made, and marks one lesion only; the
    # others are tracked from their own nearest annotation, the baseline's lines (issue 31 C, per lesion)
    job2 = service.store.create(patient.followups[1].series_uid)
    assert service.run(job2) is JobState.DONE, service.store.get(job2).error
    tracked2 = read_output(service.store.get(job2).step_outputs, TrackOutput)
    assert tracked2 is not None
    by_id2 = {r.tracking_id: r for r in tracked2.lesions}
    assert sorted(by_id2) == sorted(drawn)
    assert by_id2[target].status == "present"
    loaded2 = read_output(service.store.get(job2).step_outputs, LoadVolumesOutput)
    assert loaded2 is not None
    assert [r.tracking_id for r in loaded2.lesions] == [target]
    assert sorted(r.tracking_id for r in loaded2.earlier_lesions) == sorted(set(drawn) - {target})
    assert loaded2.not_assessed == []
    for other in set(drawn) - {target}:
        assert by_id2[other].status == "present"
        assert any(patient.baseline.series_uid in n for n in by_id2[other].notes), by_id2[other].notes
    # a SEG arriving after our result corrects it (issue 16 decides, also when corrections are refused): not a
    # prompt of this follow-up on a re-run
    ours = read_output(outputs, WriteSegSrOutput)
    assert ours is not None
    assert ours.seg
    corr = write_correction(ours.seg, patient.followups[0].files, tmp_path / "corr", add_centre_mm=(0.0, 0.0, 0.0))
    again = Ingestor(InstanceStore(storage_root(settings), fsync=False), sf)
    assert ingest_file(again, corr.path).ok
    again.close()
    fu_objects = [a.sop_instance_uid for a in person_annotations_on(sf, patient.followups[0].series_uid)]
    assert fu_objects == loaded.followup_annotations  # the arrow's GSPS only


@dataclass
class _Ingested:
    """A patient whose baseline carries a GSPS line per lesion and whose first follow-up an arrow on one lesion."""

    patient: DemoPatient
    drawn: dict[str, dict[str, Drawing]]
    target: str
    arrow: Path


def _ingest_patient_with_lines_and_an_arrow(tmp_path: Path, settings: Settings, sf: sessionmaker[Session]) -> _Ingested:
    patient = still_patient(tmp_path / "patient")
    ct = read_series(patient.baseline.files)
    prompts, _ = read_seg_prompts_and_gaps(patient.seg_file, ct)
    rng = np.random.default_rng(3)
    drawn = {p.identity.tracking_id: drawings(p.mask, rng) for p in prompts if p.mask is not None}
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.baseline.files]
    lines = write_gsps(heads, [Mark(d["line"], label) for label, d in drawn.items()], tmp_path / "pr" / "base.dcm")
    target = sorted(drawn)[1]  # the follow-up's own series is on the baseline's position (motion off)
    fu_heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in patient.followups[0].files]
    arrow = write_gsps(fu_heads, [Mark(drawn[target]["arrow"], target)], tmp_path / "pr" / "fu.dcm")
    ingestor = Ingestor(InstanceStore(storage_root(settings), fsync=False), sf)
    for f in [*patient.baseline.files, lines, *patient.followups[0].files, arrow, *patient.followups[1].files]:
        assert ingest_file(ingestor, f).ok
    ingestor.close()
    return _Ingested(patient, drawn, target, arrow)
