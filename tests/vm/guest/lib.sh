# Helpers shared by the guest's /init and the scenarios (busybox sh). Sourced, not run.
#
# Every line a guest script prints goes to the serial console with the guest's uptime, so
# the serial log the host keeps tells what happened when. A scenario ends with `exit 0`
# (pass) or calls `fail REASON` (exits 1); /init turns that into the marker line.

VM_DIR=/run/cryptnbd-vm
mkdir -p "$VM_DIR"

# Debian's static busybox runs its own applet for any command that names one, whatever PATH
# says; these functions make the shell use the real tools of the initramfs instead (programs
# started by other programs, such as cryptnbdctl, find them on PATH anyway).
losetup() { /usr/sbin/losetup "$@"; }
blockdev() { /usr/sbin/blockdev "$@"; }
mke2fs() { /usr/sbin/mke2fs "$@"; }

# The guest's uptime in seconds, without forking.
uptime_s() {
  read -r _up _idle </proc/uptime
  echo "$_up"
}

log() {
  read -r _up _idle </proc/uptime
  echo "[vm ${_up}s] $*"
}

# Prefixes every line of stdin with the uptime (for command output).
prefix_lines() {
  while IFS= read -r _line; do
    read -r _up _idle </proc/uptime
    echo "[vm ${_up}s]   $_line"
  done
}

step() {
  log "== $*"
}

# fail REASON: records the reason for /init, runs the scenario's on_fail hook (if it has
# one) to show what led there, and ends the scenario.
fail() {
  log "FAIL: $*"
  printf '%s\n' "$*" >"$VM_DIR/fail-reason"
  if [ -z "${_in_on_fail:-}" ] && command -v on_fail >/dev/null 2>&1; then
    _in_on_fail=1
    on_fail
  fi
  exit 1
}

# run CMD...: runs CMD with its output prefixed, and returns its exit status (never fails).
run() {
  log "+ $*"
  rm -f "$VM_DIR/rc"
  { "$@" 2>&1; echo "$?" >"$VM_DIR/rc"; } | prefix_lines
  _rc=$(cat "$VM_DIR/rc" 2>/dev/null || echo 255)
  [ "$_rc" = 0 ] || log "  (exit $_rc)"
  return "$_rc"
}

# must CMD...: runs CMD; a non-zero exit fails the scenario.
must() {
  run "$@" || fail "\`$*\` exited with $_rc"
}

# refused CODE CMD...: CMD must be refused with exit code CODE (a refusal the product
# promises in docs/cli.md); success, or another code, fails the scenario.
refused() {
  _want=$1
  shift
  if run "$@"; then
    fail "\`$*\` succeeded, but it must be refused (exit $_want)"
  fi
  [ "$_rc" = "$_want" ] || fail "\`$*\` exited with $_rc, a refusal is exit $_want"
  log "  refused as it must be (exit $_rc)"
}

# capture CMD...: runs CMD with output prefixed, keeps its stdout in $VM_DIR/out; a non-zero
# exit fails the scenario.
capture() {
  log "+ $*"
  "$@" >"$VM_DIR/out" 2>"$VM_DIR/err"
  _rc=$?
  prefix_lines <"$VM_DIR/out"
  prefix_lines <"$VM_DIR/err"
  [ "$_rc" = 0 ] || fail "\`$*\` exited with $_rc"
}

# wait_until SECONDS DESCRIPTION CMD...: polls CMD every 0.2 s until it succeeds; fails the
# scenario after SECONDS.
wait_until() {
  _limit=$1
  _what=$2
  shift 2
  _deadline=$(awk -v u="$(uptime_s)" -v l="$_limit" 'BEGIN {print u + l}')
  while ! "$@" >/dev/null 2>&1; do
    if awk -v u="$(uptime_s)" -v d="$_deadline" 'BEGIN {exit !(u > d)}'; then
      fail "$_what: not within $_limit s"
    fi
    sleep 0.2
  done
  log "  $_what"
}

# Whether process PID is alive (an exited child the shell has not reaped yet is not).
alive() {
  [ -e "/proc/$1" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null
}

# bounded SECONDS CMD...: runs CMD, but waits at most SECONDS for it (a process stuck in the
# kernel cannot be killed by `timeout`, so the shell must not wait for it): returns CMD's
# exit status, or 124 after SECONDS, leaving CMD behind.
bounded() {
  _bsecs=$1
  shift
  # Output goes through a file: a process left behind must not hold a pipe open.
  "$@" >"$VM_DIR/bounded.out" 2>&1 &
  _bpid=$!
  _bt0=$(uptime_s)
  while alive "$_bpid"; do
    if [ "$(since "$_bt0")" -ge "$_bsecs" ]; then
      cat "$VM_DIR/bounded.out"
      log "  \`$*\` still runs after $_bsecs s: left behind (pid $_bpid)"
      kill -9 "$_bpid" 2>/dev/null
      return 124
    fi
    sleep 0.1
  done
  wait "$_bpid"
  _brc=$?
  cat "$VM_DIR/bounded.out"
  return "$_brc"
}

# Seconds elapsed since uptime T0 (integer).
since() {
  awk -v u="$(uptime_s)" -v t="$1" 'BEGIN {printf "%d", u - t}'
}

# The size of block device DEV in bytes from sysfs (0 when not connected).
dev_bytes() {
  _n=$(cat "/sys/block/${1#/dev/}/size" 2>/dev/null || echo 0)
  echo $((_n * 512))
}

# Whether DEV is disconnected (size 0).
dev_disconnected() {
  [ "$(dev_bytes "$1")" = 0 ]
}

# Whether DEV is mounted anywhere.
is_mounted() {
  grep -q "^$1 " /proc/mounts
}

# ---------------------------------------------------------------------------------------------
# Test data: files of random bytes and their checksums (kept on the guest's tmpfs /run)
# ---------------------------------------------------------------------------------------------

# write_file DIR NAME BYTES SUMS: a file of BYTES random bytes, written and fsynced; appends
# its sha256 line to SUMS.
write_file() {
  _dir=$1
  _name=$2
  _bytes=$3
  _sums=$4
  if [ $((_bytes % 1048576)) = 0 ]; then
    dd if=/dev/urandom of="$_dir/$_name" bs=1048576 count=$((_bytes / 1048576)) iflag=fullblock conv=fsync 2>"$VM_DIR/dd.err" ||
      fail "writing $_dir/$_name: $(cat "$VM_DIR/dd.err")"
  else
    dd if=/dev/urandom of="$_dir/$_name" bs="$_bytes" count=1 iflag=fullblock conv=fsync 2>"$VM_DIR/dd.err" ||
      fail "writing $_dir/$_name: $(cat "$VM_DIR/dd.err")"
  fi
  (cd "$_dir" && sha256sum "$_name") >>"$_sums" || fail "sha256sum of $_dir/$_name"
}

# write_set DIR PREFIX SUMS: 32 MiB of random data in thirteen files of different sizes (one
# of 16 MiB, two of 4 MiB, five of 1 MiB, and 3 MiB spread over five odd-sized files that end
# inside a block), listed in SUMS.
write_set() {
  _t0=$(uptime_s)
  write_file "$1" "$2-16m" 16777216 "$3"
  write_file "$1" "$2-4m-a" 4194304 "$3"
  write_file "$1" "$2-4m-b" 4194304 "$3"
  for _i in 1 2 3 4 5; do
    write_file "$1" "$2-1m-$_i" 1048576 "$3"
  done
  # 3 MiB in pieces that do not fill their last block
  write_file "$1" "$2-odd-a" 1048575 "$3"
  write_file "$1" "$2-odd-b" 1048577 "$3"
  write_file "$1" "$2-odd-c" 1036289 "$3"
  write_file "$1" "$2-odd-d" 12287 "$3"
  write_file "$1" "$2-odd-e" 1 "$3"
  sync
  log "  wrote 32 MiB in $(wc -l <"$3") files under $1 in $(since "$_t0") s"
}

# verify_set DIR SUMS: every file listed in SUMS has its recorded sha256.
verify_set() {
  _t0=$(uptime_s)
  if ! (cd "$1" && sha256sum -c "$2") >"$VM_DIR/verify.out" 2>&1; then
    prefix_lines <"$VM_DIR/verify.out"
    fail "files under $1 differ from what was written: $(grep -v ': OK$' "$VM_DIR/verify.out" | tr '\n' ' ')"
  fi
  log "  verified $(wc -l <"$2") files under $1 in $(since "$_t0") s"
}

# ---------------------------------------------------------------------------------------------
# The daemon inside the guest (scenarios a, c, d)
# ---------------------------------------------------------------------------------------------

CS_STATE=/run/cs/state
CS_RUN=/run/cs/run
CS_LOG=$VM_DIR/cryptnbd.log
# cryptnbdctl finds the daemon and the state through these (docs/cli.md, "Global flags").
export CRYPTNBD_STATE_DIR=$CS_STATE
export CRYPTNBD_SOCKET=$CS_RUN/control.sock

# Starts `cryptnbd` in the background (local KMS, the default) and waits until its control
# socket answers. Sets DAEMON_PID.
start_daemon() {
  log "+ cryptnbd --state-dir $CS_STATE --runtime-dir $CS_RUN -v &   (log: $CS_LOG)"
  echo "---- daemon start at $(uptime_s) s" >>"$CS_LOG"
  cryptnbd --state-dir "$CS_STATE" --runtime-dir "$CS_RUN" -v >>"$CS_LOG" 2>&1 &
  DAEMON_PID=$!
  _t0=$(uptime_s)
  while ! cryptnbdctl status >/dev/null 2>&1; do
    alive "$DAEMON_PID" || fail "cryptnbd (pid $DAEMON_PID) exited during start-up"
    [ "$(since "$_t0")" -lt 60 ] || fail "cryptnbd did not answer on $CRYPTNBD_SOCKET within 60 s"
    sleep 0.1
  done
  log "  cryptnbd (pid $DAEMON_PID) answers on $CRYPTNBD_SOCKET after $(since "$_t0") s"
}

# Kills the daemon with SIGKILL (a crash) and reaps it.
kill_daemon() {
  log "+ kill -9 $DAEMON_PID (cryptnbd)"
  kill -9 "$DAEMON_PID" || fail "kill -9 $DAEMON_PID"
  wait "$DAEMON_PID" 2>/dev/null
  DAEMON_PID=
}

# What a failing daemon scenario shows: the daemon's log, the kernel's, the devices.
show_daemon_state() {
  log "---- last 40 lines of the daemon's log"
  tail -n 40 "$CS_LOG" 2>/dev/null | prefix_lines
  log "---- cryptnbdctl status"
  timeout 10 cryptnbdctl status 2>&1 | prefix_lines
  show_kernel_state
}

show_kernel_state() {
  log "---- last 30 kernel messages"
  dmesg | tail -n 30 | prefix_lines
  log "---- mounts of nbd and dm devices"
  grep -E '^/dev/(nbd|mapper|dm-)' /proc/mounts | prefix_lines
  for _s in /sys/block/nbd0/size /sys/block/nbd0/pid; do
    [ -e "$_s" ] && log "  $_s: $(cat "$_s")"
  done
}
