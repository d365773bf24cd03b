"""Micro-benchmarks of the vfio-user server and the device's DMA engine."""
