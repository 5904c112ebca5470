"""DICOM over the wire: Storage SCP, series completion, prior query/retrieve and result sending."""
