# shellcheck shell=sh
# What the two boots of scenario g, power cut (scenario-power-cut-write.sh, then
# scenario-power-cut-check.sh on the same disk), share. Sourced after lib.sh, not run.
#
# The disk that outlives the power cut is the VM's virtio /dev/vda, an image file on the host
# that qemu opens with cache=none (Scenario::disk, DiskCache::None): ext4 on it holds the
# daemon's whole state directory (keystore, volume file, saved attachments), so the second
# boot finds everything the first made durable, and nothing else.
#
# A record is 4096 bytes, record number R at byte R * 4096 of the volume: 64 lines of 64
# bytes, each `CNBD-PWRCUT rec RRRRRRRR boot BBBBBBBB line LL` padded with spaces to 63
# bytes and a newline. Line 00 is the header (magic, record number, the writing boot's id);
# every line names its record and its place, so a lost write (zeros, or an older record),
# a torn one or a misdirected one all differ from what pc_records prints.

PC_DISK=/dev/vda
PC_MNT=/persist
# shellcheck disable=SC2034 # read by the scenarios that source this file
PC_VOLUME=pc
PC_SIZE_MIB=64
# Records the volume holds.
# shellcheck disable=SC2034 # read by the scenarios that source this file
PC_RECORDS=$((PC_SIZE_MIB * 256))
# The daemon's state on the disk instead of lib.sh's /run/cs/state (the sockets stay on /run).
CS_STATE=$PC_MNT/state
export CRYPTNBD_STATE_DIR=$CS_STATE

# pc_records FIRST COUNT BOOT: records FIRST .. FIRST+COUNT-1 of boot BOOT on stdout.
pc_records() {
  awk -v first="$1" -v count="$2" -v boot="$3" 'BEGIN {
    for (r = first; r < first + count; r++)
      for (i = 0; i < 64; i++)
        printf "%-63s\n", sprintf("CNBD-PWRCUT rec %08d boot %s line %02d", r, boot, i)
  }'
}

# pc_bad_records FILE FIRST COUNT BOOT: the numbers of the records of FILE (records FIRST ..
# FIRST+COUNT-1 of boot BOOT, 4096 bytes each) that differ from what pc_records prints, one a
# line, in one pass: a fork per record takes some 70 ms under emulation. NUL bytes and
# newlines become '@' and `fold -b -w 64` cuts the result every 64 bytes, so that line N of
# its output is bytes N*64 .. N*64+63 of FILE whatever they hold (awk reads text lines).
pc_bad_records() {
  tr '\000\n' '@@' <"$1" | fold -b -w 64 |
    awk -v first="$2" -v count="$3" -v boot="$4" '
      BEGIN { last = -1 }
      NR <= count * 64 {
        r = first + int((NR - 1) / 64)
        want = sprintf("%-63s@", sprintf("CNBD-PWRCUT rec %08d boot %s line %02d", r, boot, (NR - 1) % 64))
        if ($0 != want && r != last) { print r; last = r }
      }
      END {
        # Records that got no line at all (a short file).
        for (r = first + int((NR + 63) / 64); r < first + count; r++) if (r != last) print r
      }'
}

# Waits for the virtio disk (/init loaded virtio_blk.ko from the scenario's files) and logs
# what the guest's kernel sees of its write cache.
pc_wait_disk() {
  wait_until 10 "$PC_DISK is there" test -b "$PC_DISK"
  log "  $PC_DISK: $(dev_bytes "$PC_DISK") bytes, write cache: $(cat /sys/block/vda/queue/write_cache 2>/dev/null)"
}

pc_volume_attached() {
  [ "$(dev_bytes /dev/nbd0)" = $((PC_SIZE_MIB << 20)) ]
}

pc_daemon_gone() {
  ! alive "$DAEMON_PID"
}

# Stops the daemon the clean way (SIGTERM: drain, flush, wipe keys) and waits for it.
pc_stop_daemon() {
  log "+ kill $DAEMON_PID (cryptnbd, SIGTERM)"
  kill "$DAEMON_PID" || fail "kill $DAEMON_PID"
  wait_until 30 "cryptnbd exited" pc_daemon_gone
  wait "$DAEMON_PID" 2>/dev/null
  DAEMON_PID=
}

# pc_flushes DEV: sets PC_FLUSHES to the flush requests DEV (nbd0, vda) has completed, field
# 16 of /sys/block/DEV/stat (without forking: it runs once per round).
pc_flushes() {
  # shellcheck disable=SC2034 # the fields before and after the one wanted
  read -r _f1 _f2 _f3 _f4 _f5 _f6 _f7 _f8 _f9 _f10 _f11 _f12 _f13 _f14 _f15 PC_FLUSHES _f17 \
    <"/sys/block/$1/stat"
}
