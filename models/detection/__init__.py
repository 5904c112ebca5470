"""Detectors that look for findings the tracking loop was not prompted with (new lesions)."""

from __future__ import annotations

from lesiontrack.models.detection.new_lesions import (
    DetectedCandidate,
    DetectionFindings,
    DetectionOptions,
    detect_new_lesions,
    search_new_lesions,
)

__all__ = ["DetectedCandidate", "DetectionFindings", "DetectionOptions", "detect_new_lesions", "search_new_lesions"]
