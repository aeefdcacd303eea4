# shellcheck shell=sh
# Scenario g, power cut, boot 1 of 2: write until the power comes off.
#
# ext4 on the virtio disk /dev/vda (qemu: cache=none) holds the daemon's state; the daemon
# creates a volume there and attaches it to /dev/nbd0; then numbered records (power-cut.sh)
# go to /dev/nbd0 in rounds, each round ending at a durable point after which the guest
# prints `CRYPTNBD-VM: ACK N KIND UPTIME NBD0_FLUSHES VDA_FLUSHES` on the serial console:
# every record up to N must survive. The flush counts (/sys/block/DEV/stat) show that each
# round made /dev/nbd0 send a FLUSH to the daemon, and the daemon's fdatasync one to the disk.
# The rounds take turns:
#   fua           4 records, O_DIRECT|O_DSYNC (coreutils dd, brought in as files/dd: busybox
#                 dd has no oflag=dsync): each write goes to the daemon with FUA, and the
#                 kernel then sends a FLUSH as well (blkdev_fsync for O_DSYNC);
#   flush         8 records written through the page cache, then fsync of /dev/nbd0 (busybox
#                 `sync FILE`): the dirty pages go out, then a FLUSH;
#   direct+flush  8 records with O_DIRECT (each reaches the daemon, none durable yet), then
#                 the fsync and its FLUSH.
# The host (tests/tests/vm.rs, g_power_cut_...) kills qemu with SIGKILL once it has seen
# enough ACKs: this boot never ends by itself, except by failing. The check boot
# (scenario-power-cut-check.sh) reads every acknowledged record back.

# shellcheck source=tests/vm/guest/lib.sh
. /cryptnbd-vm/lib.sh
# shellcheck source=tests/vm/guest/power-cut.sh
. /cryptnbd-vm/power-cut.sh

# shellcheck disable=SC2317 # called by lib.sh's fail
on_fail() {
  show_daemon_state
}

BATCH=$VM_DIR/batch
DD=$VM_DIR/dd

step "the disk that outlives the power cut: ext4 on $PC_DISK, the daemon's state on it"
pc_wait_disk
must mke2fs -q -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 "$PC_DISK"
mkdir -p "$PC_MNT"
must mount -t ext4 "$PC_DISK" "$PC_MNT"
mkdir -m 700 "$CS_STATE" || fail "mkdir $CS_STATE"
if ! cp /cryptnbd-vm/files/dd "$DD" || ! chmod 755 "$DD"; then
  fail "no coreutils dd in the scenario's files"
fi
"$DD" --version >"$VM_DIR/dd.version" 2>&1 || fail "coreutils dd does not run in the guest: $(cat "$VM_DIR/dd.version")"
log "  $(head -n 1 "$VM_DIR/dd.version") for the O_DSYNC writes"

step "daemon, key, volume on the disk; attach it to /dev/nbd0"
start_daemon
must cryptnbdctl kms create-key --alias alias/pc
must cryptnbdctl create "$PC_VOLUME" --size "${PC_SIZE_MIB}M" --kms-key alias/pc \
  --sid S-1-5-21-1-2-3-1001 --directory d-1234567890
must cryptnbdctl attach "$PC_VOLUME" --device /dev/nbd0
pc_volume_attached || fail "/dev/nbd0 has $(dev_bytes /dev/nbd0) bytes after attach"
# Without a write cache the kernel sends no FLUSH, and without FUA no FUA: the test would
# prove nothing about either.
_wc=$(cat /sys/block/nbd0/queue/write_cache)
_fua=$(cat /sys/block/nbd0/queue/fua)
log "  /dev/nbd0: write cache: $_wc, fua: $_fua"
[ "$_wc" = "write back" ] || fail "/dev/nbd0 has no write cache ($_wc): the kernel would send no FLUSH"
[ "$_fua" = 1 ] || fail "/dev/nbd0 does not take FUA ($_fua)"

BOOT=$(cut -c1-8 /proc/sys/kernel/random/boot_id)
echo "CRYPTNBD-VM: BOOT-ID $BOOT"

step "records to /dev/nbd0 until the power cut (ACK N: records 0..N are durable)"
N=0
ROUND=0
_t0=$(uptime_s)
while :; do
  case $((ROUND % 3)) in
    0) KIND=fua COUNT=4 ;;
    1) KIND=flush COUNT=8 ;;
    *) KIND=direct+flush COUNT=8 ;;
  esac
  [ $((N + COUNT)) -le "$PC_RECORDS" ] ||
    fail "the volume is full ($N records in $(since "$_t0") s) and no power cut came"
  pc_records "$N" "$COUNT" "$BOOT" >"$BATCH"
  case $KIND in
    fua)
      "$DD" if="$BATCH" of=/dev/nbd0 bs=4096 seek="$N" oflag=direct,dsync conv=notrunc \
        status=none 2>"$VM_DIR/dd.err"
      ;;
    flush)
      dd if="$BATCH" of=/dev/nbd0 bs=4096 seek="$N" conv=notrunc 2>"$VM_DIR/dd.err" &&
        sync /dev/nbd0 2>>"$VM_DIR/dd.err"
      ;;
    *)
      dd if="$BATCH" of=/dev/nbd0 bs=4096 seek="$N" oflag=direct conv=notrunc \
        2>"$VM_DIR/dd.err" && sync /dev/nbd0 2>>"$VM_DIR/dd.err"
      ;;
  esac || fail "round $ROUND ($KIND, records $N..$((N + COUNT - 1))): $(tr '\n' ' ' <"$VM_DIR/dd.err")"
  N=$((N + COUNT))
  read -r _up _idle </proc/uptime
  pc_flushes nbd0
  _nbd_flushes=$PC_FLUSHES
  pc_flushes vda
  echo "CRYPTNBD-VM: ACK $((N - 1)) $KIND $_up $_nbd_flushes $PC_FLUSHES"
  ROUND=$((ROUND + 1))
done
