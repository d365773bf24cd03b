"""The NVMe personality: an NVMe 1.4 controller (class 01:08:02) behind the same TDISP,
IDE and link machinery as the accelerator; the namespace is a host file."""
