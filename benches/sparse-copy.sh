#!/usr/bin/env bash
# Sparse copies out of cryptnbd (issue 17, item 5): a volume of SIZE GiB (default 20) with
# 5% of it written (1 MiB in every 20, random data, through NBD), copied out whole with
# `nbdcopy URI null:`, `nbdcopy URI FILE` and `qemu-img convert -O raw`, each RUNS times
# (default 3), timed; the median is printed, with the bytes the copy read from the server
# (from the server's own counter, `cryptnbdctl status --json`).
#
#   benches/sparse-copy.sh [-s SIZE_GIB] [-r RUNS] [-d WORKDIR] [-b BINDIR]
#
# -b takes the cryptnbd and cryptnbdctl to measure (default: target/release, built here), so
# that two builds can be compared in one sitting. Needs libnbd-bin (nbdcopy), python3-libnbd and qemu-utils.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=20 RUNS=3 WORK=/var/tmp/cryptnbd-sparse BIN=""
while getopts "s:r:d:b:h" o; do
  case $o in
    s) SIZE_GIB=$OPTARG ;; r) RUNS=$OPTARG ;; d) WORK=$OPTARG ;; b) BIN=$OPTARG ;;
    *) sed -n '2,/^set -euo/{/^set/!p}' "$0"; exit 2 ;;
  esac
done
for tool in nbdcopy qemu-img python3; do
  command -v $tool >/dev/null || { echo "missing $tool: apt-get install libnbd-bin python3-libnbd qemu-utils" >&2; exit 1; }
done
if [[ -z $BIN ]]; then
  cargo build --release -q -p daemon -p ctl
  BIN=$PWD/target/release
fi
rm -rf "$WORK" && mkdir -p "$WORK"
state=$WORK/state run=$WORK/run
printf 'state_dir = "%s"\nruntime_dir = "%s"\n' "$state" "$run" >"$WORK/cryptnbd.toml"
"$BIN/cryptnbd" --config "$WORK/cryptnbd.toml" >"$WORK/daemon.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$WORK"' EXIT
ctl=("$BIN/cryptnbdctl" --state-dir "$state" --socket "$run/control.sock")
for _ in $(seq 1 300); do "${ctl[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
"${ctl[@]}" kms create-key --alias alias/sparse >/dev/null
"${ctl[@]}" create sparse --size "${SIZE_GIB}G" --kms-key alias/sparse \
  --sid S-1-5-21-277731876-1789304096-451871588-1107 --directory d-1234abcd01 >/dev/null
"${ctl[@]}" attach sparse --transient >/dev/null
URI="nbd+unix:///sparse?socket=$run/nbd.sock"

echo "== writing 1 MiB in every 20 MiB of a ${SIZE_GIB} GiB volume"
# From /, with Debian's python3: in the repository, `import nbd` finds the crate's folder.
(cd / && /usr/bin/python3 - "$URI" "$SIZE_GIB") <<'PY'
import os, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = int(sys.argv[2]) << 30
mib = 1 << 20
for off in range(0, size, 20 * mib):
    h.pwrite(os.urandom(mib), off)
h.flush()
h.shutdown()
PY
bytes_read() { "${ctl[@]}" --json status sparse |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["attachments"][0]["bytes_read"])'; }

median() { python3 -c 'import sys, statistics as st; print(f"{st.median([float(x) for x in sys.argv[1:]]):.2f}")' "$@"; }
for how in "nbdcopy null:" "nbdcopy file" "qemu-img convert"; do
  times=()
  for _ in $(seq 1 "$RUNS"); do
    rm -f "$WORK/out.img"
    before=$(bytes_read)
    t0=$(date +%s.%N)
    case $how in
      "nbdcopy null:") nbdcopy "$URI" null: ;;
      "nbdcopy file") truncate -s "${SIZE_GIB}G" "$WORK/out.img" && nbdcopy "$URI" "$WORK/out.img" ;;
      "qemu-img convert") qemu-img convert -f raw -O raw "$URI" "$WORK/out.img" ;;
    esac
    t1=$(date +%s.%N)
    after=$(bytes_read)
    times+=("$(python3 -c "print($t1 - $t0)")")
  done
  echo "$how: median $(median "${times[@]}") s of ${times[*]}; the server read $(( (after - before) >> 20 )) MiB in the last run"
done
