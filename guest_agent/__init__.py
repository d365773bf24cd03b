"""In-guest agent: finds the device, drives it by MMIO and DMA, validates results."""
