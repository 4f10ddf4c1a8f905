#!/bin/sh
# The PCI bus was enumerated: at least one device under /sys/bus/pci/devices.
# Contract for every check: print "CHECK <name> <ok|fail> <detail>"; settings from the kernel
# command line arrive as EGPU_<KEY> (egpu.mem_mib=512 -> EGPU_MEM_MIB=512).
n=$(ls /sys/bus/pci/devices 2>/dev/null | wc -l)
if [ "$n" -ge 1 ]; then
    echo "CHECK pci ok $n devices"
else
    echo "CHECK pci fail no PCI devices enumerated"
fi
