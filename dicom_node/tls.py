"""SSL contexts for DICOM TLS: the SCP's server context and outgoing (SCU) client contexts."""

from __future__ import annotations

import ssl

from lesiontrack.config.settings import TlsSettings


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """None when TLS is off; otherwise a context that (optionally) requires a client certificate from ``ca_file``."""
    if not tls.enabled:
        return None
    cx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cx.minimum_version = ssl.TLSVersion.TLSv1_2
    cx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file:
        cx.load_verify_locations(cafile=str(tls.ca_file))
    cx.verify_mode = (
        ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL if tls.ca_file else ssl.CERT_NONE
    )
    return cx


def client_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """None when TLS is off; otherwise verify the peer against ``ca_file`` and present our certificate."""
    if not tls.enabled:
        return None
    cx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    cx.minimum_version = ssl.TLSVersion.TLSv1_2
    cx.check_hostname = False  # DICOM peers are configured by address; trust comes from the CA file
    cx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return cx
