# Scenario b, host-tcp: the daemon runs on the HOST with a TCP listener; the guest's kernel
# NBD client reaches it through qemu's user networking (the host's 127.0.0.1:PORT is
# 10.0.2.2:PORT here) and puts ext4 on it.
#
# Parameters (kernel command line): cryptnbd.port (the daemon's TCP port on the host),
# cryptnbd.export (the export name), cryptnbd.blocksize (the volume's sector size),
# cryptnbd.size (the volume's size in bytes).
# Prints one `CRYPTNBD-VM: SUM <sha256> <file>` line per file written, for the host to
# check the same files through its own path to the daemon.

. /cryptnbd-vm/lib.sh

for _v in VM_PORT VM_EXPORT VM_BLOCKSIZE VM_SIZE; do
  eval "[ -n \"\${$_v:-}\" ]" || fail "the host did not pass $_v (cryptnbd.* on the kernel command line)"
done
DEV=/dev/nbd0
MNT=/mnt
SUMS=$VM_DIR/sums

on_fail() {
  show_kernel_state
}

connect() {
  must nbd-client 10.0.2.2 "$VM_PORT" -N "$VM_EXPORT" "$DEV" -b "$VM_BLOCKSIZE"
  [ "$(dev_bytes "$DEV")" = "$VM_SIZE" ] ||
    fail "$DEV has $(dev_bytes "$DEV") bytes after nbd-client, the volume has $VM_SIZE"
  _lbs=$(cat /sys/block/nbd0/queue/logical_block_size)
  [ "$_lbs" = "$VM_BLOCKSIZE" ] || fail "$DEV has $_lbs-byte logical blocks, expected $VM_BLOCKSIZE"
  log "  $DEV: $(dev_bytes "$DEV") bytes, $_lbs-byte blocks"
}

disconnect() {
  must nbd-client -d "$DEV"
  wait_until 10 "$DEV disconnected" dev_disconnected "$DEV"
}

step "connect to the export $VM_EXPORT on 10.0.2.2:$VM_PORT"
connect
step "mkfs.ext4, mount, write 32 MiB"
must mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV"
must mount -t ext4 "$DEV" "$MNT"
write_set "$MNT" data "$SUMS"
must umount "$MNT"
step "disconnect"
disconnect

step "connect again, mount, verify"
connect
must mount -t ext4 -o ro "$DEV" "$MNT"
verify_set "$MNT" "$SUMS"
must umount "$MNT"
step "e2fsck -fn"
must e2fsck -fn "$DEV"
disconnect

while read -r _sum _name; do
  echo "CRYPTNBD-VM: SUM $_sum $_name"
done <"$SUMS"
exit 0
