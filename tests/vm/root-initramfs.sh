#!/usr/bin/env bash
# Builds an initramfs for the rig's kernel inside the cached Debian root of
# tests/vm/build-root.sh, with extra files laid over the root first (the product's hooks,
# its configuration and binaries, later): the way a user's own system would build it, with
# initramfs-tools (`update-initramfs`) or dracut (`dracut --no-hostonly --omit ifcfg`,
# dracut-core and dracut-network are in the root). The cached tree is never written: the
# build runs in an overlay mount (the tree read-only below, a scratch directory above), with
# /proc, /sys and /dev mounted in it, and everything is unmounted and the scratch removed on
# every way out.
#
# Usage: tests/vm/root-initramfs.sh ROOT_TREE OUT TOOL [FILES_DIR] [-- ARGS...]
#   ROOT_TREE  ROOT_TREE of the root.env that build-root.sh wrote
#   OUT        the initramfs to write (replaced if it exists)
#   TOOL       initramfs-tools | dracut
#   FILES_DIR  a directory whose tree is copied over the root before the build
#   ARGS       more arguments for update-initramfs or dracut (e.g. `-a cryptnbd`)
# Needs root (mounts, chroot) and overlayfs.
set -euo pipefail

say() { echo "root-initramfs: $*" >&2; }
die() {
  echo "root-initramfs: error: $*" >&2
  exit 1
}

[[ $# -ge 3 ]] || die "usage: $0 ROOT_TREE OUT TOOL [FILES_DIR] [-- ARGS...]"
TREE=$1
OUT=$2
TOOL=$3
shift 3
FILES=""
if [[ $# -gt 0 && $1 != -- ]]; then
  FILES=$1
  shift
fi
[[ $# -eq 0 || $1 == -- ]] || die "unexpected argument $1 (builder arguments go after --)"
[[ $# -eq 0 ]] || shift
[[ $(id -u) -eq 0 ]] || die "needs root (an overlay mount, chroot)"
[[ -x $TREE/lib/systemd/systemd ]] || die "$TREE is not a root made by build-root.sh (no lib/systemd/systemd)"
[[ -z $FILES || -d $FILES ]] || die "$FILES is not a directory"
case $TOOL in initramfs-tools | dracut) ;; *) die "TOOL is initramfs-tools or dracut, not $TOOL" ;; esac
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null ||
  die "the host kernel has no overlayfs (overlay in /proc/filesystems)"
mapfile -t kvers < <(ls "$TREE/usr/lib/modules")
[[ ${#kvers[@]} -eq 1 ]] || die "expected one kernel in $TREE/usr/lib/modules, found: ${kvers[*]}"
KVER=${kvers[0]}

t0=$EPOCHREALTIME
SCRATCH=$(mktemp -d "$(dirname "$OUT")/.root-initramfs.XXXXXX")
ROOT=$SCRATCH/root
MOUNTED=()
cleanup() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" ||
      echo "root-initramfs: warning: cannot unmount ${MOUNTED[$i]}" >&2
  done
  MOUNTED=()
  # Never remove a scratch directory with something still mounted in it.
  if findmnt -rn -o TARGET | awk -v d="$SCRATCH" 'index($0, d "/") == 1 {found = 1} END {exit !found}'; then
    echo "root-initramfs: warning: something is still mounted under $SCRATCH: left in place" >&2
  else
    rm -rf "$SCRATCH"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$SCRATCH/upper" "$SCRATCH/work" "$ROOT"
if [[ -n $FILES ]]; then
  cp -a "$FILES/." "$SCRATCH/upper/"
fi
mount -t overlay overlay -o "lowerdir=$TREE,upperdir=$SCRATCH/upper,workdir=$SCRATCH/work" "$ROOT"
MOUNTED+=("$ROOT")
mount -t proc proc "$ROOT/proc"
MOUNTED+=("$ROOT/proc")
mount -t sysfs sysfs "$ROOT/sys"
MOUNTED+=("$ROOT/sys")
mount --bind /dev "$ROOT/dev"
MOUNTED+=("$ROOT/dev")

log=$SCRATCH/build.log
case $TOOL in
  initramfs-tools)
    built=$ROOT/boot/initrd.img-$KVER
    rm -f "$built"
    chroot "$ROOT" update-initramfs -c -k "$KVER" "$@" >"$log" 2>&1 || {
      cat "$log" >&2
      die "update-initramfs failed in the root (its output is above)"
    }
    ;;
  dracut)
    built=$ROOT/tmp/initrd.dracut
    # ifcfg (dracut-network's, for Red Hat's network scripts) is omitted: a --no-hostonly
    # build takes every module whose check passes, and ifcfg's pulls in `network`, whose
    # handler here would be systemd-networkd, which cannot be installed without D-Bus. A
    # build that wants the network names its handler (`-a network-legacy`).
    chroot "$ROOT" dracut --force --no-hostonly --omit ifcfg --kver "$KVER" "$@" /tmp/initrd.dracut >"$log" 2>&1 || {
      cat "$log" >&2
      die "dracut failed in the root (its output is above)"
    }
    ;;
esac
[[ -s $built ]] || die "$TOOL wrote no image"
# The builder's mode is kept (UMASK=0077 makes it 0600: a test may check it).
cp --preserve=mode "$built" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
say "$TOOL: $OUT ($(du -h "$OUT" | cut -f1)) in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}') s"
