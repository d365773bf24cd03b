"""Found by fuzz/harnesses/spdm_codec.py: a 1.3 CAPABILITIES whose supported-algorithms block
declares a Length (bytes 2..3 of the block) smaller than the block's own 4-byte header is
accepted by ``Capabilities.decode``, and what it decodes to does not encode to a decodable
message.  The decoder now refuses it (DecodeError)."""

from __future__ import annotations

import pytest

from teeio.spdm import codec
from teeio.spdm.errors import DecodeError

# version 1.3, CAPABILITIES, Param1 bit 0 (block present); CT/flags/sizes; block
# ff 00 | Length 3 (< 4) -- then one byte of DOE pad.
CRASH = bytes.fromhex("13610100ffffffffffffffffffffffff01ffff00ff000300")


def test_capabilities_block_shorter_than_its_header() -> None:
    with pytest.raises(DecodeError, match="shorter than its 4-byte header"):
        codec.Capabilities.decode(CRASH, pad=True)
