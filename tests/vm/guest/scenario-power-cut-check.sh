# shellcheck shell=sh
# Scenario g, power cut, boot 2 of 2: after the power cut, every acknowledged record is there.
#
# The same disk as scenario-power-cut-write.sh, after qemu was killed under it. Mounting
# /dev/vda replays ext4's journal; the daemon starts on the state found there and re-attaches
# the volume to /dev/nbd0 by itself, as it does at a host's boot (or, failing that, it is
# attached by hand: a volume that does not attach fails the scenario). Then records
# 0..VM_ACKED (the highest `ACK N` the host saw on boot 1's console) are read back with
# O_DIRECT and compared with what boot VM_BOOT wrote. Reports on the console:
#   CRYPTNBD-VM: ATTACH restored|by-hand
#   CRYPTNBD-VM: CHECKED COUNT          the records compared (0..VM_ACKED)
#   CRYPTNBD-VM: LOST COUNT [R...]      those that differ (the first 20 numbers)
#   CRYPTNBD-VM: BEYOND COUNT           records after VM_ACKED that made it anyway (the
#                                       round in flight at the cut; decides nothing)
# and fails when any acknowledged record is lost. Then the volume is detached, the daemon
# stopped and the disk's filesystem checked with e2fsck -fn.

# shellcheck source=tests/vm/guest/lib.sh
. /cryptnbd-vm/lib.sh
# shellcheck source=tests/vm/guest/power-cut.sh
. /cryptnbd-vm/power-cut.sh

# shellcheck disable=SC2317 # called by lib.sh's fail
on_fail() {
  show_daemon_state
}

ACKED=${VM_ACKED:-}
BOOT=${VM_BOOT:-}
case $ACKED in '' | *[!0-9]*) fail "cryptnbd.acked=$ACKED is not a record number" ;; esac
[ -n "$BOOT" ] || fail "no cryptnbd.boot= (the id of the boot that wrote the records)"
COUNT=$((ACKED + 1))
[ "$COUNT" -le "$PC_RECORDS" ] || fail "record $ACKED is past the volume's $PC_RECORDS records"
GOT=$VM_DIR/got

step "mount the disk after the power cut (ext4 replays its journal)"
pc_wait_disk
mkdir -p "$PC_MNT"
must mount -t ext4 "$PC_DISK" "$PC_MNT"
dmesg | grep 'EXT4-fs (vda)' | prefix_lines
[ -d "$CS_STATE" ] || fail "no state directory $CS_STATE on the disk"

step "the daemon on the state it left: the volume attaches again"
start_daemon
_t0=$(uptime_s)
while ! pc_volume_attached && [ "$(since "$_t0")" -lt 30 ]; do
  sleep 0.2
done
if pc_volume_attached; then
  ATTACH=restored
  log "  the daemon re-attached $PC_VOLUME to /dev/nbd0 from its saved attachments"
else
  ATTACH=by-hand
  log "  $PC_VOLUME is not on /dev/nbd0 30 s after the start; the daemon's log says:"
  grep -i 'attach' "$CS_LOG" | tail -n 5 | prefix_lines
  must cryptnbdctl attach "$PC_VOLUME" --device /dev/nbd0
  pc_volume_attached || fail "/dev/nbd0 has $(dev_bytes /dev/nbd0) bytes after attach"
fi
echo "CRYPTNBD-VM: ATTACH $ATTACH"
must cryptnbdctl status "$PC_VOLUME"

step "records 0..$ACKED of boot $BOOT, read back with O_DIRECT"
_t0=$(uptime_s)
must dd if=/dev/nbd0 of="$GOT" bs=4096 count="$COUNT" iflag=direct
BAD=$(pc_bad_records "$GOT" 0 "$COUNT" "$BOOT")
LOST=0
if [ -n "$BAD" ]; then
  LOST=$(echo "$BAD" | wc -l)
  log "  $LOST of $COUNT acknowledged records differ; what the first ones hold instead:"
  for _r in $(echo "$BAD" | head -n 10); do
    _got=$(dd if="$GOT" bs=4096 skip="$_r" count=1 2>/dev/null | head -c 46 | tr -c 'A-Za-z0-9 -' '.')
    log "    record $_r: '$_got'"
  done
fi
log "  compared $COUNT records in $(since "$_t0") s"
echo "CRYPTNBD-VM: CHECKED $COUNT"
echo "CRYPTNBD-VM: LOST $LOST $(echo "$BAD" | head -n 20 | tr '\n' ' ')"

# The round in flight at the cut (at most 8 records): how much of it made it, for the record.
_after=$((PC_RECORDS - COUNT))
[ "$_after" -le 8 ] || _after=8
BEYOND=0
if [ "$_after" -gt 0 ]; then
  must dd if=/dev/nbd0 of="$GOT" bs=4096 skip="$COUNT" count="$_after" iflag=direct
  _first_bad=$(pc_bad_records "$GOT" "$COUNT" "$_after" "$BOOT" | head -n 1)
  BEYOND=$((${_first_bad:-$((COUNT + _after))} - COUNT))
fi
echo "CRYPTNBD-VM: BEYOND $BEYOND"
[ "$LOST" = 0 ] ||
  fail "$LOST of the $COUNT acknowledged records are lost or damaged (records $(echo "$BAD" | head -n 5 | tr '\n' ' ')...)"

step "detach, stop the daemon, unmount, e2fsck -fn the disk"
must cryptnbdctl detach "$PC_VOLUME"
pc_stop_daemon
must umount "$PC_MNT"
must e2fsck -fn "$PC_DISK"
exit 0
