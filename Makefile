# TEE-IO emulator.  `make demo` and `make test` are all a newcomer needs; both install
# what is missing (host packages through apt, the venv through pip, the guest image).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FRESH ?=

.PHONY: all venv demo test test-fast image shell tee-shell bench lint clean host-deps wheel-check fuzz

all: demo

host-deps:
	@bash qemu_configs/host-deps.sh

$(STAMP): pyproject.toml | host-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(STAMP)

image: $(STAMP)
	$(PY) -m qemu_configs.image $(if $(FRESH),--fresh)

demo: image
	$(PY) -m qemu_configs.demo

shell: image
	$(PY) -m qemu_configs.launcher --shell

tee-shell: image
	$(PY) -m qemu_configs.demo --shell --workdir $(or $(WORKDIR),/tmp/teeio-shell)

test: image
	TEEIO_REQUIRE_E2E=1 $(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest tests/unit tests/protocol tests/integration

# Every benchmark's JSON in out/, then one summary table (out/bench-summary.md, .json) and
# the plots beside the JSON (matplotlib, the optional `bench` extra).
bench: image
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.bench --out out/bench.json
	$(PY) -m bench.bench_backends --out out/bench-backends.json
	$(PY) -m bench.bench_vfio --out out/bench-vfio.json
	$(PY) -m bench.bench_spdm --out out/bench-spdm.json
	$(PY) -m bench.bench_link --out out/bench-link.json
	$(PY) -m bench.bench_tdi --out out/bench-tdi.json
	$(PY) -m bench.bench_nvme --out out/bench-nvme.json
	$(PY) -m bench.bench_cli --out out/bench-cli.json
	$(PY) -m bench.summary --out out

# Coverage-guided fuzzing of every decoder and server (fuzz/): atheris (the optional `fuzz`
# extra), niced; budget per harness: FUZZ_RUNS inputs within FUZZ_SECONDS, stateful ones
# FUZZ_STATEFUL_SECONDS.  Figures in out/fuzz.json, crashing inputs in out/fuzz-crashes/.
FUZZ_RUNS ?= 1000000
FUZZ_SECONDS ?= 600
FUZZ_STATEFUL_SECONDS ?= 300
fuzz: $(STAMP)
	$(PY) -m pip install --quiet -e '.[fuzz]'
	FUZZ_RUNS=$(FUZZ_RUNS) FUZZ_SECONDS=$(FUZZ_SECONDS) \
	FUZZ_STATEFUL_SECONDS=$(FUZZ_STATEFUL_SECONDS) $(PY) -m fuzz.campaign --out out

# Tracked files only (an untracked scratch file is nobody's lint failure); mypy checks the
# packages pyproject.toml lists.
lint: $(STAMP)
	git ls-files -z '*.py' | xargs -0 $(VENV)/bin/ruff check --force-exclude
	$(VENV)/bin/mypy

# The wheel as a user gets it: build, install into a fresh venv outside the checkout, and
# run the attestation quick start and one guest boot from there (.ci/wheel-check).
wheel-check: image
	bash .ci/wheel-check

clean:
	rm -rf $(VENV) out build dist .hypothesis .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Device firmware image (the ELF the emulated device measures); flags live in the builder.
.PHONY: firmware
firmware: out/firmware/teeio-fw.elf
out/firmware/teeio-fw.elf: $(wildcard vfio_user_dev/firmware_src/*) vfio_user_dev/firmware_build.py | $(STAMP)
	$(PY) -m vfio_user_dev.firmware_build --out $@
