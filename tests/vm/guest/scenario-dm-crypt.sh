# Scenario c, dm-crypt: the same volume through cryptnbd (kernel NBD client) and through the
# kernel's own dm-crypt (`cryptnbdctl open` maps it with cryptsetup and the key the KMS
# unwraps), each reading what the other wrote; the two are never active at once, and a
# device or mapping in use is not pulled from under its filesystem (refusals: exit 4,
# docs/cli.md).

. /cryptnbd-vm/lib.sh

on_fail() {
  show_daemon_state
  log "---- device-mapper tables (keys left out); losetup -a"
  dm_tables | prefix_lines
  losetup -a 2>&1 | prefix_lines
}

MNT=/mnt
SUMS1=$VM_DIR/sums-nbd
SUMS2=$VM_DIR/sums-dm
MAPPER=/dev/mapper/home-dm

# `dmsetup table` without its key field (the 5th of a crypt line): keys never reach the log.
dm_tables() {
  dmsetup table 2>&1 | awk '$4 == "crypt" {$6 = "<key>"} {print}'
}

attach_nbd0() {
  must cryptnbdctl attach home --device /dev/nbd0
  [ "$(dev_bytes /dev/nbd0)" = $((256 << 20)) ] ||
    fail "/dev/nbd0 has $(dev_bytes /dev/nbd0) bytes after attach"
}

detach_nbd0() {
  must cryptnbdctl detach home
  wait_until 10 "/dev/nbd0 disconnected" dev_disconnected /dev/nbd0
}

# No loop device may still hold the volume file once the mapping is closed.
no_loop_on_volume() {
  ! losetup -a 2>/dev/null | grep -q 'home\.luks'
}

step "daemon, key, volume"
start_daemon
must cryptnbdctl kms create-key --alias alias/home
must cryptnbdctl create home --size 256M --kms-key alias/home \
  --sid S-1-5-21-1-2-3-1001 --directory d-1234567890

step "through cryptnbd: mkfs.ext4, write 32 MiB"
attach_nbd0
must mkfs.ext4 -q /dev/nbd0
must mount /dev/nbd0 "$MNT"
write_set "$MNT" nbd "$SUMS1"
step "detach is refused while the filesystem is mounted"
refused 4 cryptnbdctl detach home
[ "$(dev_bytes /dev/nbd0)" = $((256 << 20)) ] || fail "/dev/nbd0 lost its volume after a refused detach"
must umount "$MNT"

step "open is refused while the volume is attached"
refused 4 cryptnbdctl open home --dm-crypt home-dm
[ ! -e "$MAPPER" ] || fail "$MAPPER exists after a refused open"
detach_nbd0

step "through dm-crypt: open, read what cryptnbd wrote, write 32 MiB more"
must cryptnbdctl open home --dm-crypt home-dm
[ -b "$MAPPER" ] || fail "$MAPPER is not a block device after open"
dm_tables | prefix_lines
dm_tables | grep -q '^home-dm: .* crypt aes-xts-plain64 ' ||
  fail "home-dm is not an aes-xts-plain64 dm-crypt mapping: $(dm_tables)"
must cryptsetup status home-dm
[ "$(blockdev --getsize64 "$MAPPER")" = $((256 << 20)) ] ||
  fail "$MAPPER has $(blockdev --getsize64 "$MAPPER") bytes, the volume has $((256 << 20))"
must mount "$MAPPER" "$MNT"
verify_set "$MNT" "$SUMS1"
write_set "$MNT" dm "$SUMS2"
step "close is refused while the mapping is mounted"
refused 4 cryptnbdctl close home-dm
[ -b "$MAPPER" ] || fail "$MAPPER is gone after a refused close"
must umount "$MNT"

step "attach --device is refused while the volume is open with dm-crypt"
refused 4 cryptnbdctl attach home --device /dev/nbd0
[ "$(dev_bytes /dev/nbd0)" = 0 ] || fail "/dev/nbd0 is connected after a refused attach"

step "close"
must cryptnbdctl close home-dm
[ ! -e "$MAPPER" ] || fail "$MAPPER still exists after close"
wait_until 10 "no loop device left on the volume file" no_loop_on_volume

step "a read-only mapping reads everything and refuses writes"
must cryptnbdctl open home --dm-crypt home-ro --read-only
[ "$(blockdev --getro /dev/mapper/home-ro)" = 1 ] || fail "/dev/mapper/home-ro is not read-only"
if dd if=/dev/zero of=/dev/mapper/home-ro bs=4096 count=1 conv=fsync 2>/dev/null; then
  fail "a write to the read-only mapping succeeded"
fi
must mount -o ro /dev/mapper/home-ro "$MNT"
verify_set "$MNT" "$SUMS1"
verify_set "$MNT" "$SUMS2"
must umount "$MNT"
must cryptnbdctl close home-ro
wait_until 10 "no loop device left on the volume file" no_loop_on_volume

step "through cryptnbd again: everything written by both is there"
attach_nbd0
must mount /dev/nbd0 "$MNT"
verify_set "$MNT" "$SUMS1"
verify_set "$MNT" "$SUMS2"
must umount "$MNT"
must e2fsck -fn /dev/nbd0
detach_nbd0
exit 0
