#!/bin/sh
# cryptnbd's dracut cmdline hook: when cryptnbd.root= names the root, the root is the device
# the unlock makes, and the unlock is queued to run once udev has settled (or the network is
# online, for a KMS on the network). Sourced by dracut-cmdline.

# shellcheck disable=SC1091 # written by the module at build time
[ -f /etc/cryptnbd/initramfs.env ] && . /etc/cryptnbd/initramfs.env

if getarg cryptnbd.root= >/dev/null; then
  case "$(getarg cryptnbd.mode=)" in
    nbd) cryptnbd_dev=/dev/nbd0 ;;
    *) cryptnbd_dev=/dev/mapper/cryptnbd-root ;;
  esac
  # shellcheck disable=SC2034 # dracut's own variables, read after this hook
  root="block:$cryptnbd_dev"
  # shellcheck disable=SC2034
  rootok=1
  wait_for_dev -n "$cryptnbd_dev"
  if [ -n "$CRYPTNBD_NETWORK" ]; then
    /sbin/initqueue --online --onetime --unique --name cryptnbd-unlock /sbin/cryptnbd-unlock.sh
  else
    /sbin/initqueue --settled --onetime --unique --name cryptnbd-unlock /sbin/cryptnbd-unlock.sh
  fi
fi
