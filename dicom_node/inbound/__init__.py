"""DICOM towards us: the Storage SCP and its receivers, ingest, indexing, series completion."""
