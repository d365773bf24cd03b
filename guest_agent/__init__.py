"""The agent in the VM: finds the device, runs the self-test and the DOE/SPDM probes, and as
the TVM locks, verifies and accepts the TDI over GHCx, then DMAs into its private buffers.
"""
