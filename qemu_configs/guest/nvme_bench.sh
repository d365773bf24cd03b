# The guest's side of bench/bench_nvme.py, run by run.sh (teeio.mode=sh, sh -e).  The host
# puts it in the results share after the variables of one boot:
#   BOOT      plain: (a) the TDISP NVMe at T=0 and (d) QEMU's own NVMe, then accept and (c) T=1
#             swiotlb: the kernel has swiotlb=force: (b) the TDISP NVMe at T=0, QEMU's NVMe
#   ROUNDS RUNTIME RAMP SIZE QD FIO_TIMEOUT   the fio jobs (fio --runtime, --ramp_time, ...)
#   QEMU_NVME   the PCI IDs (vendor:device) of QEMU's NVMe controller
# Every fio job runs between two pauses (the host reads its processes' CPU time and the
# device's counters at each); its JSON goes to $R/fio/<leg>-<round>-<job>.json.
# Before the jobs, swiotlb's bounces while dd reads 1 MiB from each device.
A="python3 -m guest_agent"
R=/mnt/results
pause() { touch "$R/paused-$1"; while [ ! -e "$R/resume-$1" ]; do sleep 0.02; done; }
cd /tmp
mkdir -p $R/fio
uname -r > $R/kernel.txt
fio --version > $R/fio-version.txt

namespace() {   # the namespace an accept report names
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["nvme"]["namespaces"][0])' "$1"
}
qemu_namespace() {   # the namespace of QEMU's NVMe controller (bound by the same modprobe)
    python3 -c 'import sys
from pathlib import Path
from guest_agent.linux_driver import nvme_namespaces
want = tuple("0x" + x for x in sys.argv[1].split(":"))
dev = next(d for d in sorted(Path("/sys/bus/pci/devices").iterdir())
           if ((d / "vendor").read_text().strip(), (d / "device").read_text().strip()) == want)
print(nvme_namespaces(dev)["namespaces"][0])' "$QEMU_NVME"
}

# leg NAME ROUND DEVICE: the four jobs, writes before the reads of the same pattern
leg() {
    for job in seq_write:write:128k seq_read:read:128k rand_write:randwrite:4k \
               rand_read:randread:4k; do
        name=${job%%:*}; rest=${job#*:}; rw=${rest%%:*}; bs=${rest#*:}
        id=$1-$2-$name
        pause "go-$id"
        timeout $FIO_TIMEOUT fio --name=$name --filename=$3 --rw=$rw --bs=$bs --size=$SIZE \
            --ioengine=libaio --iodepth=$QD --direct=1 --time_based --runtime=$RUNTIME \
            --ramp_time=$RAMP --randseed=1 --output-format=json --output=$R/fio/$id.json
        pause "done-$id"
    done
}

bounce_check() {   # swiotlb's bounces (its trace event) while dd reads 1 MiB from each
    [ -d /sys/kernel/tracing/events ] || mount -t tracefs none /sys/kernel/tracing
    ev=/sys/kernel/tracing/events/swiotlb/swiotlb_bounced/enable
    echo > /sys/kernel/tracing/trace
    echo 1 > $ev
    for d in "$@"; do dd if=$d of=/dev/null bs=128k count=8 iflag=direct status=none; done
    echo 0 > $ev
    # "<count> <PCI function>"; none at all without swiotlb=force
    grep -o "swiotlb_bounced: dev_name: [^ ]*" /sys/kernel/tracing/trace | cut -d' ' -f3 |
        sort | uniq -c > $R/swiotlb-bounced.txt || true
    for f in /sys/bus/pci/devices/*; do
        echo "${f##*/} $(cat $f/vendor):$(cat $f/device)"
    done > $R/pci-ids.txt
}

# the TDISP NVMe at T=0 (no lock, no IDE): `modprobe nvme` binds QEMU's controller too
$A accept --no-tee --policy $R/policy.json --report $R/accept-plain.json > $R/accept-plain.txt
D=$(namespace $R/accept-plain.json)
Q=$(qemu_namespace)
echo "$D $Q" > $R/namespaces.txt
bounce_check $D $Q
if [ "$BOOT" = swiotlb ]; then
    r=1; while [ $r -le $ROUNDS ]; do
        leg swiotlb $r $D
        leg qemu_nvme_swiotlb $r $Q
        r=$((r + 1))
    done
else
    r=1; while [ $r -le $ROUNDS ]; do
        leg no_tee $r $D
        leg qemu_nvme $r $Q
        r=$((r + 1))
    done
    # TEE-IO: the agent unbinds the T=0 driver, locks, attests, accepts, opens the
    # trusted-DMA windows over all RAM and binds nvme again (T=1 on the IDE stream)
    $A accept --policy $R/policy.json --report $R/accept-tee.json > $R/accept-tee.txt
    D=$(namespace $R/accept-tee.json)
    r=1; while [ $r -le $ROUNDS ]; do
        leg tee_io $r $D
        r=$((r + 1))
    done
    $A tdi-info --json > $R/tdi-info.json
fi
pause end
