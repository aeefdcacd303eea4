#!/usr/bin/env bash
# The main job on the embedded default: the local KMS, a master key, an encrypted demo volume,
# and what standard tools see of it. (The NBD daemon lands with the next milestone; until
# then the demo works offline.) State goes to $CRYPTNBD_STATE_DIR, default ./demo-state.
set -euo pipefail
cd "$(dirname "$0")/.."
export CRYPTNBD_STATE_DIR="${CRYPTNBD_STATE_DIR:-$PWD/demo-state}"

echo "== building cryptnbdctl (release)"
cargo build --release -q -p ctl
ctl=target/release/cryptnbdctl

if ! "$ctl" kms describe-key alias/demo >/dev/null 2>&1; then
  "$ctl" kms create-key --alias alias/demo --description "cryptnbd demo key"
fi
if [[ ! -e "$CRYPTNBD_STATE_DIR/volumes/demo.luks" ]]; then
  "$ctl" create demo --size 1G --kms-key alias/demo \
    --sid S-1-5-21-277731876-1789304096-451871588-1107 --directory d-1234abcd01 \
    --context classification=demo
fi
echo
echo "== cryptnbdctl inspect demo"
"$ctl" inspect demo
vol="$CRYPTNBD_STATE_DIR/volumes/demo.luks"
echo
if command -v cryptsetup >/dev/null 2>&1; then
  echo "== cryptsetup luksDump $vol (standard tools read our header)"
  cryptsetup luksDump "$vol"
else
  echo "(install cryptsetup-bin to see 'cryptsetup luksDump $vol' read the same header)"
fi
echo
echo "State: $CRYPTNBD_STATE_DIR (keystore/ holds the master keys: back it up with"
echo "  $ctl kms backup --to FILE)"
