"""A radiologist's annotations on the follow-up being analysed (issue 31 item 3): a re-measured line, an arrow or a
point on a lesion tracking lost, saved to the PACS with (or after) the follow-up's CT. They are person-made prompts
at that timepoint: the tracking loop segments those lesions there from the person's drawing
(``track_lesions(confirmed={1: ...})``) and propagates only the others from the prior.

* :func:`person_annotations_on` — the annotation objects (SEG, TID 1500 SR, GSPS, RTSTRUCT) of the follow-up's study
  that reference its CT series and were not written by us, and not already taken in as a correction of our result
  (those are adopted by issue 16's verification path), oldest first;
* :func:`followup_prompts` — their prompts on the follow-up CT, each lesion under the prior's identity when its
  Tracking UID or label is the prior's (the same label on a later study is the same lesion); a later annotation of
  a lesion replaces an earlier one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lesiontrack.models.imaging.volume import Volume
from lesiontrack.models.segmentation.prompts import Prompt
from lesiontrack.pipeline.ports import PriorAnnotation


def person_annotations_on(sf: sessionmaker[Session], series_uid: str) -> list[PriorAnnotation]:
    """The person-made annotation objects of ``series_uid``'s study that reference that CT series, oldest first."""
    from lesiontrack.db.models import Instance, Series, TimepointVerification
    from lesiontrack.db.session import session_scope
    from lesiontrack.pipeline.annotations.refs import PRIOR_ANNOTATION_MODALITIES, prior_annotation_references
    from lesiontrack.pipeline.prompt_selection import content_key, is_our_object

    found: list[tuple[str, PriorAnnotation]] = []
    with session_scope(sf) as s:
        ct = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if ct is None:
            return []
        rows = s.execute(
            select(Instance, Series.modality)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == ct.study_pk, Series.modality.in_(sorted(PRIOR_ANNOTATION_MODALITIES)))
        ).all()
        taken_in = set(s.scalars(select(TimepointVerification.source_sop_instance_uid)))
        for inst, _modality in rows:
            path = Path(inst.file_path)
            if inst.sop_instance_uid in taken_in or not path.is_file() or is_our_object(path):
                continue
            try:
                hdr = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            kind, refs = prior_annotation_references(hdr)
            if kind is None or series_uid not in refs:
                continue
            found.append((content_key(path), PriorAnnotation(inst.sop_instance_uid, inst.sop_class_uid, kind, [path])))
    return [a for _key, a in sorted(found, key=lambda x: x[0])]


def followup_prompts(
    annotations: Sequence[PriorAnnotation],
    followup_ct: Volume,
    prior_prompts: Sequence[Prompt],
    warnings: list[str] | None = None,
) -> list[Prompt]:
    """The lesions the ``annotations`` mark on ``followup_ct``, under the prior's identities where they match
    (Tracking UID, else the label); a lesion the prior does not have keeps its own identity with a new label number.
    An object that gives no lesion is a warning naming it, never an error of the job."""
    from lesiontrack.pipeline.annotations.common import AnnotationWarning, normalise_label
    from lesiontrack.pipeline.prompt_sources import PromptSourceError, prompts_from_object

    by_uid = {p.identity.tracking_uid: p.identity for p in prior_prompts}
    by_label = {normalise_label(p.identity.tracking_id): p.identity for p in prior_prompts}
    next_label = max((p.identity.label for p in prior_prompts), default=0) + 1
    out: dict[str, Prompt] = {}
    for ann in annotations:
        said: list[AnnotationWarning] = []
        try:
            read = prompts_from_object(ann.files[0], ann.modality, followup_ct, said)
        except PromptSourceError as exc:  # NoLesionInAnnotation included
            if warnings is not None:
                warnings.append(f"follow-up {ann.modality} {ann.sop_instance_uid}: {exc}")
            continue
        if warnings is not None:
            warnings.extend(f"follow-up {ann.modality} {ann.sop_instance_uid}: {w}" for w in said)
        for p in read:
            ident = by_uid.get(p.identity.tracking_uid) or by_label.get(normalise_label(p.identity.tracking_id))
            if ident is None:
                ident = replace(p.identity, label=next_label)
                by_uid[ident.tracking_uid] = ident
                next_label += 1
            meta = {**p.meta, "sop_instance_uid": ann.sop_instance_uid}
            out[ident.tracking_uid] = replace(p, identity=ident, meta=meta)  # a later annotation replaces it
    return sorted(out.values(), key=lambda p: p.identity.label)
