#!/usr/bin/env bash
# Runs every test of cryptnbd on a fresh Debian 12 machine, installing what the tests need:
# the Debian packages of the real peers (cryptsetup, ...) and a Python virtual environment
# with the independent AES-XTS oracle (the `cryptography` package) and moto, an AWS KMS API
# server on loopback. The VM tests (tests/tests/vm.rs) boot a Debian kernel under qemu with
# our release binaries; tests/vm/build-rig.sh fetches the kernel, qemu and the guest tools
# with `apt-get download` into ~/.cache/cryptnbd-vm (CRYPTNBD_VM_CACHE), installing nothing.
# Usage: scripts/test-all.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v cryptsetup >/dev/null 2>&1 || need_pkgs+=(cryptsetup-bin)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v mkfs.xfs >/dev/null 2>&1 || need_pkgs+=(xfsprogs)
command -v losetup >/dev/null 2>&1 || need_pkgs+=(mount)
command -v nbdinfo >/dev/null 2>&1 || need_pkgs+=(libnbd-bin)
command -v nbdfuse >/dev/null 2>&1 || need_pkgs+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need_pkgs+=(python3-libnbd)
command -v fio >/dev/null 2>&1 || need_pkgs+=(fio)
command -v qemu-io >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
[[ -x /usr/bin/python3 ]] || need_pkgs+=(python3)
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
# systemd-nspawn runs the daemon under its unit with systemd as PID 1 (tests/tests/systemd_units.rs).
command -v systemd-nspawn >/dev/null 2>&1 || need_pkgs+=(systemd-container)
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
if ((${#need_pkgs[@]})); then
  echo "== installing ${need_pkgs[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_pkgs[@]}"
elif ! apt-cache policy linux-image-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
  # The VM rig downloads the kernel and qemu packages: apt needs its package lists.
  echo "== apt-get update (the VM rig downloads Debian packages)"
  $SUDO apt-get update -q
fi

# The AES-XTS oracle: Python `cryptography` in a project-local virtual environment.
if ! .venv/bin/python -c 'import cryptography' >/dev/null 2>&1; then
  echo "== creating .venv with the cryptography package"
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q 'cryptography>=42'
fi
# The AWS KMS API server for the AWS backend's tests: moto (with boto3 to set it up).
if ! .venv/bin/python -c 'import moto.server, boto3' >/dev/null 2>&1; then
  echo "== installing moto[server] into .venv"
  .venv/bin/pip install -q 'moto[server]>=5,<6'
fi
export CRYPTNBD_TEST_PYTHON="$PWD/.venv/bin/python"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== cargo build (binaries used by the end-to-end tests)"
cargo build --workspace --bins -q
echo "== cargo build --release (the binaries the VM tests put in the guest)"
cargo build --release -q -p daemon -p ctl
echo "== cargo test"
cargo test --workspace "$@"
