#!/bin/sh
# cryptnbd's dracut unlock job, queued by cryptnbd-cmdline.sh: `cryptnbdctl initramfs unlock`
# maps (or attaches) the root; a failure stops the boot with its one sentence (an emergency
# shell with rd.shell).

# shellcheck disable=SC1091 # dracut's own
. /lib/dracut-lib.sh
CRYPTNBDCTL=cryptnbdctl
# shellcheck disable=SC1091 # written by the module at build time
[ -f /etc/cryptnbd/initramfs.env ] && . /etc/cryptnbd/initramfs.env

modprobe -q dm_crypt 2>/dev/null
modprobe -q nbd 2>/dev/null
mkdir -p /run/cryptnbd-root
if "$CRYPTNBDCTL" initramfs unlock >/run/cryptnbd-root/device 2>/run/cryptnbd-root/unlock.err; then
  exit 0
fi
die "cryptnbd: $(sed -e 's/^cryptnbdctl: error: //' -e 's/^  caused by: /  /' /run/cryptnbd-root/unlock.err)"
