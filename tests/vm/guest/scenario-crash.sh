# Scenario d, crash: the daemon dies (kill -9) under a mounted ext4 with a writer busy on it.
#  1. restarted within --dead-conn-timeout, it re-attaches the volume and reconnects
#     /dev/nbd0 by itself: the writer sees no error at all;
#  2. not restarted, the writer gets I/O errors once the timeout has passed, and nothing
#     hangs;
#  3. restarted after that, the filesystem is repaired like after a power cut and every
#     file whose fsync succeeded is intact;
#  4. detach --force frees a mounted device at once; 5. a device with two connections;
#  6. the daemon stalled past --io-timeout: the kernel drops the connection, the running
#     daemon replaces it, and the writer sees no error.
# Every wait is bounded.

. /cryptnbd-vm/lib.sh

TIMEOUT=15
MNT=/mnt
WLOG=$VM_DIR/writer.log
STOP=$VM_DIR/stop-writer
BASE_SUMS=$VM_DIR/sums-base
FSYNCED=$VM_DIR/sums-fsynced
WPID=

on_fail() {
  show_daemon_state
  log "---- writer log (last 15 lines)"
  tail -n 15 "$WLOG" 2>/dev/null | prefix_lines
  [ -n "$WPID" ] && log "  writer pid $WPID: $(cat /proc/"$WPID"/stat 2>/dev/null | cut -d' ' -f3) (state)"
}

# The writer: 256 KiB files, each written with conv=fsync; one log line per file:
#   OK N SHA256 START END      (the fsync succeeded: the file must survive anything)
#   ERR N START END MESSAGE
writer() {
  _n=0
  while [ ! -e "$STOP" ]; do
    _n=$((_n + 1))
    dd if=/dev/urandom of="$VM_DIR/src" bs=65536 count=4 iflag=fullblock 2>/dev/null
    _sum=$(sha256sum <"$VM_DIR/src" | cut -d' ' -f1)
    _start=$(uptime_s)
    if _err=$(dd if="$VM_DIR/src" of="$MNT/w/f$_n" bs=65536 conv=fsync 2>&1); then
      echo "OK $_n $_sum $_start $(uptime_s)" >>"$WLOG"
    else
      echo "ERR $_n $_start $(uptime_s) $(echo "$_err" | tr '\n' ' ')" >>"$WLOG"
      sleep 0.5
    fi
  done
  echo "END $_n" >>"$WLOG"
}

oks() { grep -c '^OK ' "$WLOG"; }
# The OK lines of fsyncs that returned between uptimes FROM + 0.5 s and TO.
acked_between() {
  awk -v f="$1" -v t="$2" '$1 == "OK" && $5 > f + 0.5 && $5 < t' "$WLOG" | tr '\n' ' '
}
errs() { grep -c '^ERR ' "$WLOG"; }
more_oks_than() { [ "$(oks)" -gt "$1" ]; }
more_errs_than() { [ "$(errs)" -gt "$1" ]; }
has_err() { grep -q '^ERR ' "$WLOG"; }
writer_ended() { grep -q '^END ' "$WLOG"; }
nbd0_usable() {
  [ "$(dev_bytes /dev/nbd0)" = $((256 << 20)) ] &&
    bounded 10 dd if=/dev/nbd0 of=/dev/null bs=4096 count=16 iflag=direct >/dev/null 2>&1
}

step "daemon, key, volume; attach with --dead-conn-timeout $TIMEOUT"
start_daemon
# As root in the guest it has CAP_SYS_RESOURCE: it must have marked itself an I/O flusher.
grep -q 'running as an I/O flusher' "$CS_LOG" ||
  fail "the daemon did not set PR_SET_IO_FLUSHER (no 'running as an I/O flusher' in its log)"
must cryptnbdctl kms create-key --alias alias/home
must cryptnbdctl create home --size 256M --kms-key alias/home \
  --sid S-1-5-21-1-2-3-1001 --directory d-1234567890
must cryptnbdctl attach home --device /dev/nbd0 --dead-conn-timeout "$TIMEOUT"
[ "$(dev_bytes /dev/nbd0)" = $((256 << 20)) ] || fail "/dev/nbd0 has $(dev_bytes /dev/nbd0) bytes after attach"
must mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/nbd0
must mount /dev/nbd0 "$MNT"
mkdir -p "$MNT/base" "$MNT/w"
for _i in 1 2 3 4; do
  write_file "$MNT/base" "base-$_i" 2097152 "$BASE_SUMS"
done
must bounded 60 sync

step "start the writer"
: >"$WLOG"
writer &
WPID=$!
wait_until 60 "the writer has fsynced 5 files" more_oks_than 4

step "1. kill -9 the daemon and restart it within the timeout"
kill_daemon
KILLED=$(uptime_s)
sleep 2
RESTARTED=$(uptime_s)
start_daemon
BACK=$(since "$KILLED")
[ "$BACK" -lt $((TIMEOUT - 2)) ] ||
  fail "the daemon took $BACK s to come back, too close to the $TIMEOUT s timeout for this test to mean anything"
log "  the daemon is back $BACK s after the kill; the writer had fsynced $(oks) files"
_before=$(oks)
wait_until 60 "the writer goes on (3 more fsynced files) without a new attach" more_oks_than $((_before + 2))
if has_err; then
  fail "the writer saw I/O errors although the daemon came back within the timeout: $(grep '^ERR ' "$WLOG" | head -n 3 | tr '\n' ' ')"
fi
# No fsync can succeed while no daemon runs (0.5 s of slack for the writer's own clock).
_acked=$(acked_between "$KILLED" "$RESTARTED")
[ -z "$_acked" ] || fail "fsync succeeded while the daemon was dead: $_acked"
log "  killed at $KILLED s, restarted at $RESTARTED s; the fsyncs around (file, start, end):"
awk -v k="$KILLED" '$1 == "OK" && $5 < k {last = "f" $2 " " $4 " " $5}
  $1 == "OK" && $5 >= k && n++ < 3 {after = after "\n" "f" $2 " " $4 " " $5}
  END {print "last before the kill: " last; print "then:" after}' "$WLOG" | prefix_lines
must cryptnbdctl status home
nbd0_usable || fail "/dev/nbd0 is not usable after the daemon came back"
log "  no error; $(oks) files fsynced so far"

step "2. kill -9 the daemon and leave it dead: I/O errors after $TIMEOUT s, no hang"
kill_daemon
KILLED=$(uptime_s)
wait_until $((TIMEOUT + 45)) "the writer got an I/O error" has_err
_first_err_end=$(grep '^ERR ' "$WLOG" | head -n 1 | cut -d' ' -f4)
_delay=$(awk -v e="$_first_err_end" -v k="$KILLED" 'BEGIN {printf "%d", e - k}')
log "  first error $_delay s after the kill: $(grep '^ERR ' "$WLOG" | head -n 1)"
[ "$_delay" -ge $((TIMEOUT - 3)) ] ||
  fail "the first I/O error came $_delay s after the kill, before the $TIMEOUT s dead-connection timeout"
_errs=$(errs)
wait_until 30 "the writer keeps going (errors come back, no hang)" more_errs_than "$_errs"
touch "$STOP"
wait_until 30 "the writer stopped" writer_ended
_acked=$(acked_between "$KILLED" 999999)
[ -z "$_acked" ] || fail "fsync succeeded after the daemon was killed for good: $_acked"
wait "$WPID"
WPID=
grep '^OK ' "$WLOG" | awk '{print $3 "  f" $2}' >"$FSYNCED"
log "  $(wc -l <"$FSYNCED") files were fsynced before the crash"

step "3. restart the daemon, unmount, repair, and check every fsynced file"
start_daemon
if ! run bounded 60 umount "$MNT"; then
  must bounded 30 umount -l "$MNT"
fi
is_mounted /dev/nbd0 && fail "/dev/nbd0 is still mounted after umount"
_t0=$(uptime_s)
while ! nbd0_usable && [ "$(since "$_t0")" -lt 30 ]; do
  sleep 0.5
done
if nbd0_usable; then
  log "  the daemon brought /dev/nbd0 back by itself"
else
  log "  /dev/nbd0 is not back 30 s after the restart: attaching it again"
  run cryptnbdctl detach home
  must cryptnbdctl attach home --device /dev/nbd0
  nbd0_usable || fail "/dev/nbd0 is not usable after attach"
fi
run bounded 120 e2fsck -fy /dev/nbd0
[ "$_rc" -lt 4 ] || fail "e2fsck -fy could not repair the filesystem (exit $_rc)"
log "  e2fsck -fy exit $_rc (0: clean, 1: repaired, as after a power cut)"
must bounded 120 e2fsck -fn /dev/nbd0
must mount /dev/nbd0 "$MNT"
verify_set "$MNT/base" "$BASE_SUMS"
verify_set "$MNT/w" "$FSYNCED"

step "4. detach is refused while mounted; detach --force frees the mounted device at once"
refused 4 cryptnbdctl detach home
must bounded 60 cryptnbdctl detach home --force
if bounded 30 dd if=/dev/zero of="$MNT/after-force" bs=65536 count=4 conv=fsync; then
  fail "a write was fsynced on /dev/nbd0 after detach --force"
fi
log "  the mounted filesystem gets I/O errors, nothing hangs"
if ! run bounded 60 umount "$MNT"; then
  must bounded 30 umount -l "$MNT"
fi
# The kernel keeps the dead configuration while the filesystem holds the device open.
wait_until 10 "/dev/nbd0 released once unmounted" dev_disconnected /dev/nbd0

step "5. two connections: the kernel spreads its queues over both"
must cryptnbdctl attach home --device /dev/nbd0 --connections 2
capture cryptnbdctl status home
_kconns=$(grep -c 'from kernel /dev/nbd0 connection' "$VM_DIR/out")
[ "$_kconns" = 2 ] || fail "status shows $_kconns kernel connections, not 2"
run bounded 120 e2fsck -fy /dev/nbd0
[ "$_rc" -lt 4 ] || fail "e2fsck -fy after detach --force: exit $_rc"
must mount /dev/nbd0 "$MNT"
verify_set "$MNT/base" "$BASE_SUMS"
verify_set "$MNT/w" "$FSYNCED"
must umount "$MNT"
must cryptnbdctl detach home
wait_until 10 "/dev/nbd0 disconnected by detach" dev_disconnected /dev/nbd0

step "6. the daemon stalls past --io-timeout: the kernel drops the connection, the daemon replaces it"
must cryptnbdctl attach home --device /dev/nbd0 --io-timeout 2 --dead-conn-timeout 30
must mount /dev/nbd0 "$MNT"
rm -f "$STOP"
: >"$WLOG"
writer &
WPID=$!
wait_until 60 "the writer has fsynced 3 files" more_oks_than 2
log "+ kill -STOP $DAEMON_PID; sleep 6; kill -CONT $DAEMON_PID (cryptnbd stalls for 6 s)"
kill -STOP "$DAEMON_PID"
sleep 6
kill -CONT "$DAEMON_PID"
_before=$(oks)
wait_until 60 "the writer goes on (3 more fsynced files)" more_oks_than $((_before + 2))
touch "$STOP"
wait_until 30 "the writer stopped" writer_ended
wait "$WPID"
WPID=
if has_err; then
  fail "the writer saw I/O errors across the stall: $(grep '^ERR ' "$WLOG" | head -n 3 | tr '\n' ' ')"
fi
capture cryptnbdctl status home
grep -q 'dead connection(s) replaced' "$VM_DIR/out" ||
  fail "status does not show the connection the daemon replaced"
must umount "$MNT"
must cryptnbdctl detach home
exit 0
