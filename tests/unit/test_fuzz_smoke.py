"""CI's short seeded fuzz budget: every harness body of ``fuzz/`` over its seeds and a fixed
set of deterministic mutations, without atheris (``make fuzz`` runs the long budget)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from fuzz.runner import HARNESSES, load, quiet, smoke_inputs

#: mutations per harness kind (the stateful ones open sockets per input)
BUDGET = {"decoder": 2000, "responder": 300, "stateful": 60}


@pytest.fixture(autouse=True, scope="module")
def _quiet() -> Iterator[None]:
    """Logging off for these tests only (the refusals they provoke); back on after, so
    later tests' log captures see their records."""
    quiet()
    yield
    logging.disable(logging.NOTSET)


def test_every_harness_module_is_listed() -> None:
    from pathlib import Path

    import fuzz.harnesses as pkg

    on_disk = {p.stem for p in Path(pkg.__path__[0]).glob("*.py") if p.stem != "__init__"}
    assert on_disk == set(HARNESSES)


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_smoke(name: str) -> None:
    harness = load(name)
    seeds = harness.seeds()
    assert seeds, f"{name} has no seeds"
    started = time.monotonic()
    n = 0
    for data in smoke_inputs(seeds, BUDGET[harness.kind], seed=0x7E10):
        try:
            harness.one_input(data)
        except Exception as exc:
            pytest.fail(f"{name}: {type(exc).__name__}: {exc} on input {data.hex()}")
        n += 1
    assert n >= len(seeds) + BUDGET[harness.kind]
    assert time.monotonic() - started < 60
