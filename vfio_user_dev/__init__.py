"""The device server ``teeio-device``: the vfio-user transports and the emulated TEE-IO PCIe
device behind them (function, DSM with SPDM, IDE_KM and TDISP, link and root port), with its
DOE, platform and host access sockets.
"""
