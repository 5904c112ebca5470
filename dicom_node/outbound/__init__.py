"""DICOM towards the PACS: prior query/retrieve, the DIMSE SCU and result delivery."""
