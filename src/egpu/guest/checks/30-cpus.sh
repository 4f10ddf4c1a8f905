#!/bin/sh
# The number of online CPUs matches what the host configured (EGPU_CPUS).
want=${EGPU_CPUS:-}
have=$(grep -c '^processor' /proc/cpuinfo)
if [ -z "$want" ]; then
    echo "CHECK cpus fail egpu.cpus not given"
elif [ "$have" = "$want" ]; then
    echo "CHECK cpus ok $have CPUs online"
else
    echo "CHECK cpus fail $have CPUs online, expected $want"
fi
