#!/bin/bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer, on the nightly toolchain).
#   scripts/fuzz.sh [-t SECONDS] [-n EXECUTIONS] [-l BYTES] [-m] [TARGET...]
# Each target runs SECONDS (default 15) from its committed seeds (fuzz/seeds/TARGET) and its
# kept corpus (fuzz/corpus/TARGET, not committed: campaigns add up across runs there). One
# line per target: executions, coverage, corpus size. -n stops each target after that many
# executions instead (with -t as the limit on time). -l caps an input's length (default
# 1 MiB, room for large WRITE payloads; longer kept inputs are cut on loading). A crash
# stops the run with the reproducer's path (fuzz/artifacts/TARGET/); make it a regression
# test, then fix it. -m minimizes each target's kept corpus into its seeds (cargo fuzz
# cmin), for a commit. Installs the nightly toolchain (rustup) and cargo-fuzz (cargo install
# --locked) when they are missing. The long campaigns of docs/reliability.md are this
# script with a large -t or -n.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=15 MINIMIZE="" RUNS=-1 MAX_LEN=1048576
while getopts "t:n:l:mh" o; do
  case $o in
    t) SECONDS_PER=$OPTARG ;; n) RUNS=$OPTARG; [[ $SECONDS_PER == 15 ]] && SECONDS_PER=86400 ;;
    l) MAX_LEN=$OPTARG ;;
    m) MINIMIZE=1 ;;
    *) sed -n '2,/^set -euo/{/^set/!p}' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "== installing the nightly toolchain (cargo-fuzz builds with its sanitizers)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked -q cargo-fuzz
fi
cd fuzz
TARGETS=("$@")
((${#TARGETS[@]})) || mapfile -t TARGETS < <(cargo +nightly fuzz list)
echo "== building ${#TARGETS[@]} fuzz targets"
build_log=$(mktemp)
if ! cargo +nightly fuzz build -O >"$build_log" 2>&1; then
  tail -60 "$build_log"
  echo "building the fuzz targets failed" >&2
  exit 1
fi
rm -f "$build_log"
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  if [[ -n $MINIMIZE ]]; then
    cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
    cargo +nightly fuzz cmin -O "$t" "corpus/$t" -- -max_len=1048576 >/dev/null 2>&1
    rm -rf "seeds/$t" && cp -r "corpus/$t" "seeds/$t"
    echo "$t: $(find "seeds/$t" -type f | wc -l) seeds after minimizing"
    continue
  fi
  log=$(mktemp)
  # No leak checks: libFuzzer saw more allocations than frees after many inputs (the session
  # targets' servers free memory on their own threads) and then scanned the whole heap with
  # LeakSanitizer. That took a third to half of the time (perf, 2026-12-05: nbd_starttls,
  # nbd_session and daemon_config ran 1.5 to 1.9 times faster without it). What the targets
  # look for is a panic, a hang or memory misuse, which AddressSanitizer still catches.
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$SECONDS_PER" -runs="$RUNS" -print_final_stats=1 -max_len="$MAX_LEN" -detect_leaks=0 \
      >"$log" 2>&1; then
    # The panic's message (it may sit above a long stack trace), then the end of the log.
    # The input's Debug dump is one huge line: left out.
    grep -A4 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)' "$log" | cut -c1-400 | head -20
    echo "..."
    grep -v '^[[:space:]]*\[' "$log" | cut -c1-400 | tail -40
    echo "fuzz target $t failed: the reproducer is in fuzz/artifacts/$t/" >&2
    rm -f "$log"
    exit 1
  fi
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log")
  took=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log")
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  echo "$t: ${execs:-0} executions (${took:-?} per second), coverage ${cov:-?} edges, corpus $(find "corpus/$t" -type f | wc -l) inputs, 0 crashes"
  rm -f "$log"
done
