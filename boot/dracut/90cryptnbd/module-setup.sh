#!/bin/bash
# cryptnbd's dracut module: unlocks an encrypted root on a cryptnbd volume at boot
# (docs/root-volume.md). Installed as /usr/lib/dracut/modules.d/90cryptnbd/. Included when
# /etc/cryptnbd/root.toml exists; `cryptnbdctl initramfs prepare` copies the root
# configuration and what its KMS needs, and names the programs to install.

# shellcheck disable=SC2154 # initdir, moddir: dracut's own variables

CONFIG=${CRYPTNBD_ROOT_CONFIG:-/etc/cryptnbd/root.toml}

check() {
  [[ -f $CONFIG ]] || return 255
  require_binaries cryptnbdctl || return 1
  return 0
}

depends() {
  local deps=dm
  # A KMS on the network (AWS): dracut brings the network up (ip=, rd.neednet=1) with
  # network-legacy (Debian's dracut-network package). The unlock is an `initqueue --online`
  # job, which dracut 059 runs from network-legacy, network-manager or connman, never from
  # systemd-networkd, which its `network` module would pick on a system with systemd.
  if grep -Eq '^[[:space:]]*backend[[:space:]]*=[[:space:]]*"aws"' "$CONFIG"; then
    deps="$deps network-legacy"
  fi
  # A sealed keystore's passphrase is asked through systemd's password agents where systemd
  # runs the initramfs (dracut-initqueue has no console of its own).
  if command -v systemd-tty-ask-password-agent >/dev/null 2>&1; then
    deps="$deps systemd-ask-password"
  fi
  echo "$deps"
}

installkernel() {
  instmods dm_mod dm_crypt xts aes_generic nbd
  hostonly='' instmods aesni_intel
}

install() {
  local ctl plan word network=
  ctl=$(command -v cryptnbdctl)
  if ! plan=$("$ctl" initramfs prepare --dest "$initdir" --config "$CONFIG"); then
    dfatal "cryptnbd: cryptnbdctl initramfs prepare failed: the image would not unlock the root"
    return 1
  fi
  for word in $(echo "$plan" | sed -n 's/^program //p'); do
    inst_binary "$word"
  done
  echo "$plan" | grep -qx network && network=y
  inst_multiple -o systemd-ask-password
  mkdir -p "$initdir/etc/cryptnbd"
  {
    echo "CRYPTNBDCTL=$ctl"
    echo "CRYPTNBD_NETWORK=$network"
  } >"$initdir/etc/cryptnbd/initramfs.env"
  inst_hook cmdline 90 "$moddir/cryptnbd-cmdline.sh"
  inst_script "$moddir/cryptnbd-unlock.sh" /sbin/cryptnbd-unlock.sh
  dracut_need_initqueue
}
