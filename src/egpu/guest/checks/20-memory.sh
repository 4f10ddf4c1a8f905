#!/bin/sh
# Guest RAM matches the size the host configured (EGPU_MEM_MIB).
# Counted as the top-level "System RAM" ranges of /proc/iomem: what firmware handed the kernel.
# On x86 the legacy hole below 1 MiB and a few firmware pages are not RAM, so allow a slack of
# max(4 MiB, 2%) below the configured size, and nothing above it.
want=${EGPU_MEM_MIB:-}
if [ -z "$want" ]; then
    echo "CHECK memory fail egpu.mem_mib not given"; exit 0
fi
total=0
while IFS= read -r line; do
    case "$line" in
        " "*) continue ;;
        *": System RAM") range=${line%% :*}
            start=${range%-*}; end=${range#*-}
            total=$((total + 0x$end - 0x$start + 1)) ;;
    esac
done < /proc/iomem
have=$((total / 1048576))
slack=$((want / 50)); [ "$slack" -lt 4 ] && slack=4
if [ "$have" -le "$want" ] && [ "$have" -ge $((want - slack)) ]; then
    echo "CHECK memory ok ${have} MiB of RAM (configured ${want} MiB)"
else
    echo "CHECK memory fail ${have} MiB of RAM, expected ${want} MiB"
fi
