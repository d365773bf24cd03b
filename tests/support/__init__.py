"""What test modules share: helpers, fakes and rigs as plain modules (no fixtures, no
tests).  Fixtures live in the nearest common ``conftest.py``; no test module imports
another (tests/unit/test_test_layout.py checks both)."""
