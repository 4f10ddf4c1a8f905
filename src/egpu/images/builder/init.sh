#!/bin/sh
# /init of the image builder VM: the built-in guest's kernel and busybox, this script, and
# /etc/egpu/build.env (written by egpu/vm/image_build.py). Disks: vda the new image (raw),
# vdb the tools (a tar: sfdisk, mkfs, mtools, systemd-boot), vdc the first stage (a tar:
# the required packages unpacked, every .deb, the second stage). Every step prints
# "EGPU-BUILD-STEP <name>"; the end is "EGPU-BUILD-OK" or "EGPU-BUILD-FAIL <step>", then
# the VM powers off (QEMU exits).

/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=dumb MTOOLS_SKIP_CHECK=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
. /etc/egpu/build.env

STEP=start
step() { STEP=$1; printf '\nEGPU-BUILD-STEP %s\n' "$1"; }
finish() {
    sync
    # the line must leave the UART before the power goes (stty waits for the queue to drain)
    printf '\n%s\n' "$1"
    stty -F /dev/console opost 2>/dev/null
    poweroff -f
}
fail() { echo "egpu-build: $1"; finish "EGPU-BUILD-FAIL $STEP"; }

step modules
for list in /etc/egpu/modules /etc/egpu/modules.later; do
    while read -r group; do
        for mod in $group; do
            insmod "/lib/modules/$mod.ko" 2>/dev/null
        done
    done < "$list"
done

step tools
mkdir -p /tools
tar -x -f /dev/vdb -C /tools || fail "cannot unpack the tools"
mkdir -p /tools/dev /tools/proc /tools/sys /tools/target
mount -o bind /dev /tools/dev
mount -o bind /proc /tools/proc
T() { chroot /tools "$@"; }

step partition
printf 'label: gpt\nsize=%sMiB, type=uefi, name=ESP\ntype=linux, name=root\n' "$ESP_MIB" |
    T sfdisk -q /dev/vda || fail "sfdisk failed"
tries=0
until [ -b /dev/vda2 ]; do
    tries=$((tries + 1)); [ "$tries" -gt 100 ] && fail "no /dev/vda2 after partitioning"
    usleep 100000
done

step mkfs
T mkfs.vfat -F 32 -i "$ESP_SERIAL" -n ESP /dev/vda1 >/dev/null || fail "mkfs.vfat failed"
T mkfs.ext4 -q -F -L root -U "$ROOT_UUID" /dev/vda2 || fail "mkfs.ext4 failed"
mkdir -p /target
mount -t ext4 /dev/vda2 /target || fail "cannot mount the new root"

step unpack
tar -x -f /dev/vdc -C /target || fail "cannot unpack the first stage"
[ -e /target/usr/bin/sh ] || ln -s dash /target/usr/bin/sh
for d in dev proc sys; do mkdir -p "/target/$d"; mount -o bind "/$d" "/target/$d"; done
mount -t devpts devpts /target/dev/pts 2>/dev/null

step install
chroot /target /usr/bin/sh /egpu/stage2.sh || fail "the second stage failed"

step esp
mount -o bind /target /tools/target
M() { T "$@" -i /dev/vda1; }
M mmd ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries || fail "mmd failed"
M mcopy "/target/boot/vmlinuz-$KERNEL_VERSION" ::/vmlinuz || fail "cannot copy the kernel"
M mcopy "/target/boot/initrd.img-$KERNEL_VERSION" ::/initrd.img || fail "cannot copy the initrd"
M mcopy "/$LOADER_SOURCE" "::/$LOADER_PATH" || fail "cannot copy the boot loader"
M mcopy /target/egpu/loader.conf ::/loader/loader.conf || fail "cannot write loader.conf"
M mcopy /target/egpu/entry.conf ::/loader/entries/egpu.conf || fail "cannot write the entry"
umount /tools/target

step finish
rm -rf /target/egpu
umount /target/dev/pts 2>/dev/null
for d in dev proc sys; do umount "/target/$d"; done
umount /target || fail "cannot unmount the new root"
T e2fsck -f -p /dev/vda2 >/dev/null
[ $? -le 1 ] || fail "e2fsck found errors"
finish EGPU-BUILD-OK
