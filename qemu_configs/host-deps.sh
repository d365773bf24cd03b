#!/bin/bash
# Host packages the project needs, installed with the host's own apt configuration.
# (The guest image's mmdebstrap is installed on demand by qemu_configs/image.py.)
set -euo pipefail
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v gcc >/dev/null || need+=(gcc)
# Optional: what the C accelerator of IDE TLP protection (teeio/_ide_accel.c) builds
# against -- the OpenSSL headers and the Python headers.  Without them the package still
# installs and uses its pure-Python path; installed here when we may.
optional=()
echo '#include <openssl/evp.h>' | gcc -E -x c - >/dev/null 2>&1 || optional+=(libssl-dev)
python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(
    os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
    || optional+=(python3-dev)
if ((${#optional[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        need+=("${optional[@]}")
    else
        echo "note: without ${optional[*]} the IDE accelerator is not built (pure Python is" \
             "used); as root: apt-get install ${optional[*]}" >&2
    fi
fi
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
