"""Models: the imaging core, registration engines and segmentation engines (with local weight loading)."""
