"""QEMU machine configuration, the guest image, the VM launcher ``teeio-vm``, the whole TEE
stack and the demo ``teeio-demo``, and the guest owner's policy.
"""
