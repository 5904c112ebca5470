"""Pipeline: analysis jobs and their steps, the tracking loop, measurements, RECIST and DICOM result objects."""
