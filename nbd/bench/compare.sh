#!/bin/bash
# compare.sh - the nbd crate's server (in-memory device, examples/memserver.rs) beside
# `nbdkit memory` in one run: seq write/read with nbdcopy, 4K randread/randwrite IOPS with fio
# (ioengine=nbd, iodepth 32, one job). Prints the median [min-max] of RUNS runs per figure.
#
#   nbd/bench/compare.sh [RUNS=3] [FIO_SECONDS=5] [SIZE_MIB=1024]
#
# Needs: cargo, nbdkit, libnbd-bin (nbdcopy, nbdinfo), fio, python3. Not part of the tests:
# the machine is noisy and this takes a few minutes; run it by hand on an idle machine.
set -euo pipefail
RUNS=${1:-3}; SECS=${2:-5}; MIB=${3:-1024}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
for t in nbdkit nbdcopy nbdinfo fio python3; do
  command -v $t >/dev/null || { echo "missing $t (apt-get install -y nbdkit libnbd-bin fio)"; exit 1; }
done
cargo build --quiet --release -p nbd --example memserver --manifest-path "$ROOT/Cargo.toml"
MEMSERVER=$ROOT/target/release/examples/memserver
SRC=$WORK/src.bin
head -c $((MIB << 20)) /dev/urandom > "$SRC"
SOCK=$WORK/nbd.sock; URI="nbd+unix:///?socket=$SOCK"

start() { rm -f "$SOCK"; "$@" >"$WORK/server.log" 2>&1 & SPID=$!
  for _ in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "server did not start"; cat "$WORK/server.log"; exit 1; }
stop() { kill "$SPID"; wait "$SPID" 2>/dev/null || true; }

one() { # kind -> value
  local t0 t1
  case $1 in
    write) t0=$(date +%s.%N); nbdcopy --no-extents -S 0 "$SRC" "$URI"; t1=$(date +%s.%N)
           python3 -c "print(int($((MIB << 20))/($t1-$t0)/1e6))" ;;
    read)  t0=$(date +%s.%N); nbdcopy --no-extents "$URI" null:; t1=$(date +%s.%N)
           python3 -c "print(int($((MIB << 20))/($t1-$t0)/1e6))" ;;
    randread|randwrite)
      fio --name=$1 --ioengine=nbd --uri="$URI" --rw=$1 --bs=4k --iodepth=32 --numjobs=1 \
        --time_based --runtime="$SECS" --ramp_time=1 --size=$((MIB << 20)) \
        --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1
      python3 -c "import json; j=json.load(open('$WORK/fio.json'))['jobs'][0]; print(int(j['read']['iops']+j['write']['iops']))" ;;
  esac
}

declare -A VALS
SERVERS=(nbdkit memserver)
for r in $(seq "$RUNS"); do
  for s in "${SERVERS[@]}"; do
    if [ "$s" = nbdkit ]; then start nbdkit -f -U "$SOCK" memory "${MIB}M"; else start "$MEMSERVER" "$SOCK" "$MIB"; fi
    for k in write read randread randwrite; do sync; VALS[$s.$k]+="$(one $k) "; done
    stop
  done
done
printf "%-10s %-22s %s\n" server figure "median [min-max]"
for s in "${SERVERS[@]}"; do
  for k in write read randread randwrite; do
    unit=$([ ${k#rand} = $k ] && echo "seq $k MB/s" || echo "4K $k IOPS")
    printf "%-10s %-22s %s\n" "$s" "$unit" "$(python3 -c '
import sys,statistics as s; v=[int(x) for x in sys.argv[1:]]
print(f"{int(s.median(v))} [{min(v)}-{max(v)}]")' ${VALS[$s.$k]})"
  done
done
