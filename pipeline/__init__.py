"""Pipeline, in four rooms: jobs/ (running an analysis), science/ (tracking, confidence, measurements, RECIST),
dicom/ (the SEG/SR/annotation objects we read and write) and views/ (read models for the web and exports)."""
