"""Coverage-guided fuzzing of every wire decoder, responder and socket server.

One harness per decoder in :mod:`fuzz.harnesses` (one concern per file); :mod:`fuzz.runner`
runs one under atheris/libFuzzer, :mod:`fuzz.campaign` runs them all (``make fuzz``) and
writes ``out/fuzz.json``.  The harness bodies need no atheris: ``tests/unit/test_fuzz_smoke.py``
replays their seeds and a fixed set of mutations in CI.
"""
