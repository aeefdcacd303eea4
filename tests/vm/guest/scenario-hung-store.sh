# Scenario e, hung store: the filesystem holding the volume file is frozen (fsfreeze) under
# a writer on /dev/nbd0, so the daemon's writes to the volume file hang in the kernel.
#  1. `detach --force` answers within a bounded time and lets /dev/nbd0 go: the writer gets
#     I/O errors at once; the answer says the key stays in memory until the stuck requests
#     return;
#  2. meanwhile `status` lists the volume as detaching, and attach and open are refused;
#  3. the filesystem thaws: the stuck requests return, the volume is flushed, its key wiped
#     (audited as detach-finished), and it attaches again with the data written before.
# Every wait is bounded.

. /cryptnbd-vm/lib.sh

VOLS=$CS_STATE/volumes
STORE_IMG=/run/store.img
KNOWN=$VM_DIR/known
DDPID=

on_fail() {
  fsfreeze --unfreeze "$VOLS" 2>/dev/null
  show_daemon_state
  log "---- the hung writer's output"
  prefix_lines <"$VM_DIR/hung-dd.out" 2>/dev/null
}

writer_gone() { ! alive "$DDPID"; }
not_detaching() {
  cryptnbdctl status >"$VM_DIR/st" 2>&1 && ! grep -q 'detaching' "$VM_DIR/st"
}

step "the volumes directory on a filesystem of its own, which the test can freeze"
must dd if=/dev/zero of="$STORE_IMG" bs=1048576 count=0 seek=300
LOOP=$(losetup -f --show "$STORE_IMG") || fail "losetup of $STORE_IMG"
must mke2fs -q -t ext4 "$LOOP"
mkdir -p "$VOLS"
must mount "$LOOP" "$VOLS"
chmod 700 "$VOLS"

step "daemon, key, volume; attach to /dev/nbd0 and write 4 MiB"
start_daemon
must cryptnbdctl kms create-key --alias alias/hung
must cryptnbdctl create vol --size 64M --kms-key alias/hung \
  --sid S-1-5-21-1-2-3-1001 --directory d-1234567890
must cryptnbdctl attach vol --device /dev/nbd0
[ "$(dev_bytes /dev/nbd0)" = $((64 << 20)) ] || fail "/dev/nbd0 has $(dev_bytes /dev/nbd0) bytes after attach"
must dd if=/dev/urandom of="$KNOWN" bs=1048576 count=4
must dd if="$KNOWN" of=/dev/nbd0 bs=1048576 oflag=direct conv=fsync

step "1. freeze the store under a writer, then detach --force"
must fsfreeze --freeze "$VOLS"
dd if=/dev/urandom of=/dev/nbd0 bs=65536 count=64 seek=128 oflag=direct >"$VM_DIR/hung-dd.out" 2>&1 &
DDPID=$!
sleep 2
alive "$DDPID" || fail "the writer finished although the volume's filesystem is frozen: $(cat "$VM_DIR/hung-dd.out")"
log "  the writer hangs (pid $DDPID): the daemon's writes wait for the frozen filesystem"
_t0=$(uptime_s)
capture bounded 30 cryptnbdctl detach vol --force
_took=$(since "$_t0")
log "  detach --force answered after $_took s"
[ "$_took" -le 15 ] || fail "detach --force took $_took s with a hung store"
grep -q 'not finished' "$VM_DIR/out" || fail "detach --force did not say that the detach is not finished"
grep -q 'stuck in the backing store' "$VM_DIR/out" || fail "detach --force did not say what is stuck"
wait_until 10 "/dev/nbd0 is disconnected" dev_disconnected /dev/nbd0
wait_until 20 "the writer ended" writer_gone
wait "$DDPID"
_rc=$?
DDPID=
prefix_lines <"$VM_DIR/hung-dd.out"
[ "$_rc" != 0 ] || fail "the writer succeeded although its device was let go under it"
log "  the writer failed (exit $_rc), as it must"

step "2. while the requests are stuck: status shows it, attach and open are refused"
capture cryptnbdctl status
grep -q '^vol: detaching since' "$VM_DIR/out" || fail "status does not list vol as detaching"
capture cryptnbdctl --json status
grep -q '"detaching"' "$VM_DIR/out" || fail "status --json has no detaching list"
refused 4 cryptnbdctl attach vol --device /dev/nbd0
refused 4 cryptnbdctl open vol --dm-crypt hungvol
capture cryptnbdctl audit --volume vol
grep -q 'stuck in the backing store' "$VM_DIR/out" || fail "the audit trail does not record the unfinished detach"

step "3. thaw: the stuck requests return, the key is wiped, the volume attaches again"
must fsfreeze --unfreeze "$VOLS"
wait_until 20 "the detach finished (status no longer lists vol)" not_detaching
grep -q 'the stuck requests returned; flushed, detached, key wiped' "$CS_LOG" ||
  fail "the daemon's log does not say the detach finished"
capture cryptnbdctl audit --volume vol --limit 1
grep -q 'detach-finished .* ok ' "$VM_DIR/out" || fail "no successful detach-finished record in the audit trail"
must cryptnbdctl attach vol --device /dev/nbd0
must dd if=/dev/nbd0 of="$VM_DIR/back" bs=1048576 count=4 iflag=direct
cmp "$KNOWN" "$VM_DIR/back" || fail "the 4 MiB written before the freeze read back different"
log "  the 4 MiB written before the freeze are intact"
must cryptnbdctl detach vol
must umount "$VOLS"
must losetup -d "$LOOP"
exit 0
