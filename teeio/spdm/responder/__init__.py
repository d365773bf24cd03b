"""SPDM responder (the device side; DSP0274 1.2/1.3, DSP0277), one module per request
group in libspdm's layout: ``vca``, ``certificate``, ``attestation``, ``key_exchange``,
``session_mgmt``, ``vendor``, over the ``context`` and ``state`` core, joined in
``dispatch``.  Not supported: mutual authentication, PSK, chunking,
HANDSHAKE_IN_THE_CLEAR, CSR/SET_CERTIFICATE, MEL, events, multi-key connections; their
requests get ERROR(UnsupportedRequest)."""

from .config import DEFAULT_FLAGS, IMPLEMENTED_FLAGS, ResponderConfig, VendorHandler
from .dispatch import Responder
from .state import RULES, Arrival, ConnectionState, Rule, Session

__all__ = ["DEFAULT_FLAGS", "IMPLEMENTED_FLAGS", "RULES", "Arrival", "ConnectionState",
           "Responder", "ResponderConfig", "Rule", "Session", "VendorHandler"]
