"""The step contract of the analysis pipeline: what each step records (pydantic models) and the in-memory state.

Durable and summary outputs are recorded as JSON in ``analysis_job.step_outputs`` and validated again when a job
resumes (:meth:`pipeline.jobs.analysis.Step.load`). Everything outside the steps — API schemas, the patient history,
the demo, tests, benches — reads a job's outputs through :func:`job_results`, never through string paths.
Volumes, registrations and masks live in :class:`AnalysisState` for one attempt only and are recomputed on resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, WithJsonSchema

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.base import Registration
from lesiontrack.models.segmentation.prompts import Prompt
from lesiontrack.pipeline.jobs.analysis import StepOrderError, StepOutput
from lesiontrack.pipeline.jobs.ports import PriorAnnotation, PriorTimepoint
from lesiontrack.pipeline.science.correction_matching import SegmentMatch
from lesiontrack.pipeline.science.lesions import Timepoint
from lesiontrack.pipeline.science.measurements import ChangesDict, LesionChanges, LesionMeasurement, MeasurementDict
from lesiontrack.pipeline.science.recist import RecistAssessment, Response

if TYPE_CHECKING:
    from lesiontrack.pipeline.dicom.seg.reader import UnassessedSegment


class Record(BaseModel):
    """A nested part of a step output (no unknown keys)."""

    model_config = ConfigDict(extra="forbid")


# -- records shared by several outputs --------------------------------------------------------------------------
class FollowupRecord(Record):
    series_uid: str
    study_uid: str
    study_date: str | None
    study_time: str | None
    patient_pk: int | None
    modality: str | None


class AnnotationRecord(Record):
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    files: list[str] = []

    @property
    def is_seg(self) -> bool:
        return self.modality == "SEG" or self.sop_class_uid in SEG_SOP_CLASSES


class PriorRecord(Record):
    """:class:`pipeline.jobs.ports.PriorTimepoint` as recorded JSON (paths as strings)."""

    study_uid: str
    study_date: str | None
    study_time: str | None
    ct_series_uid: str
    ct_files: list[str] = []
    annotations: list[AnnotationRecord] = []
    source: str = "local"

    @classmethod
    def of(cls, p: PriorTimepoint) -> PriorRecord:
        return cls(
            study_uid=p.study_uid,
            study_date=p.study_date,
            study_time=p.study_time,
            ct_series_uid=p.ct_series_uid,
            ct_files=[str(f) for f in p.ct_files],
            annotations=[
                AnnotationRecord(
                    sop_instance_uid=a.sop_instance_uid,
                    sop_class_uid=a.sop_class_uid,
                    modality=a.modality,
                    files=[str(f) for f in a.files],
                )
                for a in p.annotations
            ],
            source=p.source,
        )

    def to_port(self) -> PriorTimepoint:
        return PriorTimepoint(
            self.study_uid,
            self.study_date,
            self.study_time,
            self.ct_series_uid,
            [Path(f) for f in self.ct_files],
            [
                PriorAnnotation(a.sop_instance_uid, a.sop_class_uid, a.modality, [Path(f) for f in a.files])
                for a in self.annotations
            ],
            self.source,
        )

    @property
    def annotation(self) -> AnnotationRecord:
        """The one annotation chosen as the prompt source."""
        if not self.annotations:
            raise StepOrderError(f"prior {self.ct_series_uid} has no annotation chosen")
        return self.annotations[0]

    def files_present(self) -> bool:
        return (
            bool(self.ct_files)
            and all(Path(f).is_file() for f in self.ct_files)
            and all(Path(f).is_file() for a in self.annotations for f in a.files)
        )


SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})


class PriorSummary(Record):
    study_uid: str
    study_date: str | None
    ct_series_uid: str
    annotations: list[str]
    source: str


class LesionRef(Record):
    tracking_uid: str
    tracking_id: str
    kind: str
    prompt_origin: str | None = None  # seg, contours, line, bidirectional, arrow, ellipse, contour, point, box
    prompt_object: str | None = None  # the object it was read from: SEG, SR, GSPS, RTSTRUCT, points


class NotAssessedRecord(Record):
    """A lesion of the prior that is reported "not assessed" (and flagged for review), with the reason."""

    tracking_uid: str
    tracking_id: str
    reason: str


class TrackedLesionRecord(Record):
    tracking_uid: str
    tracking_id: str
    status: str
    notes: list[str] = []
    confidence: float | None = None  # pipeline.science.confidence (None: not computed, e.g. not re-segmented)
    review: bool = False  # flagged for review (confidence below tracking.review_threshold, or inconsistent)
    review_reasons: list[str] = []


def _measurement(value: object) -> LesionMeasurement:
    if isinstance(value, LesionMeasurement):
        return value
    if isinstance(value, Mapping):
        return LesionMeasurement.from_dict(cast(MeasurementDict, value))  # JSON of a recorded job
    raise ValueError(f"not a lesion measurement: {type(value).__name__}")


def _changes(value: object) -> LesionChanges:
    if isinstance(value, LesionChanges):
        return value
    if isinstance(value, Mapping):
        return LesionChanges.from_dict(cast(ChangesDict, value))  # JSON of a recorded job
    raise ValueError(f"not a lesion's changes: {type(value).__name__}")


#: the science's measurement dataclasses as recorded fields: stored as their ``to_dict()`` (the on-disk shape of
#: every job so far), read back through ``from_dict``
MeasurementField = Annotated[
    LesionMeasurement,
    PlainValidator(_measurement),
    PlainSerializer(lambda m: m.to_dict()),
    WithJsonSchema({"type": "object"}),
]
ChangesField = Annotated[
    LesionChanges,
    PlainValidator(_changes),
    PlainSerializer(lambda c: c.to_dict()),
    WithJsonSchema({"type": "object"}),
]


class MeasuredLesion(Record):
    """One lesion's measurements at the follow-up, with its change against earlier timepoints."""

    measurement: MeasurementField
    changes: ChangesField | None

    @property
    def tracking_uid(self) -> str:
        return self.measurement.tracking_uid


class TimepointRef(Record):
    key: str
    series_uid: str | None


class RecistRecord(Record):
    """RECIST 1.1 at the follow-up as recorded by the measure step (the science's TimepointResponse, in part)."""

    overall_response: Response
    target_response: Response
    sum_of_diameters_mm: float | None
    change_from_baseline_pct: float | None
    best_overall_response: Response
    targets: list[str]
    new_lesions: str = "not assessed"  # what the report states (TimepointResponse.new_lesions_text)

    @classmethod
    def of(cls, assessment: RecistAssessment, index: int) -> RecistRecord:
        """Timepoint ``index`` of the assessment (the one place its fields are picked for the record)."""
        response = assessment.timepoints[index]
        return cls(
            overall_response=response.overall_response,
            target_response=response.target_response,
            sum_of_diameters_mm=response.sum_of_diameters_mm,
            change_from_baseline_pct=response.change_from_baseline_pct,
            best_overall_response=assessment.best_overall_response,
            targets=assessment.selection.targets,
            new_lesions=response.new_lesions_text,
        )


# -- one output model per step ----------------------------------------------------------------------------------
class PipelineOutput(StepOutput):
    """A pipeline step's output; ``step`` names the step that records it."""

    step: ClassVar[str]


class PromptSourceRecord(Record):
    """Why the prior's annotation was chosen as the prompt source (pipeline.science.prompt_selection)."""

    reason: str
    skipped_ours: list[str] = []  # SOP Instance UIDs of our own newer SEG/SR, passed over as prompt source


class VerificationRecord(Record):
    """A reader's correction of this follow-up that the job adopts as the timepoint's result (issue 16)."""

    id: int
    method: str  # "correction"
    source_sop_instance_uid: str
    source_file: str
    verified_by: str
    verified_at: str  # ISO 8601


class MatchPriorsOutput(PipelineOutput):
    step: ClassVar[str] = "match_priors"
    followup: FollowupRecord
    prior: PriorRecord
    priors_found: list[PriorSummary]
    prompt_source: PromptSourceRecord | None = None
    verification: VerificationRecord | None = None  # set: adopt the reader's correction of this follow-up


class RetrievePriorsOutput(PipelineOutput):
    step: ClassVar[str] = "retrieve_priors"
    prior: PriorRecord
    ct_files: int

    def still_valid(self) -> bool:
        return self.prior.files_present()


class EarlierRetrievalRecord(Record):
    """An earlier study retrieved from the PACS because a lesion's own nearest annotation by a person is on it
    (pipeline.jobs.lesion_sources): which study, from where, for which lesions, and how it went."""

    study_uid: str
    ct_series_uid: str
    source: str  # the PACS peer name ("local": held here, re-checked through the prior source)
    lesions: list[str]  # the Tracking IDs that needed it
    ct_files: int = 0
    error: str | None = None  # set: the retrieval failed; those lesions are "not assessed" with this reason


class LoadVolumesOutput(PipelineOutput):
    step: ClassVar[str] = "load_volumes"
    followup_shape: list[int]
    followup_spacing: list[float]
    prior_shape: list[int]
    prompts: int
    lesions: list[LesionRef]
    not_assessed: list[NotAssessedRecord] = Field(default_factory=list)
    annotation_warnings: list[str] = Field(default_factory=list)  # annotations that gave no lesion, named
    #: a radiologist's annotations on this follow-up itself: person-made prompts here
    # (pipeline.jobs.followup_annotations)
    followup_annotations: list[str] = Field(default_factory=list)  # their SOP Instance UIDs
    followup_lesions: list[LesionRef] = Field(default_factory=list)
    #: lesions the prior's annotation does not mark, prompted from their own nearest earlier annotation (issue 31 C)
    earlier_lesions: list[LesionRef] = Field(default_factory=list)
    earlier_retrieved: list[EarlierRetrievalRecord] = Field(default_factory=list)  # studies fetched for them


class RegisterOutput(PipelineOutput):
    step: ClassVar[str] = "register"
    engine: str
    version: str
    device: str
    similarity: str
    before: float | None
    after: float | None
    folding_fraction: float | None
    stage_seconds: dict[str, float]


class TrackOutput(PipelineOutput):
    step: ClassVar[str] = "track"
    engine: str
    version: str
    lesions: list[TrackedLesionRecord]


class CandidateRecord(Record):
    """One new-lesion candidate as recorded in the detect step's output."""

    tracking_uid: str
    tracking_id: str
    tissue: str
    centre_mm: tuple[float, float, float]
    volume_mm3: float
    diameter_mm: float
    confidence: float
    reasons: list[str]


class DetectOutput(PipelineOutput):
    step: ClassVar[str] = "detect_new_lesions"
    ran: bool
    detector: str | None = None
    version: str | None = None
    note: str | None = None
    candidates: list[CandidateRecord] = Field(default_factory=list)
    confirmed_added: list[str] = Field(default_factory=list)  # Tracking UIDs of confirmed candidates now tracked
    rejected_excluded: int = 0
    residual_fraction: float | None = None  # searched tissue differing from the registered prior (trust check)


class MeasureOutput(PipelineOutput):
    step: ClassVar[str] = "measure"
    timepoints: list[TimepointRef]
    lesions: list[MeasuredLesion]
    recist: RecistRecord


class WriteSegSrOutput(PipelineOutput):
    step: ClassVar[str] = "write_seg_sr"
    files: list[str]
    seg: str | None
    sr: str | None
    seg_sop_instance_uid: str | None
    sr_sop_instance_uid: str | None = None
    present: int
    vanished: int
    viewer_sr: str | None = None  # the OHIF measurements SR (pipeline.dicom.sr.viewer), when a lesion has RECIST axes
    viewer_sr_sop_instance_uid: str | None = None
    #: the SEG of the prior lesions derived from a drawing, on the prior study (pipeline.jobs.derived_prior_seg):
    #: the one this job issued, or (``prior_seg_reused``) the one an earlier job issued from the same derivation
    prior_seg: str | None = None
    prior_seg_sop_instance_uid: str | None = None
    prior_seg_series_uid: str | None = None  # the prior CT series it is on
    prior_seg_key: str | None = None  # pipeline.jobs.derived_prior_seg.derivation_key
    prior_seg_revision: int = 1
    prior_seg_reused: bool = False
    prior_seg_supersedes: str | None = None  # the SOP Instance UID of the drawn-prior SEG it replaces

    def still_valid(self) -> bool:
        return all(Path(f).is_file() for f in self.files)


class SendOutput(PipelineOutput):
    step: ClassVar[str] = "send"
    deliveries: list[int]
    destinations: list[str] = Field(default_factory=list)
    note: str | None = None
    reused: bool = False


PIPELINE_OUTPUTS: tuple[type[PipelineOutput], ...] = (
    MatchPriorsOutput,
    RetrievePriorsOutput,
    LoadVolumesOutput,
    RegisterOutput,
    TrackOutput,
    DetectOutput,
    MeasureOutput,
    WriteSegSrOutput,
    SendOutput,
)
STEP_NAMES: list[str] = [m.step for m in PIPELINE_OUTPUTS]

OutT = TypeVar("OutT", bound=PipelineOutput)


def read_output(step_outputs: Mapping[str, object], model: type[OutT]) -> OutT | None:
    """A job's recorded output of one step, validated; None when the step has not run (or its record is stale)."""
    stored = step_outputs.get(model.step)
    if stored is None:
        return None
    try:
        return model.model_validate(stored)
    except ValidationError:
        return None


@dataclass(frozen=True)
class JobResults:
    """What readers outside the pipeline need of one job's outputs (API, history, demo, tests, benches)."""

    match: MatchPriorsOutput | None
    register: RegisterOutput | None
    track: TrackOutput | None
    detect: DetectOutput | None
    measure: MeasureOutput | None
    written: WriteSegSrOutput | None
    sent: SendOutput | None

    @property
    def result_files(self) -> list[str]:
        return list(self.written.files) if self.written else []

    @property
    def seg_uids(self) -> list[str]:
        return [self.written.seg_sop_instance_uid] if self.written and self.written.seg_sop_instance_uid else []

    @property
    def sr_uids(self) -> list[str]:
        return [self.written.sr_sop_instance_uid] if self.written and self.written.sr_sop_instance_uid else []


def job_results(step_outputs: Mapping[str, object] | None) -> JobResults:
    out = step_outputs or {}
    return JobResults(
        read_output(out, MatchPriorsOutput),
        read_output(out, RegisterOutput),
        read_output(out, TrackOutput),
        read_output(out, DetectOutput),
        read_output(out, MeasureOutput),
        read_output(out, WriteSegSrOutput),
        read_output(out, SendOutput),
    )


# -- in-memory state of one attempt -----------------------------------------------------------------------------
@dataclass
class EarlierSource:
    """An earlier timepoint that prompts lesions the chosen prior annotation does not mark, each from its own
    nearest annotation by a person (pipeline.jobs.lesion_sources)."""

    ct_series_uid: str
    study_uid: str
    study_date: str | None
    time_key: str
    ct: Volume
    prompts: list[Prompt]  # under the lesions' own identities (labels unique in the job)


@dataclass
class LoadedInputs:
    """The follow-up and prior CTs and the prompts read from the prior's annotation (load_volumes)."""

    followup_ct: Volume
    prior_ct: Volume
    prompts: list[Prompt]
    prior: PriorTimepoint
    followup_files: list[Path]
    #: lesions of the prior annotation that cannot be prompts: reported "not assessed", flagged (issue 29)
    not_assessed: list[UnassessedSegment] = field(default_factory=list)
    #: lesions a radiologist marked on the follow-up itself: prompts at that timepoint
    # (pipeline.jobs.followup_annotations)
    followup_prompts: list[Prompt] = field(default_factory=list)
    #: earlier timepoints prompting the lesions the prior's annotation does not mark, oldest first (issue 31 C)
    earlier: list[EarlierSource] = field(default_factory=list)


@dataclass
class Candidate:
    """A new-lesion candidate of this attempt, with its mask on the follow-up grid (detect step)."""

    record: CandidateRecord
    mask: Volume
    mean_hu: float
    contrast_hu: float


@dataclass
class CandidateSearch:
    """Whether the new-lesion search ran on the follow-up, and what it proposed."""

    ran: bool
    detector: str = ""
    version: str = ""
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class Measured:
    """Measurements and RECIST of the follow-up (measure), handed to write_seg_sr."""

    current: dict[str, LesionMeasurement]
    prior: dict[str, LesionMeasurement]
    changes: dict[str, LesionChanges | None]
    recist: RecistAssessment
    timepoint_index: int
    slice_thickness_mm: dict[str, float] = field(default_factory=dict)  # series UID → slice thickness


@dataclass
class Adoption:
    """The reader's correction of this follow-up, matched to the tracked lesions (load_volumes → track, write)."""

    verification: VerificationRecord
    prompts: list[Prompt]  # the corrected lesions, identities of the lesions they are (labels as the prior's)
    matches: list[SegmentMatch]
    deleted: list[str]  # Tracking UIDs of tracked lesions the reader removed
    kept_candidates: list[str]  # unconfirmed candidates of ours the reader kept (→ confirmed)
    dropped_candidates: list[str]  # unconfirmed candidates of ours the reader did not keep (→ rejected)


@dataclass
class AnalysisState:
    """What the in-memory steps hand each other within one attempt; each getter names the step it needs."""

    inputs: LoadedInputs | None = None
    adoption: Adoption | None = None  # a reader's correction of the follow-up is adopted (issue 16)
    registration: Registration | None = None
    timepoints: list[Timepoint] | None = None
    search: CandidateSearch | None = None
    measured: Measured | None = None

    def need_inputs(self) -> LoadedInputs:
        return _need(self.inputs, "load_volumes")

    def need_registration(self) -> Registration:
        return _need(self.registration, "register")

    def need_timepoints(self) -> list[Timepoint]:
        return _need(self.timepoints, "track")

    def need_search(self) -> CandidateSearch:
        return _need(self.search, "detect_new_lesions")

    def need_measured(self) -> Measured:
        return _need(self.measured, "measure")


_T = TypeVar("_T")


def _need(value: _T | None, step: str) -> _T:
    if value is None:
        raise StepOrderError(f"step {step} has not run in this attempt")
    return value
