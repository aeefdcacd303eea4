# Scenario f, host-tls: the daemon runs on the HOST with a TCP listener that requires TLS;
# the guest's kernel NBD client (nbd-client with GnuTLS: -cacertfile/-certfile/-keyfile; 3.24
# has no short -F) reaches it at 10.0.2.2
# and puts ext4 on it. Then a certificate that is not on the export's allow-list is refused
# by policy.
#
# Parameters: cryptnbd.port, cryptnbd.export, cryptnbd.blocksize, cryptnbd.size (as in
# host-tcp). Files (/cryptnbd-vm/files): ca-cert.pem, the allowed client's
# guest-cert.pem/guest-key.pem and the other client's other-cert.pem/other-key.pem.
# Prints `CRYPTNBD-VM: REFUSAL <nbd-client's message>` for the host to check.

. /cryptnbd-vm/lib.sh

for _v in VM_PORT VM_EXPORT VM_BLOCKSIZE VM_SIZE; do
  eval "[ -n \"\${$_v:-}\" ]" || fail "the host did not pass $_v (cryptnbd.* on the kernel command line)"
done
DEV=/dev/nbd0
MNT=/mnt
SUMS=$VM_DIR/sums
PKI=/cryptnbd-vm/files

on_fail() {
  show_kernel_state
}

# connect NAME: nbd-client over TLS with the certificate NAME-cert.pem.
connect() {
  must nbd-client 10.0.2.2 "$VM_PORT" "$DEV" -N "$VM_EXPORT" -b "$VM_BLOCKSIZE" \
    -cacertfile "$PKI/ca-cert.pem" -certfile "$PKI/$1-cert.pem" -keyfile "$PKI/$1-key.pem"
  [ "$(dev_bytes "$DEV")" = "$VM_SIZE" ] ||
    fail "$DEV has $(dev_bytes "$DEV") bytes after nbd-client, the volume has $VM_SIZE"
  log "  $DEV: $(dev_bytes "$DEV") bytes over TLS"
}

disconnect() {
  must nbd-client -d "$DEV"
  wait_until 10 "$DEV disconnected" dev_disconnected "$DEV"
}

step "connect over TLS to $VM_EXPORT on 10.0.2.2:$VM_PORT"
connect guest
step "mkfs.ext4, mount, write 32 MiB"
must mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV"
must mount -t ext4 "$DEV" "$MNT"
write_set "$MNT" data "$SUMS"
must umount "$MNT"
disconnect

step "connect again over TLS, verify, e2fsck"
connect guest
must mount -t ext4 -o ro "$DEV" "$MNT"
verify_set "$MNT" "$SUMS"
must umount "$MNT"
must e2fsck -fn "$DEV"
disconnect

step "a certificate not on the allow-list is refused"
log "+ nbd-client ... -certfile $PKI/other-cert.pem"
if nbd-client 10.0.2.2 "$VM_PORT" "$DEV" -N "$VM_EXPORT" -b "$VM_BLOCKSIZE" \
  -cacertfile "$PKI/ca-cert.pem" -certfile "$PKI/other-cert.pem" -keyfile "$PKI/other-key.pem" >"$VM_DIR/out" 2>&1; then
  fail "nbd-client connected with a certificate that is not on the allow-list"
fi
prefix_lines <"$VM_DIR/out"
dev_disconnected "$DEV" || fail "$DEV is connected after the refusal"
echo "CRYPTNBD-VM: REFUSAL $(tr '\n' ' ' <"$VM_DIR/out")"
exit 0
