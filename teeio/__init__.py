"""Shared, sans-IO protocol cores (PCIe config space, and later DOE/SPDM/IDE/TDISP)."""
