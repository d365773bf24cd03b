"""QEMU machine configuration, guest image builder and VM launcher."""
