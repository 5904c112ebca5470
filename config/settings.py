"""LesionTrack's one typed settings model.

Values come, lowest precedence first, from the defaults below, a TOML file (``--config`` or
``LESIONTRACK_CONFIG``) and ``LESIONTRACK_*`` environment variables (nested keys joined with ``__``,
e.g. ``LESIONTRACK_DICOM__PORT=11113``). Unknown keys and bad values fail fast with the key's dotted name.
"""

from __future__ import annotations

import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "LESIONTRACK_"
CONFIG_ENV_VAR = "LESIONTRACK_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RetrieveMethod(StrEnum):
    C_MOVE = "C-MOVE"
    C_GET = "C-GET"
    DICOMWEB = "DICOMWEB"


class SendMethod(StrEnum):
    C_STORE = "C-STORE"
    ORTHANC_REST = "ORTHANC-REST"
    STOW_RS = "STOW-RS"


class TlsSettings(_Section):
    """DICOM TLS for the SCP and outgoing associations; all three paths or none."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TlsSettings:
        if self.enabled and not (self.cert_file and self.key_file):
            raise ValueError("tls.enabled needs cert_file and key_file")
        return self


class DicomNodeSettings(_Section):
    """Our own DICOM application entity (the Storage SCP the PACS routes to)."""

    ae_title: str = "LESIONTRACK"
    bind_address: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aes: list[str] = Field(default_factory=list, description="empty = any")
    allowed_peer_ips: list[str] = Field(default_factory=list, description="empty = any")
    max_associations: int = Field(
        20, ge=1, description="associations at once, across all receiver processes (one PACS routing several studies)"
    )
    receiver_processes: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=0,
        description="pynetdicom receiver processes behind the one port (1 = inside the service; 0 = one per core)",
    )
    maximum_pdu_size: int = Field(0, ge=0, description="0 = unlimited")
    fsync: bool = True
    series_quiet_seconds: float = Field(30.0, ge=0)
    require_called_ae: bool = Field(True, description="refuse associations addressed to another AE title")
    acse_timeout_seconds: float = Field(
        10.0, gt=0, description="how long a new connection may take to send its A-ASSOCIATE-RQ (and release)"
    )
    dimse_timeout_seconds: float = Field(30.0, gt=0, description="how long we wait for a DIMSE message")
    network_timeout_seconds: float = Field(60.0, gt=0, description="an established association idle this long ends")
    pdu_read_seconds: float = Field(
        60.0, gt=0, description="one PDU, once its header began, must be complete within this (slow senders)"
    )
    max_connections_per_peer: int = Field(
        24,
        ge=0,
        description="open TCP connections per peer IP (a PACS sends everything from one address: every association "
        "slot plus connections opening or closing); beyond it an A-ASSOCIATE-RJ; 0 = unlimited",
    )
    max_pending_connections: int = Field(
        20, ge=1, description="connections still waiting to send an A-ASSOCIATE-RQ; the oldest is closed beyond this"
    )
    max_pdu_bytes: int = Field(
        64 * 1024 * 1024,
        ge=16384,
        description="cap on a P-DATA PDU's declared length when maximum_pdu_size is 0 (unlimited)",
    )
    analyse_incomplete_transfers: bool = Field(
        False,
        description="analyse a series whose last association ended in an abort or a dropped connection "
        "(default: hold it until it is re-sent and released, or an operator forces it)",
    )
    trigger_wait_seconds: float = Field(
        120.0,
        gt=0,
        description="how long a completion trigger waits for the instances the PACS says it sent to be indexed "
        "(or, without a count, for the associations delivering the series to end) before completing anyway",
    )
    retrieval_wait_seconds: float = Field(
        120.0,
        gt=0,
        description="after a prior's C-MOVE / C-GET / WADO-RS, how long to wait for our own receivers to index "
        "every instance the PACS reports; a prior still short then fails the job as transient (retried), never "
        "analysed",
    )
    confirm_counts_with_pacs: bool = Field(
        True,
        description="when a series' last association ended without A-RELEASE, or a trigger gives no count, ask "
        "the sending PACS (a [[pacs]] peer with query = true) for NumberOfSeriesRelatedInstances by C-FIND",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        if not v or len(v) > 16 or "\\" in v:
            raise ValueError("AE title must be 1-16 characters without backslash")
        return v


class PacsPeer(_Section):
    """A remote DICOM node we query, retrieve from or send to."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    retrieve_method: RetrieveMethod = RetrieveMethod.C_MOVE
    query: bool = True
    send: bool = False
    send_method: SendMethod = SendMethod.C_STORE
    orthanc_url: str | None = None
    orthanc_user: str | None = None
    orthanc_password: SecretStr | None = None
    dicomweb_url: str | None = None
    tls: bool = Field(False, description="use DICOM TLS (the dicom.tls certificates) towards this peer")


#: Whole-word names of non-diagnostic series (scouts, localizers, dose reports) as vendors write them. Anchored on
#: word boundaries so that reconstruction names (Philips "iDose 4", "DoseRight"), "Low dose chest" and the like
#: still route; see tests/test_routing.py for the vendor table these are checked against.
DEFAULT_DESCRIPTION_EXCLUDE: tuple[str, ...] = (
    r"(?i)\b(scouts?|topogram|topo|surview|scanogram|pilot|localis[ae]rs?|localiz[ae]rs?|3[- ]?plane\s+loc)\b",
    r"(?i)\b(dose\s+(report|info|summary|record|sr|screen)|radiation\s+dose|patient\s+protocol|exposure\s+summary)\b",
)
#: CT Image, Enhanced CT Image, Legacy Converted Enhanced CT Image Storage
CT_IMAGE_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.2",
)


class RoutingSettings(_Section):
    """Which completed series are analysed."""

    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    min_slices: int = Field(20, ge=1)
    max_slice_thickness_mm: float = Field(5.0, gt=0)
    series_description_include: list[str] = Field(default_factory=list)
    series_description_exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DESCRIPTION_EXCLUDE),
        description="regular expressions (re.search); a series whose description matches one is skipped",
    )
    sop_classes: list[str] = Field(
        default_factory=lambda: list(CT_IMAGE_SOP_CLASSES),
        description="SOP Class UIDs that can be analysed (empty = any); dose reports (SR, Secondary Capture) are not",
    )
    body_parts: list[str] = Field(default_factory=list, description="empty = any")


class SendingSettings(_Section):
    retry_schedule_seconds: list[float] = Field(default_factory=lambda: [60.0, 300.0, 900.0, 3600.0])
    destinations: list[str] = Field(default_factory=list, description="names of pacs peers")
    claim_seconds: float = Field(
        900,
        gt=0,
        description="how long one sender holds a delivery it is attempting; "
        "after that a sender that died mid-attempt is presumed gone and others may retry",
    )


class ComputeSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="0 = torch default")
    seed: int = 0


class EngineSettings(_Section):
    """Engine choices and the local folders their weights are read from (never downloaded)."""

    registration: str = "convex"
    segmentation: str = "adaptive"
    lesionlocator_weights: Path | None = None
    unigradicon_weights: Path | None = None
    nninteractive_weights: Path | None = Field(
        None, description="reserved: no nnInteractive engine exists yet (engines are listed in models/engines.py)"
    )
    working_spacing_mm: float = Field(2.0, gt=0)


class DetectionSettings(_Section):
    """The search for new lesions in a follow-up (temporal subtraction against the registered prior); read by the
    pipeline's detect step."""

    new_lesions: bool = Field(True, description="look for new lesions; off → reports say 'new lesions: not assessed'")
    min_diameter_mm: float = Field(5.0, gt=0, description="smallest candidate reported")
    min_confidence: float = Field(0.5, ge=0, le=1, description="candidates below this confidence are not reported")
    max_candidates: int = Field(
        5,
        ge=0,
        le=50,
        description="at most this many candidates per follow-up (the most confident ones) go into the SEG, the SR "
        "and the dashboard",
    )
    max_residual_fraction: float = Field(
        0.01,
        gt=0,
        le=1,
        description="above this fraction of searched tissue differing from the registered prior the search is not "
        "trusted (misregistration) and reports say 'new lesions: not assessed'",
    )


class VerificationSettings(_Section):
    """Verified tracking (docs/verified-tracking.md): a person's corrected SEG/SR of a follow-up we analysed is
    adopted as that timepoint's result and becomes the propagation source of later follow-ups."""

    accept_corrections: bool = Field(True, description="take in corrections (SEG/SR of an analysed timepoint)")
    accept_from_aes: list[str] = Field(
        default_factory=list, description="calling AE titles corrections are accepted from (empty = any)"
    )
    reanalyse_later: Literal["auto", "operator"] = Field(
        "auto",
        description="re-analyse later follow-ups after a verification at once (auto) or when an operator asks",
    )
    overlap_match_dice: float = Field(
        0.2, gt=0, le=1, description="a corrected segment with no Tracking UID/ID/label match is matched by overlap"
    )


class TrackingSettings(_Section):
    """Per-lesion confidence of the tracked results and the review flag (``pipeline.science.confidence``); read by the
    pipeline's track step."""

    review_threshold: float = Field(
        0.5, ge=0, le=1, description="a lesion whose confidence is below this is flagged for review"
    )
    max_volume_factor: float = Field(
        3.0, gt=1, description="implausible change: volume beyond this factor (or its inverse) per factor_weeks"
    )
    factor_weeks: float = Field(8.0, gt=0, description="interval of max_volume_factor (compounds over longer ones)")
    boosting: bool = Field(False, description="LinGuinE boosting: re-prompt the segmentation at the lesion's centre")


class RecistSettings(_Section):
    """RECIST 1.1 thresholds used for target selection and response (defaults from the RECIST 1.1 paper); a trial
    protocol that deviates sets them here. Read by ``pipeline.science.recist.RecistRules.from_settings``."""

    min_long_axis_mm: float = Field(10.0, gt=0, description="measurable non-nodal lesion (slice thickness <= max)")
    min_long_axis_slice_factor: float = Field(2.0, gt=0, description="thicker slices: >= this x slice thickness")
    max_slice_thickness_mm: float = Field(5.0, gt=0)
    min_node_short_axis_mm: float = Field(15.0, gt=0, description="measurable (target-eligible) lymph node")
    pathological_node_short_axis_mm: float = Field(10.0, gt=0, description="10..15 mm: pathological non-target")
    max_targets: int = Field(5, ge=1)
    max_targets_per_organ: int = Field(2, ge=1)
    pr_threshold_pct: float = Field(-30.0, lt=0, description="partial response: change vs baseline")
    pd_threshold_pct: float = Field(20.0, gt=0, description="progression: change vs nadir")
    pd_min_absolute_mm: float = Field(5.0, ge=0)
    too_small_below_mm: float = Field(5.0, ge=0, description="present but smaller: counted as too_small_default_mm")
    too_small_default_mm: float = Field(5.0, ge=0)
    node_cr_short_axis_mm: float = Field(10.0, gt=0, description="every target node below this for CR")
    volume_pr_threshold_pct: float = Field(-65.0, lt=0, description="volumetric readout (sphere-equivalent of -30 %)")
    volume_pd_threshold_pct: float = Field(73.0, gt=0, description="volumetric readout (sphere-equivalent of +20 %)")


class ApiKey(_Section):
    name: str
    key: SecretStr
    role: Literal["read", "operator"] = "read"


class HttpSettings(_Section):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_keys: list[ApiKey] = Field(default_factory=list)
    public_openapi: bool = Field(False, description="serve /openapi.json without a key (default: a read key)")


class WorkerSettings(_Section):
    executor: Literal["inprocess", "celery"] = "inprocess"
    broker_url: str = "redis://127.0.0.1:6379/0"
    max_attempts: int = Field(5, ge=1)
    retry_backoff_seconds: list[float] = Field(default_factory=lambda: [30.0, 120.0, 600.0])
    visibility_timeout_seconds: int = Field(6 * 3600, ge=60)
    lease_seconds: float = Field(
        120.0,
        ge=0.5,
        description="a running job's claim, renewed by a heartbeat; "
        "a job whose lease ran out (dead worker) is taken over",
    )


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False
    library_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="level of third-party loggers (alembic, highdicom, pynetdicom, ...)"
    )


class Settings(BaseSettings):
    """Effective LesionTrack configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Path("./lesiontrack-data")
    database_url: str | None = Field(None, description="default: SQLite file inside data_dir")
    dicom: DicomNodeSettings = Field(default_factory=DicomNodeSettings)
    pacs: list[PacsPeer] = Field(default_factory=list)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    sending: SendingSettings = Field(default_factory=SendingSettings)
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    engines: EngineSettings = Field(default_factory=EngineSettings)
    recist: RecistSettings = Field(default_factory=RecistSettings)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    verification: VerificationSettings = Field(default_factory=VerificationSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    _toml_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _active_toml_file
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lesiontrack.sqlite3').resolve()}"

    def peer(self, name: str) -> PacsPeer:
        for p in self.pacs:
            if p.name == name:
                return p
        raise KeyError(f"no PACS peer named {name!r} in configuration (known: {[p.name for p in self.pacs]})")


_active_toml_file: Path | None = None


class ConfigError(ValueError):
    """A configuration problem, with the dotted key that caused it."""

    def __init__(self, message: str, key: str | None = None, source: Path | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source


def resolve_config_path(explicit: Path | str | None = None) -> Path | None:
    """The TOML file in force: the explicit path, else ``$LESIONTRACK_CONFIG``, else none."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV_VAR)
    return Path(env) if env else None


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the effective settings; raises :class:`ConfigError` naming the bad key."""
    global _active_toml_file
    path = resolve_config_path(config_file)
    if path is not None and not path.is_file():
        raise ConfigError(f"configuration file not found: {path}", source=path)
    if path is not None:
        _check_toml_syntax(path)
    _active_toml_file = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration key '{key}'{where}: {err['msg']}", key=key, source=path) from exc
    finally:
        _active_toml_file = None
    settings._toml_file = path
    return settings


def _check_toml_syntax(path: Path) -> None:
    try:
        tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", source=path) from exc
