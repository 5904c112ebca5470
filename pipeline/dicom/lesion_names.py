"""How a lesion is named in the objects we write: its Tracking ID plus the radiologist's description.

The Tracking ID ("L3 liver") identifies the lesion; the description ("left lower lobe mass, spiculated") is what the
radiologist wrote on the baseline (SEG SegmentDescription / a SegmentLabel that differs from the Tracking ID, or the
SR finding). Viewers show the SEG's SegmentLabel and the SR's Tracking Identifier text, both LO (64 characters), so
:func:`display_name` joins the two within that limit; the full description goes to SegmentDescription (ST).
"""

from __future__ import annotations

LO_MAX = 64
SEPARATOR = ": "


def clean_description(tracking_id: str, description: str | None) -> str | None:
    """The description worth showing next to the ID: stripped, not empty, not just the ID (or part of it) again."""
    if not description:
        return None
    text = " ".join(str(description).split())
    if not text or text.lower() in tracking_id.lower():
        return None
    if text.lower().startswith((tracking_id + SEPARATOR).lower()):
        text = text[len(tracking_id) + len(SEPARATOR) :]
    return text or None


def display_name(tracking_id: str, description: str | None, limit: int = LO_MAX) -> str:
    """``"L3 liver: left lower lobe mass"``, shortened with "..." to ``limit`` characters (the ID is kept whole)."""
    desc = clean_description(tracking_id, description)
    if desc is None:
        return tracking_id[:limit]
    text = f"{tracking_id}{SEPARATOR}{desc}"
    if len(text) <= limit:
        return text
    room = limit - len(tracking_id) - len(SEPARATOR) - 3
    return f"{tracking_id}{SEPARATOR}{desc[:room].rstrip()}..." if room >= 4 else tracking_id[:limit]


def split_display_name(text: str, tracking_id: str | None = None) -> tuple[str, str | None]:
    """Inverse of :func:`display_name` for our own objects: ``(tracking_id, description)``."""
    if tracking_id and text.startswith(tracking_id + SEPARATOR):
        return tracking_id, text[len(tracking_id) + len(SEPARATOR) :] or None
    if tracking_id:
        return tracking_id, clean_description(tracking_id, text)
    return text, None
