#!/bin/sh
# The second stage, run in the new root's chroot by the builder: install every package with
# dpkg in debootstrap's order (scripts/debian-common, second_stage_install), then configure
# the image for its first boot. Inputs: /egpu/build.env, /egpu/debs/, /egpu/required.list and
# /egpu/base.list (file names, one a line), /egpu/extra-steps.sh (optional).
set -e
. /egpu/build.env
export DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true LC_ALL=C LANG=C
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
D=/egpu/debs
step() { printf '\nEGPU-BUILD-STEP %s\n' "$1"; }
deb() { for p in "$@"; do ls "$D/${p}"_*.deb; done; }
files() { sed "s|^|$D/|" "$1"; }
# unsafe-io: no fsync per file (a failed build is thrown away whole anyway)
dpkg() { command dpkg --force-unsafe-io "$@" </dev/null; }
core() { dpkg --force-depends --install $(deb "$@"); }

step dpkg-core
mkdir -p /var/lib/dpkg/info /var/lib/dpkg/updates /var/lib/dpkg/triggers /var/lib/dpkg/alternatives
: > /var/lib/dpkg/status
: > /var/lib/dpkg/available
ln -sf mawk /usr/bin/awk
[ -e /etc/localtime ] || ln -sf /usr/share/zoneinfo/UTC /etc/localtime
printf 'Package: dpkg\nVersion: %s\nMaintainer: unknown\nStatus: install ok installed\n\n' \
    "$DPKG_VERSION" > /var/lib/dpkg/status
core base-passwd
core base-files
core dpkg
core libc6
core perl-base
rm -f /usr/bin/awk
core mawk
core debconf

# no daemon starts in the chroot
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
mv /usr/sbin/start-stop-daemon /usr/sbin/start-stop-daemon.REAL
printf '#!/bin/sh\necho "start-stop-daemon: not in the image builder" >&2\nexit 0\n' \
    > /usr/sbin/start-stop-daemon
chmod 755 /usr/sbin/start-stop-daemon

step dpkg-required
dpkg --force-depends --unpack $(files /egpu/required.list)
dpkg --configure --pending --force-configure-any --force-depends

step dpkg-base
# Pre-dependencies inside this set are only unpacked, not configured, when the next package
# arrives: forced, as for the required set, then everything is configured in dependency order.
dpkg --force-overwrite --force-confold --skip-same-version --force-depends \
    --unpack $(files /egpu/base.list)
dpkg --force-confold --skip-same-version --configure -a
if [ -n "$(dpkg --audit)" ]; then
    dpkg --audit
    exit 1
fi

step kernel
[ -e "/boot/initrd.img-$KERNEL_VERSION" ] || update-initramfs -c -k "$KERNEL_VERSION"
if [ -e /egpu/extra-steps.sh ]; then
    step extras
    sh -e /egpu/extra-steps.sh
fi

step configure
printf 'UUID=%s / ext4 errors=remount-ro 0 1\nUUID=%s /boot/efi vfat umask=0077 0 1\n' \
    "$ROOT_UUID" "$ESP_FS_UUID" > /etc/fstab
mkdir -p /boot/efi
echo "$HOSTNAME" > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost ip6-localhost ip6-loopback\n' \
    "$HOSTNAME" > /etc/hosts
mkdir -p /etc/systemd/network
cp /egpu/dhcp.network /etc/systemd/network/80-egpu-dhcp.network
cp /egpu/ssh-host-keys.service /etc/systemd/system/egpu-ssh-host-keys.service
systemctl enable systemd-networkd.service egpu-ssh-host-keys.service >/dev/null 2>&1

step clean
rm -f /usr/sbin/policy-rc.d
mv /usr/sbin/start-stop-daemon.REAL /usr/sbin/start-stop-daemon
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed
rm -rf /var/cache/apt/archives/*.deb /var/cache/apt/*.bin /var/lib/apt/lists/* /tmp/* 
dpkg-query -W -f='EGPU-BUILD-PACKAGE ${Package} ${Version}\n'
