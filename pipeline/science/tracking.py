"""The tracking loop: prior lesions → registered, warped, re-segmented and identified lesions at every timepoint.

Every timepoint is propagated *directly* from the nearest timepoint whose lesions a person drew or confirmed
(the source annotation; pipeline.science.prompt_selection): the loop registers that annotated CT to the timepoint once
(:class:`RegistrationCache`, per pair of series, non-adjacent pairs included), warps the person's mask onto it,
uses the warped mask as the prompt of the segmentation engine with the annotated CT and mask as reference, keeps
the connected component nearest the propagated centre (LinGuinE), optionally boosts (re-prompts centred on the
first result), marks the lesion present or vanished and resolves overlaps between lesions so identities never merge
or swap silently (each resolution is written to ``TrackedLesion.notes``). Our result at the neighbouring timepoint
is only a consistency check (a volume jump or a disappearance flags the result for review); it is never the prompt.
Because nothing is chained, errors do not compound, and a lesion that vanished can reappear at any later timepoint.
Each result records which annotation it was propagated from (``TrackedLesion.propagated_from``).

``TrackingOptions(propagation="chain")`` keeps the former autoregressive loop (each timepoint prompted with our
result at the previous one) for the benchmark's side-by-side comparison; it decays with every follow-up
(docs/models.md, docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.registration.base import Registration, RegistrationEngine
from lesiontrack.models.registration.identity import IdentityRegistration, NoRegistrationEngine
from lesiontrack.models.segmentation.base import SegmentationEngine, SegReference
from lesiontrack.models.segmentation.components import centroid_mm, keep_nearest_component, mask_centre_mm
from lesiontrack.models.segmentation.prompts import LesionIdentity, Prompt, PromptKind
from lesiontrack.models.segmentation.rasterize import prompt_to_mask
from lesiontrack.models.segmentation.residual import prior_levels, residual_focus, surroundings
from lesiontrack.pipeline.science.confidence import (
    ConfidenceRules,
    LesionConfidence,
    Neighbour,
    Signal,
    assess_lesion,
    days_between,
    with_signal,
)
from lesiontrack.pipeline.science.drawn_priors import drawn_lesion, prompt_origin_meta, weaken_for_origin
from lesiontrack.pipeline.science.lesions import LesionStatus, PropagationSource, Timepoint, TrackedLesion
from lesiontrack.pipeline.science.measurements import measure_tracked
from lesiontrack.pipeline.science.prompt_selection import nearest_source_index

log = logging.getLogger(__name__)
_RESIDUAL_SCORE = 0.2  # confidence of a residual focus the engine did not segment: below review (a reader decides)

__all__ = [
    "IdentityRegistration",
    "NoRegistrationEngine",
    "RegistrationCache",
    "track_lesions",
]


@dataclass
class TrackingOptions:
    boosting: bool = False
    max_centre_distance_mm: float = 15.0  # nearest-component search radius around the propagated centre
    point_radius_mm: float = 5.0
    propagation: str = "annotation"
    """``annotation``: every timepoint prompted directly from the nearest person-annotated timepoint (default);
    ``chain``: the former autoregressive loop, prompted with our result at the previous timepoint (benchmark only)."""
    consistency_ratio: float = 2.5
    """Volume change against our result at the neighbouring timepoint, per 8 weeks of the interval, beyond which the
    loop notes a disagreement (and, without a confidence, flags the result for review; with one, the confidence's
    ``consistency`` signal judges it)."""
    confidence: ConfidenceRules | None = field(default_factory=ConfidenceRules)
    """Per-lesion confidence and review flag (:mod:`pipeline.science.confidence`) of every propagated result, stored in
    ``TrackedLesion.meta["confidence"]``; None: not computed (only the consistency check flags review)."""


@dataclass
class ProgressEvent:
    stage: str  # "register", "segment", "resolve", "done"
    done: int
    total: int
    timepoint: int
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class Confirmed:
    """Further timepoints whose lesions a person drew or confirmed: timepoint index → prompts (same lesion labels).

    ``partial``: each such timepoint marks only some lesions (a radiologist's arrow or line on a follow-up): its other
    lesions are propagated there from their own nearest annotation. Without it a confirmed timepoint's prompts are all
    its lesions (a reader's corrected SEG: what it leaves out is not there)."""

    prompts: Mapping[int, Sequence[Prompt]]
    partial: bool = False


# ----------------------------------------------------------------------------------------------------------------
class RegistrationCache:
    """Registrations per pair of series ``(moving series UID, fixed series UID)``, each computed once.

    Wraps any :class:`RegistrationEngine`; the tracking loop registers the annotated timepoint to every other
    timepoint directly through it (non-adjacent pairs included), so a caller tracking several lesions or running
    several passes over the same series never registers a pair twice.
    """

    def __init__(self, engine: RegistrationEngine) -> None:
        self.engine = engine
        self.name = getattr(engine, "name", "")
        self.version = getattr(engine, "version", "")
        self._pairs: dict[tuple[str, str], Registration] = {}

    @classmethod
    def known(
        cls, reg: Registration, moving: Timepoint, fixed: Timepoint, engine: RegistrationEngine | None = None
    ) -> RegistrationCache:
        """A cache that already holds ``reg`` for ``moving`` → ``fixed`` (e.g. the register step's registration);
        any other pair is registered by ``engine`` (without one, asking for another pair is an error)."""
        cache = cls(engine or _OnlyKnownPairs())
        cache._pairs[(moving.series_uid, fixed.series_uid)] = reg
        return cache

    def register_pair(self, moving: Timepoint, fixed: Timepoint) -> Registration:
        key = (moving.series_uid, fixed.series_uid)
        if key not in self._pairs:
            self._pairs[key] = self.engine.register(moving.ct, fixed.ct)
        return self._pairs[key]

    def register(self, baseline: Volume, followup: Volume) -> Registration:
        return self.engine.register(baseline, followup)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self._pairs)


class _OnlyKnownPairs:
    """The engine of a :meth:`RegistrationCache.known` cache given none: every pair it is asked for is unknown."""

    name = "precomputed"
    version = ""

    def register(self, baseline: Volume, followup: Volume) -> Registration:
        raise LookupError("no registration was computed for this pair of series")


@dataclass
class _Carry:
    """What is propagated for one lesion: its latest mask (or, once vanished, the propagated last-seen mask)."""

    mask: Volume  # on the grid of the timepoint just processed
    ref_image: Volume  # CT where the lesion was last seen
    ref_mask: Volume  # lesion mask there
    present: bool = True


@dataclass(frozen=True)
class _Prior:
    """Where a propagated prompt came from: the lesion there (the engine's reference) and the registration's label
    warp from that grid onto the timepoint segmented (None: not known, e.g. a chain step from a vanished lesion)."""

    reference: SegReference | None
    warp: Callable[[Volume], Volume] | None = None


@dataclass
class _StepResult:
    lesion: TrackedLesion
    prompt_mask: Volume


@dataclass
class _Source:
    """One lesion as a person annotated it on one timepoint: the mask there and where it came from."""

    index: int
    mask: Volume
    identity: LesionIdentity
    provenance: PropagationSource


def track_lesions(
    timepoints: list[Timepoint],
    prompts: list[Prompt],
    *,
    source_index: int,
    registration: RegistrationEngine,
    segmentation: SegmentationEngine,
    options: TrackingOptions | None = None,
    progress: ProgressCallback | None = None,
    confirmed: Confirmed | None = None,
) -> list[Timepoint]:
    """Fill ``timepoint.lesions`` for every timepoint (time order) from ``prompts`` given on ``source_index``.

    ``confirmed`` adds further timepoints whose lesions a person drew or confirmed (:class:`Confirmed`, also for
    timepoints that mark only some lesions); each timepoint is then propagated from the nearest annotated timepoint
    holding the lesion. With
    ``options.propagation == "annotation"`` (default) every timepoint is registered *directly* to that annotated
    timepoint and prompted with the person's mask warped onto it; our result at the neighbouring timepoint only
    serves as a consistency check. ``"chain"`` is the former autoregressive loop (benchmark baseline).
    """
    opts = options or TrackingOptions()
    if not 0 <= source_index < len(timepoints):
        raise ValueError(f"source_index {source_index} outside 0..{len(timepoints) - 1}")
    labels = [p.identity.label for p in prompts]
    if len(set(labels)) != len(labels):
        raise ValueError(f"lesion labels must be unique, got {labels}")
    if opts.propagation not in ("annotation", "chain"):
        raise ValueError(f"propagation must be 'annotation' or 'chain', got {opts.propagation!r}")
    sources_in: dict[int, Sequence[Prompt]] = {source_index: prompts}
    for idx, extra in (confirmed.prompts if confirmed else {}).items():
        if not 0 <= idx < len(timepoints):
            raise ValueError(f"confirmed timepoint {idx} outside 0..{len(timepoints) - 1}")
        if idx != source_index:
            sources_in[idx] = extra
    if opts.propagation == "chain" and len(sources_in) > 1:
        raise ValueError("the chain propagation takes one annotated timepoint")
    n_prompts = len({p.identity.label for ps in sources_in.values() for p in ps})
    total = n_prompts * len(timepoints) + len(timepoints) - len(sources_in)
    counter = {"done": 0}

    def tick(stage: str, tp: int, msg: str) -> None:
        counter["done"] += 1
        if progress:
            progress(ProgressEvent(stage, counter["done"], total, tp, msg))

    cache = registration if isinstance(registration, RegistrationCache) else RegistrationCache(registration)
    sources = {
        idx: _segment_source_timepoint(timepoints[idx], idx, sources_in[idx], segmentation, opts, tick)
        for idx in sorted(sources_in)
    }
    if opts.propagation == "chain":
        _track_chain(timepoints, source_index, cache, segmentation, opts, tick)
    else:
        partial = confirmed is not None and confirmed.partial
        every = {label for by in sources.values() for label in by}
        for order in (range(source_index + 1, len(timepoints)), range(source_index - 1, -1, -1)):
            prev = source_index
            for t in order:
                # partial: an annotated timepoint that marks only some lesions (an arrow re-finding a lost one, a
                # re-measured line) gets its other lesions propagated there from their own nearest annotation
                if t not in sources or (partial and every - set(sources[t])):
                    _propagate_direct(timepoints, t, prev, sources, cache, segmentation, opts, tick)
                prev = t
    if progress:
        progress(ProgressEvent("done", total, total, source_index, "tracking finished"))
    return timepoints


def _segment_source_timepoint(
    tp: Timepoint,
    idx: int,
    prompts: Sequence[Prompt],
    segmentation: SegmentationEngine,
    opts: TrackingOptions,
    tick: Callable[[str, int, str], None],
) -> dict[int, _Source]:
    """Segment a person-annotated timepoint from its prompts; its lesions become the sources (by label)."""
    results = []
    for prompt in prompts:
        results.append(_segment_source(tp, prompt, segmentation, opts))
        tick("segment", idx, prompt.identity.tracking_id)
    tp.lesions = _resolve_overlaps(results, tp.ct)
    by_label = {p.identity.label: p for p in prompts}
    return {
        les.identity.label: _Source(
            idx,
            les.mask,
            les.identity,
            PropagationSource(
                tp.series_uid,
                by_label[les.identity.label].source or "prompt",
                by_person=True,
                timepoint_index=idx,
                annotation_uid=by_label[les.identity.label].meta.get("sop_instance_uid"),
            ),
        )
        for les in tp.lesions
    }


def _propagate_direct(
    timepoints: list[Timepoint],
    t: int,
    prev_t: int,
    sources: dict[int, dict[int, _Source]],
    cache: RegistrationCache,
    engine: SegmentationEngine,
    opts: TrackingOptions,
    tick: Callable[[str, int, str], None],
) -> None:
    """Segment timepoint ``t`` from the nearest annotated timepoint of each lesion, registered directly to ``t``.

    Lesions a person annotated at ``t`` itself keep that annotation (and win voxels the propagated ones overlap)."""
    cur = timepoints[t]
    annotated = list(cur.lesions) if t in sources else []
    here = set(sources.get(t, {}))
    all_labels = sorted({label for by in sources.values() for label in by} - here)
    previous = {les.identity.label: les for les in timepoints[prev_t].lesions}
    results: list[_StepResult] = []
    registered: set[int] = set()
    for label in all_labels:
        holding = [s for s, by in sources.items() if label in by]
        src = sources[nearest_source_index(t, holding)][label]
        src_tp = timepoints[src.index]
        reg = cache.register_pair(src_tp, cur)
        if src.index not in registered:
            registered.add(src.index)
            tick("register", t, f"{getattr(reg, 'engine', cache.name)} {src_tp.series_uid} -> {cur.series_uid}")
        notes = [src.provenance.describe() + f" (registered directly, {src.index} -> {t})"]
        reference = SegReference(src_tp.ct, src.mask) if src.mask.array.any() else None
        warped = _u8(reg.warp_labels(src.mask)) if src.mask.array.any() else _u8(_zeros(cur.ct))
        prior = _Prior(reference, reg.warp_labels)
        les = _segment_propagated(cur, src.identity, warped, prior, engine, opts, notes)
        les.propagated_from = src.provenance
        les.meta["registration"] = getattr(reg, "engine", cache.name)
        les.meta["propagated_from_index"] = src.index
        prior_les = next((x for x in src_tp.lesions if x.identity.label == label), None)
        for key in ("prompt_origin", "weak_prior", "prompt_object"):  # where the prior came from, at every timepoint
            if prior_les is not None and key in prior_les.meta:
                les.meta[key] = prior_les.meta[key]
        results.append(_StepResult(les, warped))
        tick("segment", t, src.identity.tracking_id)
    taken = np.zeros(cur.ct.shape, bool)
    for a in annotated:
        taken |= a.mask.array > 0
    for res in results if taken.any() else []:
        lost = (res.lesion.mask.array > 0) & taken
        if lost.any():
            res.lesion.mask = res.lesion.mask.with_array(np.where(lost, 0, res.lesion.mask.array).astype(np.uint8))
            res.lesion.notes.append(f"{int(lost.sum())} voxels left to a lesion a person annotated here")
    propagated = _resolve_overlaps(results, cur.ct)
    cur.lesions = sorted([*annotated, *propagated], key=lambda x: x.identity.label)
    for les, res in zip(propagated, results, strict=True):
        nb = _consistency_check(
            les, previous.get(les.identity.label), opts, days_between(timepoints[prev_t].study_date, cur.study_date)
        )
        if opts.confidence is not None:
            holding = [s for s, by in sources.items() if les.identity.label in by]
            src_les = sources[nearest_source_index(t, holding)][les.identity.label]
            src_tp = timepoints[src_les.index]
            conf = assess_lesion(
                source_ct=src_tp.ct,
                source_mask=src_les.mask,
                followup_ct=cur.ct,
                prompt=res.prompt_mask,
                result=les.mask,
                present=les.status is LesionStatus.PRESENT,
                reg=cache.register_pair(src_tp, cur),
                rules=opts.confidence,
                neighbour=nb,
                days=days_between(src_tp.study_date, cur.study_date),
                is_node=les.identity.is_node,
            )
            conf = weaken_for_origin(conf, src_tp.lesions, les.identity.label, opts.confidence)
            conf = _residual_signal(conf, les, opts.confidence)
            les.meta["confidence"] = conf
            les.meta["review"] = bool(les.meta.get("review", False) or conf.review)


def _consistency_check(
    les: TrackedLesion, prev: TrackedLesion | None, opts: TrackingOptions, days: int | None = None
) -> Neighbour | None:
    """Our result at the neighbouring timepoint as a check (never a prompt); ``days`` between the two.

    Returns what the check saw (:class:`pipeline.science.confidence.Neighbour`; None without a neighbour), which the
    confidence scores. A volume change beyond ``consistency_ratio`` per 8 weeks of the interval (compounding over
    longer ones), a disappearance or a reappearance is noted on the lesion; without a confidence
    (``opts.confidence`` None) such a disagreement flags the result for review by itself."""
    if prev is None:
        return None
    now_present = les.status is LesionStatus.PRESENT
    was_present = prev.status is LesionStatus.PRESENT
    note = None
    ratio = None
    if now_present and was_present:
        v0, v1 = float(prev.meta.get("volume_mm3", 0.0)), float(les.meta.get("volume_mm3", 0.0))
        if v0 > 0 and v1 > 0:
            ratio = v1 / v0
            allowed = opts.consistency_ratio ** max(1.0, (days or 0) / 56.0)
            if ratio > allowed or ratio < 1.0 / allowed:
                note = f"volume x{ratio:.2f} against our result at the neighbouring timepoint"
    elif was_present and not now_present:
        note = "vanished although present at the neighbouring timepoint"
    elif now_present and not was_present:
        note = "reappeared: vanished at the neighbouring timepoint"
    if note is not None:
        if opts.confidence is None:
            les.meta["review"] = True
            note += ": flagged for review"
        les.notes.append(note)
    return Neighbour(
        ratio=ratio,
        days=days,
        vanished=was_present and not now_present,
        reappeared=now_present and not was_present,
    )


def _segment_propagated(
    cur: Timepoint,
    identity: LesionIdentity,
    warped: Volume,
    prior: _Prior,
    engine: SegmentationEngine,
    opts: TrackingOptions,
    notes: list[str],
    source: str = "propagated annotation",
) -> TrackedLesion:
    """Segment one lesion on ``cur`` from its warped prompt mask (keep the component nearest its centre, boost).

    ``prior``: the lesion where the prompt came from and, when known, the warp from there onto ``cur``: with it, an
    empty result is checked for a residual focus at the propagated site (:func:`_residual_lesion`) before it is
    called vanished."""
    reference = prior.reference
    if not warped.array.any():
        return TrackedLesion(
            identity,
            LesionStatus.VANISHED,
            _u8(_zeros(cur.ct)),
            engine.name,
            engine.version,
            notes=[*notes, "propagated mask fell outside this CT"],
        )
    centre = mask_centre_mm(warped)
    if centre is None:  # unreachable: the warped mask is not empty
        raise RuntimeError(f"propagated mask of lesion {identity.label} has no centre")
    prompt = Prompt(identity, PromptKind.MASK, mask=warped, source=source)
    seg = keep_nearest_component(engine.segment(cur.ct, prompt, reference), centre, opts.max_centre_distance_mm)
    if opts.boosting and seg.array.any():
        c2 = mask_centre_mm(seg)
        if c2 is None:  # unreachable: seg is not empty
            raise RuntimeError(f"segmentation of lesion {identity.label} has no centre")
        shifted = _translate(warped, c2 - centre)
        if shifted.array.any():
            boosted = keep_nearest_component(
                engine.segment(cur.ct, Prompt(identity, PromptKind.MASK, mask=shifted, source="boosted"), reference),
                c2,
                opts.max_centre_distance_mm,
            )
            if boosted.array.any():
                seg = boosted
                notes.append(
                    f"boosted: re-prompted at the first result's centre ({np.linalg.norm(c2 - centre):.1f} mm)"
                )
    status = LesionStatus.PRESENT if seg.array.any() else LesionStatus.VANISHED
    les = TrackedLesion(
        identity, status, _u8(seg), engine.name, engine.version, propagated_centre_mm=centre, notes=notes
    )
    if status is LesionStatus.VANISHED and reference is not None and prior.warp is not None:
        _residual_lesion(les, cur, warped, reference, prior.warp)
    return les


def _residual_lesion(
    les: TrackedLesion, cur: Timepoint, warped: Volume, reference: SegReference, warp: Callable[[Volume], Volume]
) -> None:
    """An empty result is "vanished" only without residual evidence: a compact focus of the lesion's own intensity
    at the propagated site, not explained by what surrounded the prior lesion (:mod:`models.segmentation.residual`),
    keeps the lesion present as that focus, flagged for review with the reason; its long axis is measured like any
    lesion's (whether it is "too small to measure" is the RECIST rules' call: :func:`recist.diameter_of`)."""
    levels = prior_levels(reference)
    around = None if levels is None else surroundings(reference, levels=levels)
    if levels is None or around is None:  # too low a contrast on the prior to judge residual tissue: the verdict stands
        return
    explained = warp(around) if around.array.any() else None
    focus = residual_focus(cur.ct, warped, reference, explained, levels=levels)
    if focus is None:
        les.notes.append("no residual lesion-like focus at the propagated site")
        return
    les.status = LesionStatus.PRESENT
    les.mask = _u8(focus.mask)
    les.meta["review"] = True
    long_axis = measure_tracked(les, cur.ct).long_axis_mm  # the project's long axis (RECIST decides what it counts)
    state = f"present, not delineated by the engine (long axis {long_axis:.1f} mm)"
    les.meta["residual_focus"] = f"{state}: {les.engine} found no lesion, but a {focus.reason}"
    les.notes.append(f"{les.meta['residual_focus']}; kept as the lesion, flagged for review")


def _residual_signal(conf: LesionConfidence, les: TrackedLesion, rules: ConfidenceRules | None) -> LesionConfidence:
    """``conf`` with the ``residual_focus`` signal when the lesion was kept as a residual focus (a reader decides)."""
    reason = les.meta.get("residual_focus")
    if not isinstance(reason, str):
        return conf
    return with_signal(conf, Signal(name="residual_focus", value=None, score=_RESIDUAL_SCORE, reason=reason), rules)


def _track_chain(
    timepoints: list[Timepoint],
    source_index: int,
    cache: RegistrationCache,
    engine: SegmentationEngine,
    opts: TrackingOptions,
    tick: Callable[[str, int, str], None],
) -> None:
    """The former autoregressive loop: each timepoint prompted with our result at the previous one (baseline)."""
    src = timepoints[source_index]
    start = {
        les.identity.label: _Carry(les.mask, src.ct, les.mask, les.status is LesionStatus.PRESENT)
        for les in src.lesions
    }
    for order in (range(source_index + 1, len(timepoints)), range(source_index - 1, -1, -1)):
        carries = dict(start)
        prev = source_index
        for t in order:
            carries = _step(timepoints[prev], timepoints[t], t, carries, cache, engine, opts, tick)
            prev = t


def _segment_source(tp: Timepoint, prompt: Prompt, engine: SegmentationEngine, opts: TrackingOptions) -> _StepResult:
    raster = prompt_to_mask(prompt, tp.ct, point_radius_mm=opts.point_radius_mm)
    notes: list[str] = []
    drawn = drawn_lesion(tp.ct, prompt, engine)
    if drawn is not None:  # a line, arrow, ellipse or contour on one image: its 3-D extent from the image
        mask, notes = drawn.mask, drawn.notes
        name, version = drawn.engine_name, drawn.engine_version
        mask = keep_nearest_component(mask, prompt.centre_mm(), opts.max_centre_distance_mm)
        if not mask.array.any():
            notes.append(f"no lesion at the {drawn.origin}; prompt shape kept")
            mask = raster
    elif prompt.kind is PromptKind.MASK:
        mask = raster
        name, version = "annotation", ""
    else:
        mask = engine.segment(tp.ct, prompt, None)
        name, version = engine.name, engine.version
        centre = prompt.centre_mm()
        mask = keep_nearest_component(mask, centre, opts.max_centre_distance_mm)
        if not mask.array.any():
            notes.append(f"{engine.name} found no lesion at the {prompt.kind.value} prompt; prompt shape kept")
            mask = raster
    status = LesionStatus.PRESENT if mask.array.any() else LesionStatus.VANISHED
    if not mask.array.any():
        notes.append("annotation lies outside this CT")
    les = TrackedLesion(
        prompt.identity,
        status,
        _u8(mask),
        name,
        version,
        propagated_centre_mm=prompt.centre_mm(),
        notes=notes,
        meta={"source": prompt.source or "prompt", "annotated": True, **prompt_origin_meta(prompt)},
    )
    return _StepResult(les, raster)


def _step(
    prev: Timepoint,
    cur: Timepoint,
    t: int,
    carries: dict[int, _Carry],
    registration: RegistrationCache,
    engine: SegmentationEngine,
    opts: TrackingOptions,
    tick: Callable[[str, int, str], None],
) -> dict[int, _Carry]:
    reg = registration.register_pair(prev, cur)
    tick("register", t, f"{getattr(reg, 'engine', registration.name)} {prev.series_uid} -> {cur.series_uid}")
    by_label = {les.identity.label: les.identity for les in prev.lesions}
    results: list[_StepResult] = []
    new_carries: dict[int, _Carry] = {}
    for label, carry in carries.items():
        identity = by_label[label]
        warped = _u8(reg.warp_labels(carry.mask))
        notes = ["propagated from our result at the previous timepoint (chain)"]
        if not carry.present:
            notes.append("propagated from the last timepoint where it was seen")
        reference = SegReference(carry.ref_image, carry.ref_mask)
        les = _segment_propagated(
            cur,
            identity,
            warped,
            _Prior(reference, reg.warp_labels if carry.present else None),  # (the reference is the previous timepoint)
            engine,
            opts,
            notes,
            source=f"propagated from series {prev.series_uid}",
        )
        les.propagated_from = PropagationSource(prev.series_uid, "our result (chain)", by_person=False)
        les.meta["registration"] = getattr(reg, "engine", "")
        results.append(_StepResult(les, warped))
        tick("segment", t, identity.tracking_id)
    cur.lesions = _resolve_overlaps(results, cur.ct)
    for les, res in zip(cur.lesions, results, strict=True):
        old = carries[les.identity.label]
        if les.status is LesionStatus.PRESENT:
            new_carries[les.identity.label] = _Carry(les.mask, cur.ct, les.mask, True)
        else:
            new_carries[les.identity.label] = _Carry(res.prompt_mask, old.ref_image, old.ref_mask, False)
    return new_carries


def _resolve_overlaps(results: list[_StepResult], grid: Volume) -> list[TrackedLesion]:
    """Give every contested voxel to the lesion whose propagated prompt is nearest; record it on both lesions."""
    lesions = [r.lesion for r in results]
    for a in range(len(results)):
        for b in range(a + 1, len(results)):
            la, lb = lesions[a], lesions[b]
            both = (la.mask.array > 0) & (lb.mask.array > 0)
            n = int(both.sum())
            if n == 0:
                continue
            da = _distance_to(results[a].prompt_mask, both)
            db = _distance_to(results[b].prompt_mask, both)
            to_a = da <= db
            idx = np.nonzero(both)
            arr_a, arr_b = la.mask.array.copy(), lb.mask.array.copy()
            arr_b[tuple(i[to_a] for i in idx)] = 0
            arr_a[tuple(i[~to_a] for i in idx)] = 0
            la.mask = _keep_main(la.mask.with_array(arr_a), la.propagated_centre_mm)
            lb.mask = _keep_main(lb.mask.with_array(arr_b), lb.propagated_centre_mm)
            msg = (
                f"overlap of {n} voxels between {la.identity.tracking_id} and {lb.identity.tracking_id} "
                f"resolved by distance to the propagated prompts ({int(to_a.sum())} / {int((~to_a).sum())})"
            )
            la.notes.append(msg)
            lb.notes.append(msg)
            log.debug("%s", msg)
    for les in lesions:
        if les.status is LesionStatus.PRESENT and not les.mask.array.any():
            les.status = LesionStatus.VANISHED
            les.notes.append("lost all voxels to an overlapping lesion")
        les.meta["volume_mm3"] = float(les.mask.array.sum() * les.mask.voxel_volume_mm3())
        c = centroid_mm(les.mask)
        les.meta["centre_mm"] = None if c is None else [float(v) for v in c]
    return lesions


def _distance_to(prompt_mask: Volume, where: np.ndarray) -> np.ndarray:
    """Distance (mm) from the voxels in ``where`` to ``prompt_mask`` (0 inside), computed in a local box."""
    idx = np.argwhere(where | (prompt_mask.array > 0))
    lo, hi = idx.min(0), idx.max(0) + 1
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    pm = prompt_mask.array[sl] > 0
    if not pm.any():
        return np.full(int(where.sum()), np.inf)
    d = ndi.distance_transform_edt(~pm, sampling=prompt_mask.spacing[::-1])
    return d[where[sl]]


def _keep_main(mask: Volume, centre: np.ndarray | None) -> Volume:
    if centre is None or not mask.array.any():
        return mask
    return keep_nearest_component(mask, centre, max_distance_mm=1e9)


def _translate(mask: Volume, shift_mm: np.ndarray) -> Volume:
    shift_ijk = np.linalg.solve(mask.direction @ np.diag(mask.spacing), shift_mm)
    moved = ndi.shift(mask.array.astype(np.float32), shift_ijk[::-1], order=0, mode="constant", cval=0)
    return mask.with_array((moved > 0.5).astype(np.uint8))


def _zeros(grid: Volume) -> Volume:
    return Volume(np.zeros(grid.shape, np.uint8), grid.origin.copy(), grid.spacing.copy(), grid.direction.copy())


def _u8(mask: Volume) -> Volume:
    return Volume((mask.array > 0).astype(np.uint8), mask.origin.copy(), mask.spacing.copy(), mask.direction.copy())


# ----------------------------------------------------------------------------------------------------------------
def label_map(timepoint: Timepoint) -> Volume:
    """One label map on the timepoint's CT grid: voxel value = lesion label (as numbered on the baseline)."""
    out = np.zeros(
        timepoint.ct.shape, np.uint16 if any(les.identity.label > 255 for les in timepoint.lesions) else np.uint8
    )
    for les in timepoint.lesions:
        out[(les.mask.array > 0) & (out == 0)] = les.identity.label
    return timepoint.ct.with_array(out)


def tracking_summary(timepoints: list[Timepoint]) -> dict[str, Any]:
    """JSON-ready: per lesion, per timepoint, tracking UID/ID, status, volume (mm³), centre (LPS mm), notes."""
    lesions: dict[int, dict[str, Any]] = {}
    for t, tp in enumerate(timepoints):
        for les in tp.lesions:
            entry = lesions.setdefault(
                les.identity.label,
                {
                    "label": les.identity.label,
                    "tracking_uid": les.identity.tracking_uid,
                    "tracking_id": les.identity.tracking_id,
                    "timepoints": [],
                },
            )
            for key in ("prompt_origin", "weak_prior", "drawn_diameters_mm", "prompt_object"):  # the prior's origin
                if key in les.meta:
                    entry.setdefault(key, les.meta[key])
            entry["timepoints"].append(
                {
                    "index": t,
                    "series_uid": tp.series_uid,
                    "study_date": tp.study_date,
                    "status": les.status.value,
                    "volume_mm3": round(
                        float(les.meta.get("volume_mm3", les.mask.array.sum() * les.mask.voxel_volume_mm3())), 2
                    ),
                    "centre_mm": les.meta.get("centre_mm"),
                    "engine": les.engine,
                    "propagated_from": None if les.propagated_from is None else asdict(les.propagated_from),
                    "review": bool(les.meta.get("review", False)),
                    "confidence": None if (c := les.meta.get("confidence")) is None else c.confidence,
                    "review_reasons": [] if c is None else list(c.reasons),
                    "notes": list(les.notes),
                }
            )
    return {
        "timepoints": [
            {"index": t, "series_uid": tp.series_uid, "study_date": tp.study_date} for t, tp in enumerate(timepoints)
        ],
        "lesions": [lesions[k] for k in sorted(lesions)],
    }
