"""Builders (no tests here) shared by the API, export and browser tests: a patient with several CT timepoints whose
lesions are measured, RECIST-assessed and written as real DICOM-SEG + TID 1500 SR with the pipeline's own objects
(``pipeline.science.measurements``, ``pipeline.science.recist``, ``pipeline.dicom.seg.writer``,
``pipeline.dicom.sr.writer``), then recorded in
the database through the ORM exactly as the pipeline persists them (series, instances, lesions, observations, jobs).
"""

from __future__ import annotations
