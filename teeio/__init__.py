"""Shared, sans-IO protocol cores of TEE-IO: PCIe config space and capabilities, DOE, SPDM,
IDE and IDE_KM, TLPs, TDISP, GHCx, the device PKI and measurements, and the guest's
verification; :mod:`teeio.transport` is the one package with socket code.
"""
