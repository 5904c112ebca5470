"""Readers of the annotations radiologists leave on a prior study (GSPS, RTSTRUCT, the drawings in a TID 1500 SR),
into the one prompt model (:class:`models.segmentation.prompts.Prompt`, with the 2-D drawing in
``meta["drawing"]``), with a visible warning for every annotation that cannot become a lesion."""
