"""One harness per decoder or server (:mod:`fuzz.runner` describes the interface)."""
