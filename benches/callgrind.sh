#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: a figure that does not move with
# the machine's noise (issue 17, item 1). Each server runs under callgrind; one libnbd client
# (not counted) sends the same requests to each, in four phases after a warm-up read, and
# callgrind's counters are dumped after each phase:
#   write      COUNT_SEQ writes of 256 KiB, in order (nbdcopy's request size)
#   read       COUNT_SEQ reads of 256 KiB, in order
#   randread   COUNT_RAND reads of 4 KiB at random offsets (the same offsets for every server)
#   randwrite  COUNT_RAND writes of 4 KiB at random offsets
# The requests go one at a time (queue depth 1), so every figure is the server's own work per
# request: instructions in user space (the kernel's are not counted: callgrind sees only the
# process). A second pass, without valgrind, counts the system calls, page faults and context
# switches of each phase with `perf stat` (which counts software events on any machine).
#
#   benches/callgrind.sh [-n COUNT_SEQ] [-m COUNT_RAND] [-d WORKDIR] [SERVER...]
#
# SERVERs: cryptnbd (release build, local KMS, 4096-byte sectors), nbdkit-file (unencrypted).
# Valgrind 3.19 emulates no AVX-512: under it aws-lc takes its AVX2 code, so the cipher's
# share is larger than on the real machine. Compare servers of the same run.
# Needs valgrind, nbdkit, python3-libnbd, linux-perf, bc. Run as root (the daemon locks its memory).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT_SEQ=512 COUNT_RAND=4096 WORK=/var/tmp/cryptnbd-callgrind
while getopts "n:m:d:h" o; do
  case $o in
    n) COUNT_SEQ=$OPTARG ;; m) COUNT_RAND=$OPTARG ;; d) WORK=$OPTARG ;;
    *) sed -n '2,/^set -euo/{/^set/!p}' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($# > 0)) || set -- cryptnbd nbdkit-file
SERVERS=("$@")
for tool in valgrind callgrind_control nbdkit perf bc; do
  command -v $tool >/dev/null || { echo "missing $tool: apt-get install valgrind nbdkit linux-perf bc python3-libnbd" >&2; exit 1; }
done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || { echo "missing python3-libnbd" >&2; exit 1; }
cargo build --release -q -p daemon -p ctl
BIN=$PWD/target/release
SIZE_MIB=$(( COUNT_SEQ / 4 > 64 ? COUNT_SEQ / 4 : 64 ))
rm -rf "$WORK" && mkdir -p "$WORK"
SPID=""
cleanup() { [[ -n $SPID ]] && kill "$SPID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# The client: waits for GO on stdin before each phase, prints DONE after it.
cat >"$WORK/client.py" <<'PY'
import random, sys, nbd
uri, seq, rand = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
h.pread(4096, 0)  # the server's threads for this connection exist before anything is counted
big = bytes(range(256)) * 1024
small = bytes(range(256)) * 16
rng = random.Random(17)
offsets = [rng.randrange(size // 4096) * 4096 for _ in range(rand)]
def phase(name, fn):
    sys.stdin.readline()
    fn()
    print(f"DONE {name}", flush=True)
phase("warmup", lambda: h.pread(4096, 4096))
phase("write", lambda: [h.pwrite(big, i * 262144) for i in range(seq)] and h.flush())
phase("read", lambda: [h.pread(262144, i * 262144) for i in range(seq)])
phase("randread", lambda: [h.pread(4096, o) for o in offsets])
phase("randwrite", lambda: [h.pwrite(small, o) for o in offsets])
h.shutdown()
PY

start_server() { # NAME WRAPPER...
  local name=$1; shift
  rm -f "$WORK/nbd.sock"
  case $name in
    cryptnbd)
      local state=$WORK/state run=$WORK/run
      rm -rf "$state" "$run"
      printf 'state_dir = "%s"\nruntime_dir = "%s"\n' "$state" "$run" >"$WORK/cryptnbd.toml"
      "$@" "$BIN/cryptnbd" --config "$WORK/cryptnbd.toml" >"$WORK/$name.log" 2>&1 &
      SPID=$!
      local ctl=("$BIN/cryptnbdctl" --state-dir "$state" --socket "$run/control.sock")
      for _ in $(seq 1 600); do "${ctl[@]}" status >/dev/null 2>&1 && break; sleep 0.2; done
      "${ctl[@]}" kms create-key --alias alias/cg >/dev/null
      "${ctl[@]}" create cg --size "${SIZE_MIB}M" --kms-key alias/cg \
        --sid S-1-5-21-277731876-1789304096-451871588-1107 --directory d-1234abcd01 >/dev/null
      "${ctl[@]}" attach cg --transient >/dev/null
      URI="nbd+unix:///cg?socket=$run/nbd.sock" ;;
    nbdkit-file)
      truncate -s 0 "$WORK/plain.img" && truncate -s "${SIZE_MIB}M" "$WORK/plain.img"
      "$@" nbdkit -f -U "$WORK/nbd.sock" file "$WORK/plain.img" >"$WORK/$name.log" 2>&1 &
      SPID=$!
      for _ in $(seq 1 600); do [[ -S $WORK/nbd.sock ]] && break; sleep 0.2; done
      URI="nbd+unix:///?socket=$WORK/nbd.sock" ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
}

# Runs the four phases; before each, BEFORE is run, and after each AFTER PHASE.
drive() { # BEFORE AFTER
  local before=$1 after=$2
  coproc CLIENT { /usr/bin/python3 "$WORK/client.py" "$URI" "$COUNT_SEQ" "$COUNT_RAND"; }
  local cpid=$CLIENT_PID
  for phase in warmup write read randread randwrite; do
    $before
    echo GO >&"${CLIENT[1]}"
    read -r line <&"${CLIENT[0]}"
    [[ $line == "DONE $phase" ]] || { echo "client: $line" >&2; exit 1; }
    $after "$phase"
  done
  wait "$cpid"
}

declare -A IR EV
for name in "${SERVERS[@]}"; do
  echo "== $name under callgrind"
  start_server "$name" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$name.%p" \
    --compress-strings=no --compress-pos=no
  cg_zero() { callgrind_control -z "$SPID" >/dev/null 2>&1; }
  cg_dump() { callgrind_control --dump="$1" "$SPID" >/dev/null 2>&1; }
  drive cg_zero cg_dump
  kill "$SPID"; wait "$SPID" 2>/dev/null || true; SPID=""
  # Each dump's file ends in .N and carries its reason ("Dump Reason: PHASE"); the count is on
  # the "summary:" line.
  for f in "$WORK"/cg."$name".*.*; do
    reason=$(sed -n 's/^desc: Trigger: Client Request: //p; s/^desc: Trigger: //p' "$f" | head -1)
    phase=${reason##* }
    total=$(sed -n 's/^summary: //p' "$f")
    [[ -n $phase && -n $total ]] && IR[$name.$phase]=$total
  done
  echo "== $name under perf stat"
  start_server "$name"
  ps_start() {
    perf stat -x, -e raw_syscalls:sys_enter,page-faults,context-switches -p "$SPID" \
      -o "$WORK/perf.$name.cur" &
    PERF=$!
    sleep 1
  }
  ps_stop() {
    kill -INT "$PERF"; wait "$PERF" 2>/dev/null || true
    mv "$WORK/perf.$name.cur" "$WORK/perf.$name.$1"
  }
  drive ps_start ps_stop
  kill "$SPID"; wait "$SPID" 2>/dev/null || true; SPID=""
  for phase in write read randread randwrite; do
    for ev in raw_syscalls:sys_enter page-faults context-switches; do
      EV[$name.$phase.$ev]=$(awk -F, -v e="$ev" '$3 == e {print $1}' "$WORK/perf.$name.$phase")
    done
  done
done

per() { # TOTAL COUNT
  echo "scale=2; ${1:-0} / $2" | bc -l | sed 's/^\./0./'
}
{
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ): $COUNT_SEQ sequential requests of 256 KiB, $COUNT_RAND random of 4 KiB, queue depth 1."
  echo "Per phase, the functions with the most instructions: callgrind_annotate --inclusive=no $WORK/cg.SERVER.PID.N (N = 2 write, 3 read, 4 randread, 5 randwrite; 1 is a warm-up read)."
  echo
  echo "| server | request | instructions per request | per byte | system calls per request | page faults per request | context switches per request |"
  echo "|---|---|---|---|---|---|---|"
  for name in "${SERVERS[@]}"; do
    for phase in write read randread randwrite; do
      n=$COUNT_RAND bytes=4096
      [[ $phase == write || $phase == read ]] && n=$COUNT_SEQ bytes=262144
      ir=${IR[$name.$phase]:-0}
      printf '| %s | %s | %d | %s | %s | %s | %s |\n' "$name" "$phase" $((ir / n)) \
        "$(per "$ir" $((n * bytes)))" \
        "$(per "${EV[$name.$phase.raw_syscalls:sys_enter]}" "$n")" \
        "$(per "${EV[$name.$phase.page-faults]}" "$n")" \
        "$(per "${EV[$name.$phase.context-switches]}" "$n")"
    done
  done
} | tee "$WORK/results.md"
