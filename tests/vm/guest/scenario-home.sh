# Scenario a, home: putting /home on a cryptnbd volume, step by step, the way a user does it
# on a machine with the kernel's nbd module. The docs' guide follows these steps; keep the
# numbered steps and the commands in them as a user would type them.
#
# The daemon keeps its state in /run/cs/state and its sockets in /run/cs/run here (the VM's
# root is a RAM disk); cryptnbdctl finds them through CRYPTNBD_STATE_DIR and CRYPTNBD_SOCKET
# (exported by lib.sh). As root with the defaults neither is needed: /var/lib/cryptnbd and
# /run/cryptnbd.

. /cryptnbd-vm/lib.sh

on_fail() {
  show_daemon_state
}

SUMS=$VM_DIR/sums

step "1. start the daemon (the embedded local KMS is the default)"
start_daemon

step "2. create a master key in the local KMS"
must cryptnbdctl kms create-key --alias alias/home

step "3. create an encrypted 256 MiB volume for the user"
must cryptnbdctl create home --size 256M --kms-key alias/home \
  --sid S-1-5-21-1-2-3-1001 --directory d-1234567890
must cryptnbdctl list

step "4. attach it as the kernel block device /dev/nbd0"
capture cryptnbdctl attach home --device /dev/nbd0
grep -q '/dev/nbd0' "$VM_DIR/out" || fail "attach --device /dev/nbd0 did not print the device"
[ "$(dev_bytes /dev/nbd0)" = $((256 << 20)) ] ||
  fail "/dev/nbd0 has $(dev_bytes /dev/nbd0) bytes after attach, the volume has $((256 << 20))"
must cryptnbdctl status home

step "5. make a filesystem on it (the first time only)"
must mkfs.ext4 -q /dev/nbd0

step "6. mount it on /home and use it"
mkdir -p /home
must mount /dev/nbd0 /home
mkdir -p /home/alice
write_set /home/alice files "$SUMS"

step "7. unmount and detach (the key is wiped from the daemon's memory)"
must umount /home
must cryptnbdctl detach home
wait_until 10 "/dev/nbd0 disconnected by detach" dev_disconnected /dev/nbd0

step "8. next time: attach (letting cryptnbdctl pick a free device), mount, and the files are there"
capture cryptnbdctl attach home --device auto
DEV=$(grep -o '/dev/nbd[0-9][0-9]*' "$VM_DIR/out" | head -n 1)
[ -n "$DEV" ] || fail "attach --device auto did not print the device it picked"
log "  attached as $DEV"
[ "$(dev_bytes "$DEV")" = $((256 << 20)) ] || fail "$DEV has $(dev_bytes "$DEV") bytes after attach"
must mount "$DEV" /home
verify_set /home/alice "$SUMS"
must umount /home

step "9. check the filesystem"
must e2fsck -fn "$DEV"

step "10. detach"
must cryptnbdctl detach home
wait_until 10 "$DEV disconnected by detach" dev_disconnected "$DEV"
exit 0
