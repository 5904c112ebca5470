"""Prompted 3-D lesion segmentation engines (built-in adaptive engine, LesionLocator, nnInteractive)."""
