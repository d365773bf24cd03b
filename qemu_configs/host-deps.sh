#!/bin/bash
# Host packages the project needs, installed with the host's own apt configuration.
# (The guest image's mmdebstrap is installed on demand by qemu_configs/image.py.)
set -euo pipefail
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v gcc >/dev/null || need+=(gcc)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: missing host packages (${need[*]}); install them as root: apt-get install ${need[*]}" >&2
        exit 1
    fi
    echo "installing host packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
