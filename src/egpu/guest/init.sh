#!/bin/sh
# /init of egpu's built-in guest (busybox). Protocol with the host: egpu/guest/protocol.py.
#
# 1. mount the kernel filesystems, load the modules listed in /etc/egpu/modules (decompressed
#    on the host, in dependency order), bring up networking if there is any;
# 2. export each kernel command-line setting egpu.<key>=<value> as EGPU_<KEY>;
# 3. with egpu.mounts=...: load /etc/egpu/modules.shares and mount each shared folder;
# 4. start the QEMU guest agent on its virtio port (if the host gave one), print the ready
#    marker, then load /etc/egpu/modules.later (nothing at boot needs them);
# 5. with egpu.selftest=1: run every /checks/*.sh in order, print one EGPU-SELFTEST line, power off;
#    otherwise: hand PID 1 to busybox init (a respawning shell on the console, acpid turning the
#    power button -- ACPI on x86_64, the virt machine's GPIO key on aarch64 -- into a clean
#    poweroff).
#
# A check script prints lines "CHECK <name> <ok|fail> <detail>" and may print anything else
# (that goes to the console only). A script that prints no CHECK line counts as a failed check
# named after the file (without its NN- order prefix).

READY_MARKER=EGPU-GUEST-READY
SELFTEST_MARKER=EGPU-SELFTEST

/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=linux

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname egpu-guest

# egpu.foo_bar=1 -> EGPU_FOO_BAR=1 (names restricted to [a-z0-9_] so nothing odd is evaluated)
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        egpu.*=*)
            key=${arg%%=*}; key=${key#egpu.}
            case "$key" in *[!a-z0-9_]*|'') continue ;; esac
            export "EGPU_$(echo "$key" | tr a-z A-Z)=${arg#*=}"
            ;;
    esac
done
set +f

# A module list has one line per group of interdependent modules, in load order; the groups
# load side by side (module loading is CPU-bound under TCG and the guest has several vCPUs).
load_modules() {
    while read -r group; do
        (
            for mod in $group; do
                insmod "/lib/modules/$mod.ko" || echo "egpu-init: cannot load module $mod"
            done
        ) &
    done < "$1"
    wait
}
load_modules /etc/egpu/modules

# The modules loaded after the ready marker: the share modules first unless mounts loaded them
# (a later module may depend on one of them, never the other way round).
load_later_modules() {
    [ -n "$EGPU_MOUNTS" ] || load_modules /etc/egpu/modules.shares
    load_modules /etc/egpu/modules.later
}

# egpu.mounts=TAG:ro|rw:PATH,... (egpu/guest/protocol.py: mounts_arg). PATH is percent-encoded:
# only [A-Za-z0-9/._%-] may appear, and each %XX becomes one byte through printf's \xXX.
# Anything else is skipped with a message: the command line is the host's, but stay strict.
mount_shares() {
    [ -n "$EGPU_MOUNTS" ] || return 0
    load_modules /etc/egpu/modules.shares
    opts="trans=virtio,version=9p2000.L"
    case "${EGPU_MSIZE:-}" in ''|*[!0-9]*) ;; *) opts="$opts,msize=$EGPU_MSIZE" ;; esac
    set -f
    for entry in $(echo "$EGPU_MOUNTS" | tr ',' ' '); do
        tag=${entry%%:*}; rest=${entry#*:}; mode=${rest%%:*}; enc=${rest#*:}
        case "$tag" in ''|*[!a-z0-9]*) echo "egpu-init: bad share tag in $entry"; continue ;; esac
        case "$mode" in ro|rw) ;; *) echo "egpu-init: bad share mode in $entry"; continue ;; esac
        case "$enc" in /*) ;; *) echo "egpu-init: bad share path in $entry"; continue ;; esac
        case "$enc" in *[!A-Za-z0-9/._%-]*) echo "egpu-init: bad share path in $entry"; continue ;; esac
        case "$(echo "$enc" | sed 's/%[0-9A-F][0-9A-F]//g')" in
            *%*) echo "egpu-init: bad share path in $entry"; continue ;;
        esac
        path=$(printf "$(echo "$enc" | sed 's/%\([0-9A-F][0-9A-F]\)/\\x\1/g')")
        how=$opts
        [ "$mode" = ro ] && how="$how,ro"
        if mkdir -p "$path" && mount -t 9p -o "$how" "$tag" "$path"; then
            echo "egpu-init: mounted share $tag at $path ($mode)"
        else
            echo "egpu-init: cannot mount share $tag at $path"
        fi
    done
    set +f
}

ip link set lo up
cat > /run/udhcpc.sh <<'EOF'
#!/bin/sh
# udhcpc hook: configure the address, default route and resolver it was given
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        ;;
esac
EOF
chmod 755 /run/udhcpc.sh
for dev in /sys/class/net/*; do
    iface=${dev##*/}
    [ "$iface" = lo ] && continue
    ip link set "$iface" up
    # in the background: a network without DHCP must not hold back the ready marker
    udhcpc -b -q -i "$iface" -s /run/udhcpc.sh >/dev/null 2>&1 &
done
mount_shares

# The QEMU guest agent, on the virtio-serial port the host named for it (no udev here: the port
# names are in sysfs). guest-shutdown runs /sbin/shutdown -P|-H|-r +0 MESSAGE, which busybox
# lacks; the script below maps it onto poweroff, halt and reboot.
cat > /sbin/shutdown <<'SHUTDOWN'
#!/bin/sh
case "$1" in
    -r) exec reboot ;;
    -H) exec halt ;;
    *) exec poweroff ;;
esac
SHUTDOWN
chmod 755 /sbin/shutdown
for port in /sys/class/virtio-ports/*; do
    [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
    qemu-ga -m virtio-serial -p "/dev/${port##*/}" -t /run -f /run/qemu-ga.pid -d \
        || echo "egpu-init: cannot start qemu-ga"
done

# Every /checks/NN-<name>.sh in order, or with egpu.checks=a,b only those (the host asks for the
# checks that fit the machine it built: no nvme check without the virtual eGPU). A requested
# check that does not exist fails.
run_checks() {
    wanted=",${EGPU_CHECKS:-},"
    check_timeout=${EGPU_CHECK_TIMEOUT:-60}
    case "$check_timeout" in ''|*[!0-9]*) check_timeout=60 ;; esac
    for script in /checks/*.sh; do
        [ -f "$script" ] || continue
        name=${script##*/}; name=${name%.sh}; name=${name#[0-9][0-9]-}
        if [ -n "$EGPU_CHECKS" ]; then
            case "$wanted" in
                *",$name,"*) wanted=${wanted//,$name,/,} ;;
                *) continue ;;
            esac
        fi
        # a hung check must not hang the VM (egpu.check_timeout=S overrides the default)
        out=$(timeout "$check_timeout" sh "$script" 2>&1)
        rc=$?
        echo "$out" > /dev/console
        if echo "$out" | grep -q '^CHECK '; then
            echo "$out" | grep '^CHECK '
        elif [ "$rc" = 143 ]; then
            echo "CHECK $name fail timed out after ${check_timeout}s"
        else
            echo "CHECK $name fail script exited with status $rc and reported nothing"
        fi
    done
    for name in $(echo "$wanted" | tr ',' ' '); do
        echo "CHECK $name fail no such check in this guest"
    done
}

# CHECK lines -> one JSON object (names are restricted; details are escaped)
to_json() {
    awk '
    function esc(s) {
        gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); gsub(/[\001-\037\177]/, " ", s)
        return s
    }
    $1 == "CHECK" && $2 ~ /^[A-Za-z0-9][A-Za-z0-9_.-]*$/ {
        ok = ($3 == "ok") ? "true" : "false"
        if (ok == "false") all = "false"
        detail = $0; sub(/^CHECK +[^ ]+ +[^ ]+ */, "", detail)
        items = items sep "{\"name\": \"" $2 "\", \"ok\": " ok ", \"detail\": \"" esc(detail) "\"}"
        sep = ", "; n++
        next
    }
    $1 == "CHECK" {
        # a check with an unusable name still counts, as a failure
        all = "false"
        items = items sep "{\"name\": \"malformed\", \"ok\": false, \"detail\": \"" esc($0) "\"}"
        sep = ", "; n++
    }
    BEGIN { all = "true"; sep = ""; n = 0 }
    END {
        if (n == 0) all = "false"
        printf "{\"ok\": %s, \"checks\": [%s]}\n", all, items
    }'
}

if [ "$EGPU_SELFTEST" = 1 ]; then
    printf '\n%s\n' "$READY_MARKER"
    load_later_modules
    result=$(run_checks | to_json)
    # keep kernel messages off the console while the result line goes out
    echo 1 > /proc/sys/kernel/printk
    printf '\n%s %s\n' "$SELFTEST_MARKER" "$result"
    # The line sits in the tty buffer until the UART takes it; power off only after that.
    # Setting any mode makes busybox stty call tcsetattr(TCSADRAIN), which waits for it.
    stty -F /dev/console opost
    sync
    poweroff -f
fi

# Power button -> clean poweroff. busybox acpid maps KEY_POWER from any /dev/input/event* to
# "PWRF" and runs /etc/acpi/PWRF/00000080; poweroff asks init (PID 1) to stop everything.
# acpid opens the event devices only as it starts, so the ready marker waits until it holds
# them: a host that sends system_powerdown right after the marker is never ignored.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\nexec poweroff\n' > /etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080
acpid -f -l /run/acpid.log &
acpid_pid=$!
if ls /dev/input/event* >/dev/null 2>&1; then
    tries=0
    until ls -l "/proc/$acpid_pid/fd" 2>/dev/null | grep -q /dev/input/event; do
        tries=$((tries + 1)); [ "$tries" -gt 50 ] && break
        usleep 100000
    done
fi
# (the marker goes on a line of its own even if something left the cursor mid-line)
printf '\n%s\n' "$READY_MARKER"
load_later_modules &

# busybox init as PID 1 from here: a respawning shell on the console, clean shutdown
cat > /etc/inittab <<'EOF'
::respawn:/bin/cttyhack /bin/sh -l
::shutdown:/bin/umount -a -r 2>/dev/null
EOF
exec /bin/busybox init
