#!/usr/bin/env bash
# Makes an ext4 root image for the VM rig's root-boot tests: the cached Debian root of
# tests/vm/build-root.sh copied in with the host's `mke2fs -d`, then the test's own files
# added with `debugfs -w` (the cached tree itself is never changed):
#   /usr/local/sbin/cryptnbd-test                  tests/vm/root/cryptnbd-test
#   /etc/systemd/system/cryptnbd-test.service      tests/vm/root/cryptnbd-test.service
#   /etc/systemd/system/multi-user.target.wants/cryptnbd-test.service -> the unit
# and, when OVERLAY is given, every directory, file and symlink under it, at the same path
# (a file keeps its mode; for a test that needs more on the real root, such as the product's
# binaries and units).
# The image is checked with `e2fsck -fn` before it is handed over.
#
# Usage: tests/vm/root-image.sh ROOT_TREE IMAGE SIZE [OVERLAY]
#   ROOT_TREE  ROOT_TREE of the root.env that build-root.sh wrote
#   IMAGE      the image file to create (must not exist)
#   SIZE       its size, as mke2fs takes it (512M, 1G)
#   OVERLAY    a directory whose tree is added to the image's /
set -euo pipefail

say() { echo "root-image: $*" >&2; }
die() {
  echo "root-image: error: $*" >&2
  exit 1
}

[[ $# -eq 3 || $# -eq 4 ]] || die "usage: $0 ROOT_TREE IMAGE SIZE [OVERLAY]"
TREE=$1
IMG=$2
SIZE=$3
OVERLAY=${4:-}
[[ -z $OVERLAY || -d $OVERLAY ]] || die "the overlay $OVERLAY is not a directory"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$HERE/root
[[ -x $TREE/lib/systemd/systemd ]] || die "$TREE is not a root made by build-root.sh (no lib/systemd/systemd)"
[[ ! -e $IMG ]] || die "$IMG exists already"
[[ -x $SRC/cryptnbd-test && -f $SRC/cryptnbd-test.service ]] || die "$SRC lacks cryptnbd-test or cryptnbd-test.service"
for t in mke2fs:e2fsprogs debugfs:e2fsprogs e2fsck:e2fsprogs; do
  command -v "${t%%:*}" >/dev/null 2>&1 || die "the host tool \`${t%%:*}\` is missing: install the Debian package ${t#*:}"
done

t0=$EPOCHREALTIME
out=$(mke2fs -q -F -t ext4 -L cryptnbd-root -d "$TREE" "$IMG" "$SIZE" 2>&1) ||
  die "mke2fs -d $TREE $IMG $SIZE failed: $out"

unit=/etc/systemd/system/cryptnbd-test.service
cmds=()
declare -A made=()
for d in /usr/local /usr/local/sbin /etc/systemd/system /etc/systemd/system/multi-user.target.wants; do
  [[ -d $TREE$d ]] || { cmds+=("mkdir $d"); made[$d]=1; }
done
cmds+=(
  "write $SRC/cryptnbd-test /usr/local/sbin/cryptnbd-test"
  "set_inode_field /usr/local/sbin/cryptnbd-test mode 0100755"
  "write $SRC/cryptnbd-test.service $unit"
  "set_inode_field $unit mode 0100644"
  "symlink /etc/systemd/system/multi-user.target.wants/cryptnbd-test.service $unit"
)
if [[ -n $OVERLAY ]]; then
  # Parents before children (find's pre-order); debugfs takes no quoting, so no spaces.
  while IFS= read -r -d '' p; do
    rel=${p#"$OVERLAY"}
    [[ $rel != *' '* ]] || die "the overlay's path $rel has a space (debugfs cannot take it)"
    if [[ -L $p ]]; then
      cmds+=("symlink $rel $(readlink "$p")")
    elif [[ -d $p ]]; then
      [[ -d $TREE$rel || -n ${made[$rel]:-} ]] || { cmds+=("mkdir $rel"); made[$rel]=1; }
    elif [[ -f $p ]]; then
      [[ ! -e $TREE$rel ]] || cmds+=("rm $rel")
      cmds+=("write $p $rel" "set_inode_field $rel mode 0100$(stat -c %a "$p")")
    else
      die "the overlay's $rel is neither a directory, a file nor a symlink"
    fi
  done < <(find "$OVERLAY" -mindepth 1 -print0)
fi
log=$(printf '%s\n' "${cmds[@]}" | debugfs -w -f - "$IMG" 2>&1) || die "debugfs -w $IMG failed: $log"
# debugfs reports a failed command on its output and still exits 0.
if grep -Ev '^(debugfs [0-9.]+ \(|debugfs: |Allocated inode: )' <<<"$log" | grep -q .; then
  die "debugfs could not add the test's files to $IMG: $log"
fi
check=$(debugfs -R "stat /usr/local/sbin/cryptnbd-test" "$IMG" 2>/dev/null)
grep -q 'Mode:  0755' <<<"$check" || die "/usr/local/sbin/cryptnbd-test is not mode 0755 in $IMG: $check"
out=$(e2fsck -fn "$IMG" 2>&1) || die "e2fsck -fn $IMG found errors: $out"
say "$IMG ($SIZE) in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}') s"
