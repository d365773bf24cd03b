"""e2e fixtures: the guest image, built on demand.

Under ``make test`` (TEEIO_REQUIRE_E2E=1) these tests never skip: a missing image
is built, and a failed build fails the suite.  Run by hand without that variable
and without an image, they skip and say why.
"""

from __future__ import annotations

import os

import pytest

from qemu_configs import image


@pytest.fixture(scope="session")
def guest_image() -> image.GuestImage:
    if not image.is_built():
        if not os.environ.get("TEEIO_REQUIRE_E2E"):
            pytest.skip("guest image not built (run 'make image', or 'make test' which builds it)")
        try:
            return image.ensure_image()
        except image.ImageError as exc:
            pytest.fail(f"guest image build failed: {exc}")
    return image.paths()
