"""The host TEE Security Manager: attests the device over SPDM, keys IDE at both ends and drives
its TDI with TDISP; one-shot ``teeio-tsm attest|ide|tdisp`` and the daemon (control socket,
journal, a GHCx server per VM).
"""
