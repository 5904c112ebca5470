"""DICOM-SEG: reading a prior's segments, writing a follow-up's tracked lesions."""
