"""SPDM requester (the TSM side; DSP0274 1.2/1.3, DSP0277), one module per request
group: ``vca``, ``certificate``, ``attestation``, ``key_exchange``, ``session_mgmt``,
``vendor``, over the ``context`` core, joined in ``connection``; ``evidence`` re-checks
signed measurements from the exact VCA and transcript bytes alone."""

from .config import DEFAULT_FLAGS, MeasurementResult, RequesterConfig, Session, Transport
from .connection import Requester
from .evidence import parse_vca, verify_measurement_transcript

__all__ = ["DEFAULT_FLAGS", "MeasurementResult", "Requester", "RequesterConfig", "Session",
           "Transport", "parse_vca", "verify_measurement_transcript"]
