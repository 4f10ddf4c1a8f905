#!/bin/sh
# The virtual eGPU's DMA engine: Linux's nvme driver bound the NVMe function (class 010802), and
# EGPU_NVME_MIB MiB (default 8) of random data written through it at a 1 MiB offset read back
# identical after the page cache is dropped: every byte crossed the device by DMA both ways.
# The detail ends with the data's sha256 so the host can compare it with the backing file.
mib=${EGPU_NVME_MIB:-8}
case "$mib" in ''|*[!0-9]*) mib=8 ;; esac
skip=1   # MiB: start past LBA 0 so addressing, not just the first block, is exercised

pci=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class" 2>/dev/null)" = 0x010802 ] && [ "$(cat "$d/vendor")" = 0x1234 ] || continue
    pci=$d; break
done
if [ -z "$pci" ]; then
    echo "CHECK nvme fail no virtual eGPU NVMe function (1234, class 010802) on the PCI bus"
    exit 0
fi
addr=${pci##*/}
drv=$(readlink "$pci/driver" 2>/dev/null); drv=${drv##*/}
if [ "$drv" != nvme ]; then
    echo "CHECK nvme fail $addr is bound to '${drv:-no driver}', not nvme"
    exit 0
fi

# The controller probes asynchronously; its namespace's block device comes a little later.
blk=""
tries=0
while [ "$tries" -lt 300 ]; do
    for c in "$pci"/nvme/nvme*; do
        [ -e "$c" ] || continue
        ctrl=${c##*/}
        [ -b "/dev/${ctrl}n1" ] && blk=/dev/${ctrl}n1
    done
    [ -n "$blk" ] && break
    tries=$((tries + 1)); usleep 100000
done
if [ -z "$blk" ]; then
    echo "CHECK nvme fail nvme bound $addr but no namespace block device appeared"
    exit 0
fi
sectors=$(cat "/sys/block/${blk#/dev/}/size" 2>/dev/null || echo 0)
if [ $(( (mib + skip) * 2048 )) -gt "$sectors" ]; then
    echo "CHECK nvme fail $blk has $sectors sectors, too small for $mib MiB at $skip MiB"
    exit 0
fi

src=/tmp/nvme-check.bin
dd if=/dev/urandom of=$src bs=1M count="$mib" 2>/dev/null
want=$(sha256sum < $src); want=${want%% *}
if ! dd if=$src of="$blk" bs=1M seek=$skip conv=fsync 2>/tmp/nvme-check.err; then
    echo "CHECK nvme fail writing $blk: $(tail -n1 /tmp/nvme-check.err)"
    exit 0
fi
sync
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if="$blk" bs=1M skip=$skip count="$mib" 2>/dev/null | sha256sum); got=${got%% *}
rm -f $src
if [ "$got" = "$want" ]; then
    echo "CHECK nvme ok $addr $blk: $mib MiB written at $skip MiB and read back identical sha256=$want"
else
    echo "CHECK nvme fail $addr $blk: read back differs (wrote $want, read $got)"
fi
