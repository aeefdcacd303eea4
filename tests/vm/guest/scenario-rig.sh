# Scenario rig: checks the VM itself, without cryptnbd doing anything, so that a failure of
# the other scenarios is not the rig's: the kernel NBD client is there, our binaries start
# (every library they need is in the initramfs), and loop + dm-crypt (aes-xts-plain64 with
# AES-NI) + ext4 work, driven by cryptsetup like `cryptnbdctl open` will.

. /cryptnbd-vm/lib.sh

on_fail() {
  show_kernel_state
}

step "the kernel NBD client and device-mapper"
[ -b /dev/nbd0 ] || fail "/dev/nbd0 does not exist (is nbd.ko loaded?)"
[ -c /dev/mapper/control ] || fail "/dev/mapper/control does not exist (is dm_mod loaded?)"
grep -q 'xts(aes)' /proc/crypto || log "  (xts(aes) not instantiated yet; dm-crypt asks for it)"

step "our binaries run in the guest"
must cryptnbd --version
must cryptnbdctl --version

step "loop + dm-crypt aes-xts-plain64 + ext4"
must dd if=/dev/zero of=/run/disk bs=1M count=0 seek=64
LOOP=$(losetup --find --show /run/disk) || fail "losetup --find --show /run/disk"
log "  $LOOP"
dd if=/dev/urandom of=/run/key bs=64 count=1 2>/dev/null
must cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \
  --key-file /run/key "$LOOP" rigtest
[ -b /dev/mapper/rigtest ] || fail "/dev/mapper/rigtest was not made (DM_DISABLE_UDEV=$DM_DISABLE_UDEV)"
must cryptsetup status rigtest
grep -q '^driver *: *.*aesni' /proc/crypto ||
  log "  note: no AES-NI driver listed in /proc/crypto; dm-crypt uses the generic AES"
must mkfs.ext4 -q /dev/mapper/rigtest
must mount /dev/mapper/rigtest /mnt
write_file /mnt f 8388608 "$VM_DIR/sums"
must umount /mnt
must cryptsetup close rigtest
must cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \
  --key-file /run/key "$LOOP" rigtest
must mount -o ro /dev/mapper/rigtest /mnt
verify_set /mnt "$VM_DIR/sums"
must umount /mnt
must cryptsetup close rigtest
must losetup -d "$LOOP"
# What is on the loop file is ciphertext: no filesystem without the key.
if e2fsck -fn /run/disk >/dev/null 2>&1; then
  fail "e2fsck finds a filesystem in the encrypted image: dm-crypt did not encrypt"
fi
exit 0
