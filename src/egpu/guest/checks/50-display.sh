#!/bin/sh
# The virtual eGPU's display: Linux's bochs DRM driver bound the display function (1234:1111),
# its framebuffer device /dev/fb0 exists, and the console drew on it (text is written to tty1;
# the framebuffer then holds non-black pixels). The host also checks a screenshot of the device.
pci=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor" 2>/dev/null)" = 0x1234 ] && [ "$(cat "$d/device")" = 0x1111 ] || continue
    pci=$d; break
done
if [ -z "$pci" ]; then
    echo "CHECK display fail no virtual eGPU display function (1234:1111) on the PCI bus"
    exit 0
fi
addr=${pci##*/}
drv=$(readlink "$pci/driver" 2>/dev/null); drv=${drv##*/}
case "$drv" in
    bochs*) ;;
    *) echo "CHECK display fail $addr is bound to '${drv:-no driver}', not bochs"; exit 0 ;;
esac

tries=0
until [ -c /dev/fb0 ] || [ "$tries" -ge 100 ]; do tries=$((tries + 1)); usleep 100000; done
if [ ! -c /dev/fb0 ]; then
    echo "CHECK display fail $drv bound $addr but /dev/fb0 did not appear"
    exit 0
fi
fbname=$(cat /sys/class/graphics/fb0/name 2>/dev/null)
size=$(cat /sys/class/graphics/fb0/virtual_size 2>/dev/null)
bpp=$(cat /sys/class/graphics/fb0/bits_per_pixel 2>/dev/null)

# Draw on the framebuffer console, then look for lit pixels in the first 3 MiB of /dev/fb0.
printf '\n egpu virtual eGPU display check: %s %s\n' "$addr" "$size" > /dev/tty1 2>/dev/null
lit=0
tries=0
while [ "$tries" -lt 50 ]; do
    lit=$(dd if=/dev/fb0 bs=64k count=48 2>/dev/null | tr -d '\000' | wc -c)
    [ "$lit" -gt 0 ] && break
    tries=$((tries + 1)); usleep 100000
done
if [ "$lit" -gt 0 ]; then
    # fbdev flushes its shadow buffer to VRAM from a deferred worker: give it time before the
    # self-test powers off, so the host's screenshot of the last picture shows this text.
    usleep 500000
    echo "CHECK display ok $addr $drv /dev/fb0 ($fbname ${size} ${bpp}bpp), console drawn"
else
    echo "CHECK display fail $addr /dev/fb0 ($fbname ${size}) stayed black after console output"
fi
