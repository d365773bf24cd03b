"""Benchmarks (``make bench``): MMIO round trips and DMA on both vfio-user transports, SPDM
connects, DMA through the IDE link, and the guest's TDI_LOCK to RUN latency.
"""
