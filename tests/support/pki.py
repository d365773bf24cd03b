"""Device identities for tests: one certificate chain per key algorithm per test run
(generating a chain costs a key pair per certificate), shared by every test that only
needs *a* valid chain (DSP0274 §10.7 certificate chains, teeio.pki)."""

from __future__ import annotations

import functools

from teeio import pki


@functools.cache
def shared_identity(alg: str = "P-384") -> pki.Identity:
    """The run's chain for *alg* (root, intermediate, leaf and the leaf's key)."""
    return pki.generate_chain(alg)
