"""vfio-user server and the emulated TEE-IO capable PCIe device."""
