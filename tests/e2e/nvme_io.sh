# The guest's side of tests/e2e/test_nvme_guest.py, run by qemu_configs/guest/run.sh
# (teeio.mode=sh) after journeys.PRELUDE, with SEED (hex) set: Linux's stock nvme driver
# doing real I/O over an accepted TDI, then the host breaks the TDI while I/O runs; then,
# in the same boot, the guest recovers (accept --restart) and finally binds the same
# driver with no TEE at all (stop; the host unbinds the VM and disconnects the device;
# accept --no-tee).
# Namespace layout (64 MiB): ext4 [0, 16M), fio [16M, 18M) and [20M, 22M), a plaintext pattern at 32M,
# the in-flight writer from 40M (16 KiB blocks), the after-recovery marker at 48M, the
# cleartext (no-TEE) marker at 52M, the after-ERROR marker at 60M.
cd /tmp                                   # fio and friends write into the cwd
# A dead controller is noticed after one I/O timeout (default 30 s): keep the run short.
modprobe nvme_core io_timeout=8 admin_timeout=8
data() { python3 -c "import sys; from guest_agent.testdata import stream
sys.stdout.buffer.write(stream(0x$SEED, '$1', $2))"; }
marker() { python3 -c "import sys
m = b'teeio-nvme-$1-%08x|' % 0x$SEED
sys.stdout.buffer.write((m * ($2 // len(m) + 1))[:$2])"; }

# 1. lock, attest, accept; a trusted-DMA window per System RAM range; nvme binds
$A accept --policy $R/policy.json --report $R/accept.json > $R/accept.txt
cat $R/accept.txt
D=$(python3 -c 'import json; print(json.load(open("/mnt/results/accept.json"))["nvme"]["namespaces"][0])')
C=/dev/$(python3 -c 'import json; print(json.load(open("/mnt/results/accept.json"))["nvme"]["controller"])')
$A tdi-info --json > $R/info-run.json
nvme list -o json > $R/nvme-list.json
nvme id-ctrl $C -o json > $R/id-ctrl.json

# 2. a file system: write, sync, umount, fsck, mount again, compare
modprobe ext4
mkfs.ext4 -F -q -b 4096 $D 16M
mkdir -p /mnt/nv
mount $D /mnt/nv
data nvme-file-1 300000 > /mnt/nv/one.bin
data nvme-file-2 1048699 > /mnt/nv/two.bin
(cd /mnt/nv && sha256sum one.bin two.bin) > $R/sums.txt
sync
umount /mnt/nv
fsck.ext4 -f -n $D > $R/fsck.txt 2>&1
mount $D /mnt/nv
(cd /mnt/nv && sha256sum -c $R/sums.txt) > $R/sums-check.txt
umount /mnt/nv
debugfs -R "blocks /two.bin" $D > $R/blocks.txt

# 3. fio with crc32c verification, queue depths 1 and 8; then a known pattern at 32M
fio --filename=$D --size=2M --rw=randrw --bs=4k --ioengine=libaio --direct=1 \
    --verify=crc32c --verify_fatal=1 --verify_state_save=0 --randseed=$((0x$SEED)) \
    --output-format=json --output=$R/fio.json \
    --name=qd1 --offset=16M --iodepth=1 --name=qd8 --offset=20M --iodepth=8
marker plaintext 1048576 > /tmp/pattern.bin
dd if=/tmp/pattern.bin of=$D bs=64k seek=512 oflag=direct conv=notrunc,nocreat status=none

# 4. I/O runs while the host breaks the TDI
marker in-flight 16384 > /tmp/inflight.bin
marker after-error 4096 > /tmp/after.bin
writer() {
    i=0
    while [ -b $D ] && [ $i -lt 1024 ] && timeout 60 dd if=/tmp/inflight.bin of=$D bs=16k \
            seek=$((2560 + i)) oflag=direct conv=notrunc,nocreat status=none; do
        i=$((i + 1))
        echo $i > /tmp/writes
    done
    echo $i > $R/writer.txt
}
writer &
WRITER=$!
while [ "$(cat /tmp/writes 2>/dev/null || echo 0)" -lt 3 ]; do sleep 0.1; done
pause io
wait $WRITER                              # bounded: every write is (timeout 60)
dmesg > $R/dmesg.txt
cat /sys/bus/pci/devices/*/nvme/*/state > $R/ctrl-state.txt 2>/dev/null || true
# one more write: Linux refuses it (the dead controller's disk has no capacity left) or the
# disk is gone; either way it never reaches the device
if [ -b $D ]; then
    if timeout 60 dd if=/tmp/after.bin of=$D bs=4k seek=15360 oflag=direct \
            conv=notrunc,nocreat status=none 2> $R/after.txt; then
        echo "unexpected success: a write after the ERROR"; exit 1
    fi
else
    echo "$D is gone" > $R/after.txt
fi
$A tdi-info --json > $R/info-error.json
pause after-error                         # the host checks the media and every party

# 5. recovery in the same boot: --restart stops the TDI (ERROR -> CONFIG_UNLOCKED), unbinds
# the dead controller's driver, then locks, attests, accepts and binds nvme again
$A accept --restart --policy $R/policy.json --report $R/accept-restart.json \
    > $R/accept-restart.txt
cat $R/accept-restart.txt
D=$(python3 -c 'import json; print(json.load(open("/mnt/results/accept-restart.json"))["nvme"]["namespaces"][0])')
mount $D /mnt/nv
(cd /mnt/nv && sha256sum -c $R/sums.txt) > $R/sums-recovered.txt
data nvme-file-3 200000 > /mnt/nv/three.bin
(cd /mnt/nv && sha256sum three.bin) > $R/sums-three.txt
sync
umount /mnt/nv
marker recovered 65536 > /tmp/recovered.bin
dd if=/tmp/recovered.bin of=$D bs=64k seek=768 oflag=direct conv=notrunc,nocreat status=none
$A tdi-info --json > $R/info-recovered.json
pause recovered                           # the host: every party says RUN again

# 6. the same driver with no TEE: unbind it (clearing Bus Master Enable in RUN is a TDISP
# security event: ERROR) and stop the TDI; the host then forgets this VM and tears the IDE
# stream down; the driver binds over T=0, in the clear.  Only the cleartext marker is
# written and read back (nothing of the TEE-era data)
BDF=$(python3 -c 'import json; print(json.load(open("/mnt/results/accept-restart.json"))["bdf"])')
echo $BDF > /sys/bus/pci/drivers/nvme/unbind
$A stop > $R/stop.txt
pause stopped
$A accept --no-tee --policy $R/policy.json --report $R/accept-plain.json > $R/accept-plain.txt
cat $R/accept-plain.txt
D=$(python3 -c 'import json; print(json.load(open("/mnt/results/accept-plain.json"))["nvme"]["namespaces"][0])')
marker cleartext 65536 > /tmp/cleartext.bin
dd if=/tmp/cleartext.bin of=$D bs=64k seek=832 oflag=direct conv=notrunc,nocreat status=none
dd if=$D of=/tmp/cleartext-back.bin bs=64k skip=832 count=1 iflag=direct status=none
cmp /tmp/cleartext.bin /tmp/cleartext-back.bin && echo same > $R/cleartext-back.txt
lspci -nnk -s $BDF > $R/lspci-plain.txt
