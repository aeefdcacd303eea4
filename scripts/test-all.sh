#!/usr/bin/env bash
# Runs every test of cryptnbd on a fresh Debian 12 machine, installing what the tests need:
# the Debian packages of the real peers (listed, each with a probe, in scripts/test-deps.sh)
# and a Python virtual environment (.venv) with the independent AES-XTS oracle (the
# `cryptography` package) and moto, an AWS KMS API server on loopback. The VM tests
# (tests/tests/vm.rs) boot a Debian kernel under qemu with our release binaries;
# tests/vm/build-rig.sh fetches the kernel, qemu and the guest tools with `apt-get download`
# into ~/.cache/cryptnbd-vm (CRYPTNBD_VM_CACHE), installing nothing.
#
# Every test binary runs even after a failure (--no-fail-fast); the script still exits non-zero.
# Each phase prints how long it took; CI allows 90 minutes and this command aims for under 60
# on a fresh machine.
# Usage: scripts/test-all.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

t_start=$SECONDS
t_phase=$SECONDS
phase_name=
timings=()
phase() {
  local now=$SECONDS
  if [[ -n $phase_name ]]; then
    timings+=("$(printf '%5d s  %s' $((now - t_phase)) "$phase_name")")
    echo "== ($((now - t_phase)) s) $phase_name: done"
  fi
  phase_name=$1
  t_phase=$now
  [[ -n $phase_name ]] && echo "== $phase_name"
  return 0
}
summary() {
  local rc=$?
  phase ""
  echo "== phase times"
  printf '%s\n' "${timings[@]}"
  printf '%5d s  total (exit %d)\n' $((SECONDS - t_start)) "$rc"
}
trap summary EXIT

# shellcheck source=scripts/test-deps.sh
source scripts/test-deps.sh

# Runs a probe the way a test uses the thing: from /, with Debian's directories first on PATH.
probe() {
  (cd / && PATH="/usr/bin:/bin:/usr/sbin:/sbin:$PATH" bash -c "$1") </dev/null >/dev/null 2>&1
}

# 1. Debian packages: first, before the venv, pip or any build.
phase "checking the tools the tests use (scripts/test-deps.sh)"
need_pkgs=()
for entry in "${TEST_DEPS[@]}"; do
  pkg=${entry%%|*} check=${entry#*|}
  if ! probe "$check"; then
    echo "   missing: \`$check\` fails (Debian package $pkg)"
    [[ " ${need_pkgs[*]} " == *" $pkg "* ]] || need_pkgs+=("$pkg")
  fi
done
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
if ((${#need_pkgs[@]})); then
  phase "installing ${need_pkgs[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
elif ! apt-cache policy linux-image-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
  # The VM rig downloads the kernel and qemu packages: apt needs its package lists.
  phase "apt-get update (the VM rig downloads Debian packages)"
  $SUDO apt-get update -q
fi
phase "checking every tool again after the install"
broken=0
for entry in "${TEST_DEPS[@]}"; do
  pkg=${entry%%|*} check=${entry#*|}
  if ! probe "$check"; then
    echo "error: \`$check\` still fails after installing the Debian package $pkg" >&2
    broken=1
  fi
done
((broken == 0)) || { echo "error: the tests cannot run without the tools above" >&2; exit 1; }

# 2. The Python virtual environment: the AES-XTS oracle and the AWS KMS peer.
phase "python virtual environment (.venv)"
[[ -x .venv/bin/python ]] || /usr/bin/python3 -m venv .venv
for entry in "${TEST_VENV_PROBES[@]}"; do
  req=${entry%%|*} check=${entry#*|}
  if ! (cd / && "$root/.venv/bin/python" -c "$check") >/dev/null 2>&1; then
    echo "   pip install $req"
    .venv/bin/pip install -q "$req"
  fi
  (cd / && "$root/.venv/bin/python" -c "$check") >/dev/null 2>&1 ||
    { echo "error: .venv/bin/python cannot \`$check\` after \`pip install $req\`" >&2; exit 1; }
done
export CRYPTNBD_TEST_PYTHON="$root/.venv/bin/python"

# 3. Static checks.
phase "cargo fmt --check"
cargo fmt --all -- --check
rustfmt --check --edition 2024 fuzz/fuzz_targets/*.rs fuzz/src/*.rs
phase "import cycles (scripts/check-import-cycles.py)"
/usr/bin/python3 scripts/check-import-cycles.py --self-test
/usr/bin/python3 scripts/check-import-cycles.py
phase "crates that must not link the AWS SDK (cryptnbdctl, daemon-config)"
for crate in ctl daemon-config; do
  if cargo tree -q -p "$crate" -e normal --prefix none | grep -q '^aws-sdk-'; then
    echo "$crate links the AWS SDK (docs/architecture.md says it must not)" >&2
    exit 1
  fi
done
phase "cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings

# 4. Builds the tests run.
phase "cargo build (binaries used by the end-to-end tests)"
cargo build --workspace --bins -q
phase "cargo build --release (the binaries the VM tests put in the guest)"
cargo build --release -q -p daemon -p ctl

# 5. Every test binary, even after a failure.
phase "cargo test --no-fail-fast"
cargo test --workspace --no-fail-fast "$@"

# 6. The fuzz targets, 15 seconds each from their committed seeds (the long campaigns are
# scripts/fuzz.sh by hand, docs/reliability.md). Nightly and cargo-fuzz are installed if
# missing.
if [[ " $* " != *" --no-run "* ]]; then
  phase "fuzz targets, 15 s each (scripts/fuzz.sh)"
  scripts/fuzz.sh -t 15
fi
