"""DICOM objects the pipeline reads and writes (SEG, SR, annotations), one sub-room per object."""
