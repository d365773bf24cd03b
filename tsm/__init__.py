"""Host TEE Security Manager (SPDM requester, IDE_KM, TDI lifecycle): next issues."""
