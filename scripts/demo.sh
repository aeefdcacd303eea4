#!/usr/bin/env bash
# The main job on the embedded default: the cryptnbd daemon with its local KMS, a master key,
# an encrypted 1 GiB demo volume attached and served over NBD, and how to reach it. Runs in
# the foreground until Ctrl-C (a clean shutdown: drain, flush, wipe keys).
# State goes to $CRYPTNBD_STATE_DIR (default ./demo-state), sockets to ./demo-state/run.
set -euo pipefail
cd "$(dirname "$0")/.."
state="${CRYPTNBD_STATE_DIR:-$PWD/demo-state}"
run="$state/run"
mkdir -p "$state"

echo "== building cryptnbd and cryptnbdctl (release)"
cargo build --release -q -p daemon -p ctl
bin=target/release
ctl() { "$bin/cryptnbdctl" --state-dir "$state" --socket "$run/control.sock" "$@"; }

echo "== starting cryptnbd (log: $state/cryptnbd.log)"
"$bin/cryptnbd" --state-dir "$state" --runtime-dir "$run" >"$state/cryptnbd.log" 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null; echo "cryptnbd stopped"' EXIT
for _ in $(seq 1 300); do
  ctl status >/dev/null 2>&1 && break
  kill -0 $daemon 2>/dev/null || { cat "$state/cryptnbd.log"; exit 1; }
  sleep 0.1
done

ctl kms describe-key alias/demo >/dev/null 2>&1 || ctl kms create-key --alias alias/demo --description "cryptnbd demo key"
if [[ ! -e "$state/volumes/demo.luks" ]]; then
  ctl create demo --size 1G --kms-key alias/demo \
    --sid S-1-5-21-277731876-1789304096-451871588-1107 --directory d-1234abcd01 \
    --context classification=demo
fi
ctl status demo >/dev/null 2>&1 || ctl attach demo --transient
uri="nbd+unix:///demo?socket=$run/nbd.sock"
echo
echo "== the demo volume is served at $uri"
ctl status demo
if command -v nbdinfo >/dev/null 2>&1; then
  echo
  echo "== nbdinfo"
  nbdinfo "$uri"
fi
cat <<EOM

Reach it (in another terminal):
  nbdinfo '$uri'
  qemu-img info '$uri'
  qemu-io -f raw '$uri' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  nbdcopy /path/to/image.raw '$uri'
  mkdir -p /tmp/demo-fuse && nbdfuse /tmp/demo-fuse/disk '$uri' &
      # then: losetup --find --show /tmp/demo-fuse/disk; mkfs.ext4; mount
  sudo nbd-client -unix $run/nbd.sock -N demo /dev/nbd0     # on a host with the nbd module
Control it:
  $bin/cryptnbdctl --state-dir $state --socket $run/control.sock status
  cryptsetup luksDump $state/volumes/demo.luks             # standard tools read the header
Press Ctrl-C to stop (drain, flush, wipe the key).
EOM
wait $daemon
