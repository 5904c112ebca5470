"""The small still patient the service tests of annotations and doors share: demo seed 7, 64 × 112 × 112 voxels at
2.5 × 2.5 × 3 mm, three lesions, two follow-ups without motion."""

from __future__ import annotations

from pathlib import Path

from lesiontrack.demo_data import DemoPatient, FollowUps, make_patient


def still_patient(folder: Path, new_lesions: dict[int, list[tuple[str, float, float]]] | None = None) -> DemoPatient:
    """The patient written under ``folder``; ``new_lesions`` as :func:`lesiontrack.demo_data.make_patient` takes it."""
    return make_patient(
        folder,
        seed=7,
        shape=(64, 112, 112),
        spacing=(2.5, 2.5, 3.0),
        n_lesions=3,
        n_followups=2,
        follow_ups=FollowUps.STILL,
        new_lesions=new_lesions,
    )
