#!/usr/bin/env bash
# Builds the Debian 12 root filesystem of the VM rig's root-boot tests, and an initramfs
# for the rig's kernel made inside it by Debian's own initramfs-tools: a guest that boots
# the stock way (the kernel, the initramfs, systemd 252 as PID 1 on an ext4 root).
#
# The root is a bookworm "minbase" made by mmdebstrap, which is fetched with `apt-get
# download` and run unpacked (nothing is installed on the host), with systemd-sysv, udev,
# kmod, initramfs-tools, busybox, zstd, e2fsprogs, cryptsetup-bin, nbd-client, dracut-core
# (dracut's tools beside initramfs-tools; dracut itself would replace initramfs-tools, and
# only in the root, never on the host), dracut-network and procps (dracut's network modules;
# network-legacy needs dhclient and pgrep: for a KMS reached over the network at boot) and
# ca-certificates. The units that slow a boot under
# emulation or wait for a console are masked. The rig's kernel (build-rig.sh keeps its
# config and the modules listed there, in KERNEL_TREE) goes into /usr/lib/modules/KVER with
# depmod run in the root; `update-initramfs` then builds the initramfs in the root (with
# /proc, /sys and /dev mounted in it while it runs), MODULES=list, UMASK=0077.
#
# Both are cached in `${CRYPTNBD_VM_CACHE:-$HOME/.cache/cryptnbd-vm}/root-KEY`, KEY being a
# hash of this script, the kernel tree and the versions apt offers (the host's package lists)
# of the packages named above; one build at a time (flock, the lock build-rig.sh takes), and
# an older root-* is removed when a new one is complete. Test-specific files never go into
# the cached tree: tests/vm/root-image.sh copies the tree into an ext4 image and adds them.
#
# Usage: tests/vm/build-root.sh RIG_ENV OUTDIR
#   RIG_ENV  the rig.env written by tests/vm/build-rig.sh (KERNEL_RELEASE, KERNEL_TREE)
#   OUTDIR   where root.env is written (created if needed)
# root.env holds KEY=VALUE lines: ROOT_TREE (the cached tree, read-only for its users),
# ROOT_INITRD (the initramfs), ROOT_KERNEL_RELEASE, ROOT_BUILD_SECONDS and
# ROOT_INITRD_SECONDS (what the build of each took, 0 when it came from the cache).
#
# Needs root: mmdebstrap's root mode, chroot and the mounts of the initramfs build.
set -euo pipefail

SUITE=bookworm
MIRRORS=(
  "deb http://deb.debian.org/debian bookworm main"
  "deb http://deb.debian.org/debian bookworm-updates main"
  "deb http://deb.debian.org/debian-security bookworm-security main"
)
PACKAGES=(systemd-sysv udev kmod initramfs-tools busybox zstd e2fsprogs cryptsetup-bin
  nbd-client dracut-core dracut-network procps ca-certificates)
# What the initramfs loads (MODULES=list; their dependencies come along): the virtio PCI
# bus, disk and NIC; ext4 and the crc32c it asks the crypto API for; dm-crypt with xts and
# the AES-NI cipher; the kernel NBD client.
INITRD_MODULES=(virtio_pci virtio_blk virtio_net ext4 crc32c_generic dm_crypt xts aesni_intel nbd)
# Units that a test boot under emulation does not want: consoles to log in on (the tests
# read the serial log and type on it only when asked; Debian's getty-static fails without
# D-Bus), periodic jobs, first-boot jobs that
# rebuild caches (hwdb, ldconfig) for seconds of emulated CPU, logind (no D-Bus in a
# minbase root: it would fail and restart), and dracut's shutdown unit (it unpacks
# /boot/initrd.img-KVER at shutdown, and there is none in /boot).
MASKED="getty@.service serial-getty@.service console-getty.service getty-static.service
 apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer
 e2scrub_reap.service systemd-pstore.service systemd-firstboot.service
 systemd-hwdb-update.service ldconfig.service systemd-logind.service dracut-shutdown.service"

say() { echo "build-root: $*" >&2; }
# Seconds since START (an $EPOCHREALTIME), to a tenth.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}'; }
die() {
  echo "build-root: error: $*" >&2
  exit 1
}

[[ $# -eq 2 ]] || die "usage: $0 RIG_ENV OUTDIR"
RIG_ENV=$1
OUT=$2
[[ $(id -u) -eq 0 ]] || die "needs root (mmdebstrap --mode=root, chroot, mounts)"
[[ -f $RIG_ENV ]] || die "$RIG_ENV is missing: run tests/vm/build-rig.sh first"
rig_value() {
  awk -F= -v k="$1" '$1 == k {sub(/^[^=]*=/, ""); print; exit}' "$RIG_ENV"
}
KVER=$(rig_value KERNEL_RELEASE)
KTREE=$(rig_value KERNEL_TREE)
[[ -n $KVER && -n $KTREE ]] || die "$RIG_ENV has no KERNEL_RELEASE or KERNEL_TREE: rebuild the rig with the current tests/vm/build-rig.sh"
[[ -f $KTREE/boot/config-$KVER && -d $KTREE/lib/modules/$KVER ]] ||
  die "$KTREE lacks boot/config-$KVER or lib/modules/$KVER"

need_tool() {
  command -v "$1" >/dev/null 2>&1 || die "the host tool \`$1\` is missing: install the Debian package $2"
}
need_tool apt-get apt
need_tool apt-cache apt
need_tool dpkg dpkg
need_tool perl perl-base
need_tool python3 python3
need_tool chroot coreutils
need_tool mount mount
need_tool umount mount
need_tool findmnt util-linux
need_tool flock util-linux
need_tool tar tar
need_tool sha256sum coreutils
# mmdebstrap's root mode needs apt's keyring for the archive's signatures.
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] ||
  die "/usr/share/keyrings/debian-archive-keyring.gpg is missing: install the Debian package debian-archive-keyring"

CACHE=${CRYPTNBD_VM_CACHE:-$HOME/.cache/cryptnbd-vm}
mkdir -p "$CACHE" "$OUT"
CACHE=$(cd "$CACHE" && pwd)
OUT=$(cd "$OUT" && pwd)
# One build at a time, and none while build-rig.sh replaces the rig whose kernel tree this
# copies: the same lock.
exec 9>"$CACHE/.lock"
flock 9

t0=$EPOCHREALTIME
# The key: this script, the kernel tree, and the versions of the packages named above as
# the host's apt lists give them (a point release of systemd or cryptsetup rebuilds).
versions=$(apt-cache policy "${PACKAGES[@]}" 2>/dev/null |
  awk '/^[^ ]/ {p = $1} $1 == "Candidate:" {print p, $2}')
[[ -n $versions ]] || die "apt-cache knows none of: ${PACKAGES[*]} (run \`apt-get update\`)"
KEY=$(
  {
    sha256sum "${BASH_SOURCE[0]}" | cut -c1-64
    echo "$KVER"
    (cd "$KTREE" && find . -type f -printf '%P %s\n' | LC_ALL=C sort)
    echo "$versions"
  } | sha256sum | cut -c1-16
)
ROOT=$CACHE/root-$KEY
TREE=$ROOT/tree
INITRD=$ROOT/initrd.img-$KVER

# Nothing may be mounted under a tree that is about to be removed (a /dev bind mount would
# take the host's /dev with it).
assert_unmounted() {
  local dir=$1
  if findmnt -rn -o TARGET | awk -v d="$dir" 'index($0, d "/") == 1 || $0 == d {found = 1} END {exit !found}'; then
    die "something is still mounted under $dir (see findmnt): not removing it"
  fi
}
remove_tree() {
  [[ -e $1 ]] || return 0
  assert_unmounted "$1"
  rm -rf "$1"
}

# ---------------------------------------------------------------------------------------------
# 1. The root tree
# ---------------------------------------------------------------------------------------------
build_tree() {
  local tmp=$ROOT.tmp
  remove_tree "$tmp"
  mkdir -p "$tmp/mmdebstrap"
  say "fetching mmdebstrap with apt-get download"
  if ! (cd "$tmp/mmdebstrap" && apt-get download mmdebstrap 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2); then
    die "apt-get download mmdebstrap failed (see above): check the network and run \`apt-get update\`"
  fi
  dpkg -x "$tmp"/mmdebstrap/mmdebstrap_*.deb "$tmp/mmdebstrap/root"
  local mm=$tmp/mmdebstrap/root/usr/bin
  [[ -f $mm/mmdebstrap && -f $mm/mmtarfilter ]] || die "the unpacked mmdebstrap package has no usr/bin/mmdebstrap or mmtarfilter"
  say "mmdebstrap $SUITE minbase into $tmp/tree with: ${PACKAGES[*]}"
  # mmdebstrap runs its helper mmtarfilter from PATH. Documentation and translations are
  # left out (a smaller image to copy per test), the copyright files kept.
  if ! PATH=$mm:$PATH perl "$mm/mmdebstrap" --mode=root --variant=minbase \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$tmp/tree" "${MIRRORS[@]}" >"$tmp/mmdebstrap.log" 2>&1; then
    tail -n 30 "$tmp/mmdebstrap.log" >&2
    die "mmdebstrap failed (the end of its log is above; all of it in $tmp/mmdebstrap.log)"
  fi
  assert_unmounted "$tmp/tree"
  local tree=$tmp/tree u
  [[ -x $tree/lib/systemd/systemd && -x $tree/usr/sbin/update-initramfs ]] ||
    die "the new root lacks systemd or update-initramfs"

  # Boot configuration.
  for u in $MASKED; do
    ln -sfn /dev/null "$tree/etc/systemd/system/$u"
  done
  echo cryptnbd-vm >"$tree/etc/hostname"
  # A fixed machine id: no first-boot setup, and the same id on every boot of an image.
  echo "$KEY$KEY" >"$tree/etc/machine-id"
  # / is whatever the kernel was told (root=): /dev/vda, /dev/mapper/cryptnbd-root,
  # /dev/nbd0. Pass 1: the initramfs checks it before mounting (its fsck hook reads this
  # line), and systemd, seeing that, does not check it again.
  printf '%s\n' '# <file system> <mount point> <type> <options> <dump> <pass>' \
    '/dev/root / ext4 defaults,errors=remount-ro 0 1' >"$tree/etc/fstab"
  # No root password: a login on the console (when a test types on it) or systemd's
  # emergency shell needs no secret.
  chroot "$tree" passwd -d root >/dev/null

  # The rig's kernel: its config (mkinitramfs reads it) and modules, then depmod.
  cp "$KTREE/boot/config-$KVER" "$tree/boot/"
  mkdir -p "$tree/usr/lib/modules"
  cp -a "$KTREE/lib/modules/$KVER" "$tree/usr/lib/modules/"
  chroot "$tree" depmod "$KVER"

  # initramfs-tools: only the listed modules (MODULES=dep would look at the build host's
  # devices), busybox, zstd, an image only root can read; the root is ext4 (the fsck hook
  # cannot tell from /dev/root in fstab, so it is said here).
  mkdir -p "$tree/etc/initramfs-tools/conf.d"
  cat >"$tree/etc/initramfs-tools/conf.d/cryptnbd-vm.conf" <<'EOF'
# The VM rig's initramfs (tests/vm/build-root.sh).
MODULES=list
FSTYPE=ext4
BUSYBOX=y
COMPRESS=zstd
COMPRESSLEVEL=1
UMASK=0077
EOF
  printf '%s\n' "# The VM rig's modules (tests/vm/build-root.sh)." "${INITRD_MODULES[@]}" \
    >"$tree/etc/initramfs-tools/modules"

  rm -rf "$tmp/mmdebstrap"
  touch "$tmp/.tree-complete"
  remove_tree "$ROOT"
  mv "$tmp" "$ROOT"
}

# ---------------------------------------------------------------------------------------------
# 2. The initramfs, built in the root by update-initramfs
# ---------------------------------------------------------------------------------------------
MOUNTED=()
unmount_all() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" ||
      echo "build-root: warning: cannot unmount ${MOUNTED[$i]}" >&2
  done
  MOUNTED=()
}
trap unmount_all EXIT
trap 'unmount_all; exit 130' INT TERM

build_initrd() {
  local tree=$TREE
  rm -f "$INITRD" "$ROOT/.initrd-complete"
  mount -t proc proc "$tree/proc"
  MOUNTED+=("$tree/proc")
  mount -t sysfs sysfs "$tree/sys"
  MOUNTED+=("$tree/sys")
  mount --bind /dev "$tree/dev"
  MOUNTED+=("$tree/dev")
  local log=$ROOT/update-initramfs.log
  if ! chroot "$tree" update-initramfs -c -k "$KVER" >"$log" 2>&1; then
    unmount_all
    cat "$log" >&2
    die "update-initramfs in the root failed (its output is above)"
  fi
  unmount_all
  assert_unmounted "$tree"
  local built=$tree/boot/initrd.img-$KVER
  [[ -s $built ]] || die "update-initramfs wrote no /boot/initrd.img-$KVER"
  local mode
  mode=$(stat -c %a "$built")
  [[ $mode == 600 ]] || die "the initramfs is mode $mode, UMASK=0077 asked for 600"
  # The image goes beside the tree, not into the root images made from it.
  mv "$built" "$INITRD"
  touch "$ROOT/.initrd-complete"
}

tree_secs=0
if [[ -f $ROOT/.tree-complete ]]; then
  say "cached root $TREE"
else
  t=$EPOCHREALTIME
  build_tree
  tree_secs=$(since "$t")
  say "built the root in $tree_secs s: $(du -sh "$TREE" | cut -f1) in $TREE"
fi
initrd_secs=0
if [[ -f $ROOT/.initrd-complete ]]; then
  say "cached initramfs $INITRD"
else
  t=$EPOCHREALTIME
  build_initrd
  initrd_secs=$(since "$t")
  say "built the initramfs in $initrd_secs s: $(du -h "$INITRD" | cut -f1) in $INITRD"
fi
# Keep the cache small: only the current root.
for old in "$CACHE"/root-*; do
  [[ $old == "$ROOT" ]] || remove_tree "$old"
done

cat >"$OUT/root.env.tmp" <<EOF
ROOT_TREE=$TREE
ROOT_INITRD=$INITRD
ROOT_KERNEL_RELEASE=$KVER
ROOT_BUILD_SECONDS=$tree_secs
ROOT_INITRD_SECONDS=$initrd_secs
EOF
mv "$OUT/root.env.tmp" "$OUT/root.env"
say "root ready in $(since "$t0") s"
