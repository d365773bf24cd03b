# TEE-IO emulator.  `make demo` and `make test` are all a newcomer needs; both install
# what is missing (host packages through apt, the venv through pip, the guest image).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FRESH ?=

.PHONY: all venv demo test test-fast image shell tee-shell bench lint clean host-deps

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

bench: image
	$(PY) -m bench.bench --out out/bench.json
	$(PY) -m bench.bench_backends --out out/bench-backends.json
	$(PY) -m bench.bench_spdm --out out/bench-spdm.json
	$(PY) -m bench.bench_link --out out/bench-link.json
	$(PY) -m bench.bench_tdi --out out/bench-tdi.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache *.egg-info

# Device firmware image (the ELF the emulated device measures); flags live in the builder.
.PHONY: firmware
firmware: out/firmware/teeio-fw.elf
out/firmware/teeio-fw.elf: firmware/fw.c firmware/link.ld vfio_user_dev/firmware_build.py | $(STAMP)
	$(PY) -m vfio_user_dev.firmware_build --out $@
