"""SPDM requester (the TSM side; DSP0274 1.2/1.3, DSP0277), sans-IO over a transport
callable ``send(doe_type, payload) -> response payload`` (DOE 0001:01 SPDM, 0001:02
secured records).  Everything the responder says is checked, and each failure raises
a precise :class:`~teeio.spdm.errors.RequesterError` subclass."""

from __future__ import annotations

from .attestation import AttestationRequests
from .certificate import CertificateRequests
from .key_exchange import KeyExchangeRequests
from .session_mgmt import SessionRequests
from .vca import VcaRequests
from .vendor import VendorRequests


class Requester(VcaRequests, CertificateRequests, AttestationRequests, KeyExchangeRequests,
                SessionRequests, VendorRequests):
    """One SPDM connection to one responder, driven over *send*."""
