#!/bin/sh
# The dm-crypt round trip on a real kernel: the /init of a throw-away VM (Debian 12 kernel
# 6.1 under qemu TCG) that has dm-crypt, loop and ext4. Not run by `cargo test`: this host's
# kernel has no device-mapper. How it was run (docs/cli.md, "open"):
#
#   cp /work/shared/vmrig/build_vm_rig.sh /work/shared/vmrig/run_vm.sh .
#   # add `loop` to the module list; skip nbd-client when it is not installed
#   strip debug info into bins/: objcopy --strip-debug target/debug/cryptnbd{,ctl}
#   EXTRA_BINS="bins/cryptnbd bins/cryptnbdctl /usr/bin/nbdcopy" bash build_vm_rig.sh RIG
#   cp tests/vm/dmcrypt-guest.sh RIG/initramfs/init
#   (cd RIG/initramfs && find . | RIG/root/bin/busybox cpio -o -H newc | gzip -1) > RIG/initramfs.cpio.gz
#   RIG_DIR=RIG bash run_vm.sh local tcg     # exit 0 iff the guest printed NBD-TEST: SUCCESS
#
# It checks, with the real daemon, CLI and cryptsetup: open --dm-crypt (a wrong SID refused,
# exit 5), the mapping's device-mapper UUID and loop backing file as the daemon reads them,
# attach / delete / snapshot / a second open refused while mapped (exit 4), `list` showing
# it, ext4 written through /dev/mapper, close refused while mounted (cryptsetup exit 5 ->
# 4), close, a read-only mapping that refuses writes, then the same file read back through
# the daemon's NBD export (nbdcopy + loop mount, md5), open refused while attached, and the
# audit trail. Last run: 2026-11-23, all passed (about 40 s of guest time under TCG).
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
t() { echo "[guest $(cut -d' ' -f1 /proc/uptime)s] $*"; }
fail() { t "NBD-TEST: FAIL $*"; cat /tmp/d.log 2>/dev/null | tail -20; sync; poweroff -f; }
export DM_DISABLE_UDEV=1
for m in $(cat /lib/modules/ORDER); do insmod /lib/modules/$m.ko || t "insmod $m failed"; done
ip link set lo up
mkdir -p /tmp/s /tmp/r
printf 'state_dir = "/tmp/s"\nruntime_dir = "/tmp/r"\n' > /tmp/c.toml
cryptnbd --config /tmp/c.toml > /tmp/d.log 2>&1 &
C="cryptnbdctl --state-dir /tmp/s --socket /tmp/r/control.sock"
i=0; until $C status >/dev/null 2>&1; do sleep 0.2; i=$((i+1)); [ $i -gt 150 ] && fail "daemon did not start"; done
t "daemon up"
$C kms create-key --alias alias/k >/dev/null || fail create-key
$C create v --size 64M --kms-key alias/k --sid S-1-5-21-277731876-1789304096-451871588-1107 --directory d-1234abcd01 >/dev/null || fail create
$C open v --dm-crypt vdm --sid S-1-5-21-1-2-3-4; t "wrong sid rc=$?"
$C --json open v --dm-crypt vdm || fail "open --dm-crypt"
t "mapped: name $(cat /sys/block/dm-0/dm/name) uuid $(cat /sys/block/dm-0/dm/uuid) slaves $(ls /sys/block/dm-0/slaves) backing $(cat /sys/block/loop0/loop/backing_file)"
t "status: $(cryptsetup status vdm | tr -s ' \n' ' ')"
$C list
$C --json list | grep dm_crypt
$C attach v; rc=$?; t "attach while open rc=$rc"; [ $rc = 4 ] || fail "attach not refused"
$C delete v --yes; rc=$?; t "delete while open rc=$rc"; [ $rc = 4 ] || fail "delete not refused"
$C snapshot v; rc=$?; t "snapshot while open rc=$rc"; [ $rc = 4 ] || fail "snapshot not refused"
$C open v --dm-crypt vdm2; rc=$?; t "second open rc=$rc"; [ $rc = 4 ] || fail "second open not refused"
$C operations
mkfs.ext4 -q -F /dev/mapper/vdm || fail mkfs
mount /dev/mapper/vdm /mnt || fail mount
dd if=/dev/urandom of=/tmp/src bs=1M count=8 2>/dev/null
cp /tmp/src /mnt/data; umount /mnt || fail umount
mount /dev/mapper/vdm /mnt || fail mount2
$C close vdm; rc=$?; t "close while mounted rc=$rc"; [ $rc = 4 ] || fail "close of a mounted mapping not refused"
umount /mnt
$C --json close vdm || fail close
[ -e /dev/mapper/vdm ] && fail "still mapped"
t "closed; loop devices: $(ls /sys/block | grep loop | tr '\n' ' ')"
$C open v --dm-crypt vro --read-only || fail "open read-only"
t "read-only mapping ro=$(cat /sys/block/dm-*/ro | tr '\n' ' ')"
dd if=/dev/zero of=/dev/mapper/vro bs=4096 count=1 2>/dev/null && fail "wrote to a read-only mapping"
$C close vro || fail "close ro"
$C attach v --read-only || fail attach
nbdcopy "nbd+unix:///v?socket=/tmp/r/nbd.sock" /tmp/plain.img || fail nbdcopy
mount -o ro,loop /tmp/plain.img /mnt || fail "mount plain image"
A=$(md5sum < /tmp/src); B=$(md5sum < /mnt/data)
umount /mnt
[ "$A" = "$B" ] || fail "content mismatch between dm-crypt and cryptnbd"
t "file written through dm-crypt read back through cryptnbd NBD: md5 match"
$C open v --dm-crypt vdm; rc=$?; t "open while attached rc=$rc"; [ $rc = 4 ] || fail "open while attached not refused"
$C detach v || fail detach
$C audit
t "NBD-TEST: SUCCESS"
sync; poweroff -f
