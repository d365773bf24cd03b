"""Build hook for what pyproject.toml cannot declare: the optional C accelerator of IDE TLP
protection, ``teeio._ide_accel`` (teeio/_ide_accel.c, against the system OpenSSL's
libcrypto).  It is optional: without a compiler, the Python headers or the OpenSSL
headers the build warns and goes on, and teeio uses its pure-Python reference
(teeio/ide_accel.py).  ``TEEIO_NO_ACCEL=1`` skips it.  docs/ide-and-link.md, "The
accelerator"."""

import os

from setuptools import Extension, setup

ACCEL = Extension("teeio._ide_accel", sources=["teeio/_ide_accel.c"], libraries=["crypto"],
                  optional=True)

setup(ext_modules=[] if os.environ.get("TEEIO_NO_ACCEL") == "1" else [ACCEL])
