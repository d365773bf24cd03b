"""Coverage-guided fuzzing of every wire decoder, responder and socket server.

One harness per decoder, responder or server in :mod:`fuzz.harnesses`; :mod:`fuzz.runner`
runs one under atheris/libFuzzer, :mod:`fuzz.campaign` runs them all (``make fuzz``) and
writes ``out/fuzz.json`` (figures in docs/hardening.md).  The harness bodies need no
atheris: ``tests/unit/test_fuzz_smoke.py`` replays their seeds and fixed mutations in CI.
"""
