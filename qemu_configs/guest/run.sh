#!/bin/sh
# Guest-run protocol (docs/design.md decision 6).  Runs as PID 1 after switch_root.
#   kernel parameters:  teeio.mode=selftest|shell|sh|...   teeio.seed=<hex>
#                       teeio.file=<path>: the script of mode sh (or of the agent's script)
#   results share:      /mnt/results/{report.json,lspci.txt,agent.log}, then status last
# The host judges the run by the status file and the results, never by QEMU's exit code.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/mnt/project
export PYTHONDONTWRITEBYTECODE=1
export HOME=/tmp
R=/mnt/results

mode=selftest
args=""
file=""
for p in $(cat /proc/cmdline); do
    case "$p" in
        teeio.mode=*) mode="${p#teeio.mode=}" ;;
        teeio.file=*) file="${p#teeio.file=}"; args="$args --file=$file" ;;
        teeio.*=*) k="${p%%=*}"; k="${k#teeio.}"; args="$args --$k=${p#*=}" ;;
    esac
done
echo "teeio-guest: mode=$mode args=$args"

mkdir -p /dev/hugepages /dev/pts /dev/shm
mount -t hugetlbfs -o pagesize=2M none /dev/hugepages
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
echo 8 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
modprobe uio_pci_generic 2>/dev/null || echo "teeio-guest: uio_pci_generic not loaded"
lspci -nn -vvv > $R/lspci.txt 2>&1

finish() {
    sync
    echo "$1" > $R/status.tmp && mv $R/status.tmp $R/status
    sync
    echo "teeio-guest: status $1"
    busybox poweroff -f
}

case "$mode" in
    shell)
        echo "teeio-guest: root shell; the agent is 'python3 -m guest_agent --help'; 'busybox poweroff -f' to leave"
        setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
        finish shell-exited
        ;;
    sh)
        # A shell script from the results share, as a person would type it (a journey,
        # the guest commands of docs/by-hand.md): -e stops at the first failing command.
        sh -e -x "$file" > $R/agent.log 2>&1
        rc=$?
        cat $R/agent.log
        if [ $rc -eq 0 ]; then finish ok; else finish "failed rc=$rc"; fi
        ;;
    *)
        python3 -m guest_agent "$mode" $args --report $R/report.json > $R/agent.log 2>&1
        rc=$?
        cat $R/agent.log
        if [ $rc -eq 0 ]; then finish ok; else finish "failed rc=$rc"; fi
        ;;
esac
