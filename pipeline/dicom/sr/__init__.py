"""TID 1500 SR: reading a prior's measurements, writing ours and the OHIF measurements SR."""
