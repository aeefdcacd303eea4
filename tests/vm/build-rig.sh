#!/usr/bin/env bash
# Builds the VM test rig: a stock Debian kernel (which has nbd.ko and dm-crypt, unlike the
# kernels CI machines often run), qemu-system-x86_64 to boot it under emulation, and an
# initramfs with busybox, the guest tools (nbd-client, mkfs.ext4, e2fsck, cryptsetup), our
# release binaries and the guest scripts of tests/vm/guest/.
#
# Nothing is installed: packages are fetched with `apt-get download` and unpacked with
# `dpkg -x` into a cache, `${CRYPTNBD_VM_CACHE:-$HOME/.cache/cryptnbd-vm}`, keyed by the
# package versions and by this script's text (a changed script rebuilds the base). A second
# run with the same versions reuses the unpacked packages and the base initramfs, and only
# packs the overlay that holds our binaries and the guest scripts, which change every build.
#
# Usage: tests/vm/build-rig.sh OUTDIR CRYPTNBD CRYPTNBDCTL
#   OUTDIR       where initramfs.cpio.gz and rig.env are written (created if needed)
#   CRYPTNBD     the daemon to put in the guest's /bin (target/release/cryptnbd)
#   CRYPTNBDCTL  the CLI to put in the guest's /bin (target/release/cryptnbdctl)
# rig.env holds KEY=VALUE lines: QEMU, QEMU_LD_LIBRARY_PATH, QEMU_MODULE_DIR,
# QEMU_FIRMWARE_DIRS (colon-separated, for -L), KERNEL, INITRD, KERNEL_RELEASE, and
# KERNEL_TREE (the kernel's config and a subset of its modules, for tests/vm/build-root.sh).
#
# The guest's kernel modules are resolved from the `depends=` field of each module's
# .modinfo section (no depmod or kmod needed on the host).
set -euo pipefail

# The guest's modules (their dependencies are added): the kernel NBD client; ext4 and the
# crc32c implementation it asks the crypto API for at mount time; virtio-net to reach the
# host through qemu's user networking; loop devices; device-mapper and dm-crypt with the
# xts mode and the AES-NI cipher (qemu's `-cpu max` emulates AES-NI); the AF_ALG interface
# cryptsetup uses to check a cipher in the kernel.
MODULES="nbd crc32c_generic ext4 virtio_pci virtio_net loop dm_mod dm_crypt xts aesni_intel
 af_alg algif_skcipher"
# The modules kept for the Debian root of tests/vm/build-root.sh (its initramfs loads the
# first line's, the root's systemd may load the others): the same, plus the virtio disk,
# the TLS record layer (nbd-client's TLS proxy) and autofs4 (systemd asks for it at boot).
ROOT_MODULES="$MODULES virtio_blk tls autofs4"
# Packages whose binaries run on the host (qemu) or in the guest (the tools): they, and the
# library packages (lib*) they depend on that the host lacks, are fetched. qemu's firmware
# and data come from the DATA_PKGS (qemu-system-common's own libraries serve only qemu's
# optional modules: not fetched).
HOST_PKGS="qemu-system-x86 libcapstone4 libfdt1 libslirp0 libvdeplug2"
DATA_PKGS="qemu-system-common qemu-system-data seabios"
GUEST_TOOL_PKGS="busybox-static nbd-client e2fsprogs cryptsetup-bin dmsetup"
# Binaries copied into the guest, looked up in the unpacked packages first, then on the host
# (util-linux's losetup and blockdev, from the host, accept more options than busybox's).
GUEST_BINS="nbd-client mke2fs e2fsck cryptsetup dmsetup losetup blockdev"

say() { echo "build-rig: $*" >&2; }
die() {
  echo "build-rig: error: $*" >&2
  exit 1
}

[[ $# -eq 3 ]] || die "usage: $0 OUTDIR CRYPTNBD CRYPTNBDCTL"
OUT=$1
DAEMON_BIN=$2
CTL_BIN=$3
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST_SRC=$HERE/guest
for f in "$DAEMON_BIN" "$CTL_BIN"; do
  [[ -x $f ]] || die "$f is missing or not executable: build the release binaries first with \`cargo build --release -p daemon -p ctl\`"
done
[[ -f $GUEST_SRC/init ]] || die "$GUEST_SRC/init is missing"

# Host tools this script needs, with the Debian package that has each.
need_tool() {
  command -v "$1" >/dev/null 2>&1 || die "the host tool \`$1\` is missing: install the Debian package $2"
}
need_tool apt-get apt
need_tool apt-cache apt
need_tool dpkg dpkg
need_tool dpkg-query dpkg
need_tool ldd libc-bin
need_tool sha256sum coreutils
need_tool flock util-linux
need_tool find findutils
need_tool awk mawk
need_tool gzip gzip
SCRIPT_HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)

CACHE=${CRYPTNBD_VM_CACHE:-$HOME/.cache/cryptnbd-vm}
mkdir -p "$CACHE" "$OUT"
CACHE=$(cd "$CACHE" && pwd)
OUT=$(cd "$OUT" && pwd)
# One build at a time per cache (two test processes may start together).
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------------------------------------
# 1. Which packages, at which versions
# ---------------------------------------------------------------------------------------------
t0=$SECONDS
# Resolving versions costs apt-cache calls of about a second each (Debian's container images
# keep no package cache), so the result is remembered under a fingerprint of apt's package
# lists and of what dpkg has installed: the same fingerprint gives the same answer.
fingerprint() {
  {
    echo "script=$SCRIPT_HASH"
    stat -c '%n %s %Y' /var/lib/dpkg/status /var/lib/apt/lists/* 2>/dev/null
  } | sha256sum | cut -c1-16
}

# Sets KPKG (the kernel package), pins (PACKAGE=VERSION to fetch) and KEY.
resolve_packages() {
  KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  [[ -n $KPKG ]] || die "apt knows no kernel package behind linux-image-amd64: run \`apt-get update\` (as root) so apt has its package lists"
  case $KPKG in
    linux-image-6.1.*-amd64) ;;
    *) say "warning: the kernel package is $KPKG, not the Debian 12 linux-image-6.1.*-amd64 this rig was written for" ;;
  esac

  # Direct Depends/Pre-Depends of packages, real package names only (not <virtual> ones).
  pkg_deps() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
      --no-enhances "$@" 2>/dev/null |
      awk '$1 ~ /^\|?(Pre)?Depends:$/ && $2 !~ /^</ {print $2}' | sort -u
  }
  host_has() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
  }
  # The wanted packages plus the library packages (lib*) they need, transitively, keeping only
  # what the host has not installed: what the host has is taken from the host.
  wanted=" "
  todo="$KPKG $HOST_PKGS $GUEST_TOOL_PKGS"
  while [[ -n ${todo// /} ]]; do
    fresh=()
    for p in $todo; do
      [[ $wanted == *" $p "* ]] && continue
      wanted="$wanted$p "
      fresh+=("$p")
    done
    ((${#fresh[@]})) || break
    # One apt-cache call per level: each call costs about a second.
    todo=""
    for d in $(pkg_deps "${fresh[@]}"); do
      [[ $d == lib* && $d != libc6 && $wanted != *" $d "* ]] && todo="$todo $d"
    done
  done
  fetch=()
  for p in $wanted $DATA_PKGS; do
    # The kernel, qemu, busybox and the data packages are always unpacked from the archive
    # (they are not used from the host even when installed); the libraries and the guest
    # tools only when the host lacks them.
    case $p in
      "$KPKG" | qemu-system-* | seabios | busybox-static) fetch+=("$p") ;;
      *) host_has "$p" || fetch+=("$p") ;;
    esac
  done
  mapfile -t pins < <(apt-cache policy "${fetch[@]}" 2>/dev/null |
    awk '/^[^ ]/ {p = $1; sub(/:$/, "", p)} $1 == "Candidate:" {print p "=" $2}' | sort)
  for p in "${fetch[@]}"; do
    pin=$(printf '%s\n' "${pins[@]}" | awk -F= -v p="$p" '$1 == p {print $2}')
    [[ -n $pin && $pin != "(none)" ]] || die "apt has no candidate version of the package $p: run \`apt-get update\` (as root)"
  done
  KEY=$(printf '%s\n' "script=$SCRIPT_HASH" "${pins[@]}" | sha256sum | cut -c1-16)
}

FP=$CACHE/resolved-$(fingerprint)
if [[ -f $FP ]]; then
  mapfile -t pins <"$FP"
  KEY=${pins[0]}
  KPKG=${pins[1]}
  pins=("${pins[@]:2}")
else
  resolve_packages
fi
RIG=$CACHE/rig-$KEY
say "packages: ${pins[*]}"

# ---------------------------------------------------------------------------------------------
# 2. Download, unpack, and build the base initramfs (cached by KEY)
# ---------------------------------------------------------------------------------------------
build_cached_rig() {
  local tmp=$CACHE/rig-$KEY.tmp
  rm -rf "$tmp"
  mkdir -p "$tmp/debs" "$tmp/root" "$tmp/kernel-root"
  say "downloading ${#pins[@]} packages into $tmp/debs"
  if ! (cd "$tmp/debs" && apt-get download "${pins[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2); then
    die "apt-get download failed (see above): check the network and run \`apt-get update\`"
  fi
  local deb
  for deb in "$tmp"/debs/*.deb; do
    case $(basename "$deb") in
      "${KPKG}"_*) dpkg -x "$deb" "$tmp/kernel-root" ;;
      *) dpkg -x "$deb" "$tmp/root" ;;
    esac
  done
  rm -rf "$tmp/debs"

  local root=$tmp/root
  local qemu=$root/usr/bin/qemu-system-x86_64
  [[ -x $qemu ]] || die "qemu-system-x86_64 is not in the unpacked qemu-system-x86 package"
  local missing
  missing=$(LD_LIBRARY_PATH=$(lib_path "$root") ldd "$qemu" | awk '/not found/ {print $1}')
  [[ -z $missing ]] || die "qemu-system-x86_64 still misses these libraries: $missing"
  [[ -x $root/bin/busybox ]] || die "busybox is not in the unpacked busybox-static package"

  # The kernel: its image, and the modules we need with their dependencies.
  local kver
  kver=$(ls "$tmp/kernel-root/lib/modules")
  [[ $(wc -w <<<"$kver") -eq 1 ]] || die "expected one kernel in $KPKG, found: $kver"
  cp "$tmp/kernel-root/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  local base=$tmp/base
  mkdir -p "$base"
  make_base_tree "$base" "$root" "$tmp/kernel-root/lib/modules/$kver" "$kver"
  make_kernel_tree "$tmp/kernel-tree" "$tmp/kernel-root" "$kver"
  rm -rf "$tmp/kernel-root"
  pack_cpio "$base" "$root/bin/busybox" >"$tmp/base.cpio.gz"
  rm -rf "$base"
  echo "$kver" >"$tmp/kernel-release"
  touch "$tmp/.complete"
  rm -rf "$RIG"
  mv "$tmp" "$RIG"
}

# LD_LIBRARY_PATH for binaries of an unpacked tree.
lib_path() {
  echo "$1/usr/lib/x86_64-linux-gnu:$1/lib/x86_64-linux-gnu"
}

# The `depends=` field of a module's .modinfo section: the modules it needs, space-separated.
module_deps() {
  tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

# Resolves modules NAME... of the kernel tree MODDIR (lib/modules/KVER) with their
# dependencies. Sets MODPATH (name -> path of the .ko), BUILTIN (name -> 1 when built into
# the kernel), MOD_ORDER (the modules to load, dependencies first) and MOD_BUILTIN (the asked
# or needed ones that are built in).
resolve_modules() {
  local moddir=$1 f n
  shift
  declare -gA MODPATH=() BUILTIN=()
  MOD_ORDER=()
  MOD_BUILTIN=()
  while read -r f; do
    n=${f##*/}
    n=${n%.ko}
    MODPATH[${n//-/_}]=$f
  done < <(find "$moddir/kernel" -name '*.ko')
  if [[ -f $moddir/modules.builtin ]]; then
    while read -r f; do
      n=${f##*/}
      n=${n%.ko}
      BUILTIN[${n//-/_}]=1
    done <"$moddir/modules.builtin"
  fi
  local -A seen=()
  add_module() {
    local n=${1//-/_} d
    [[ -n ${seen[$n]:-} ]] && return 0
    seen[$n]=1
    if [[ -n ${BUILTIN[$n]:-} ]]; then
      MOD_BUILTIN+=("$n")
      return 0
    fi
    [[ -n ${MODPATH[$n]:-} ]] || die "the kernel module $n is neither in $KPKG nor built into its kernel"
    for d in $(module_deps "${MODPATH[$n]}"); do add_module "$d"; done
    MOD_ORDER+=("$n")
  }
  for n in "$@"; do add_module "$n"; done
}

# What tests/vm/build-root.sh needs to build an initramfs for this kernel in a Debian root
# (mkinitramfs reads the kernel's config, depmod the module lists): under TREE,
# boot/config-KVER and lib/modules/KVER with the ROOT_MODULES and their dependencies at their
# paths in the package, modules.order and modules.builtin*. depmod runs in that root.
make_kernel_tree() {
  local tree=$1 kroot=$2 kver=$3 n f
  local moddir=$kroot/lib/modules/$kver
  mkdir -p "$tree/boot" "$tree/lib/modules/$kver"
  cp "$kroot/boot/config-$kver" "$tree/boot/config-$kver"
  # shellcheck disable=SC2086 # a list of module names
  resolve_modules "$moddir" $ROOT_MODULES
  for n in "${MOD_ORDER[@]}"; do
    f=${MODPATH[$n]#"$moddir"/}
    mkdir -p "$tree/lib/modules/$kver/$(dirname "$f")"
    cp "${MODPATH[$n]}" "$tree/lib/modules/$kver/$f"
  done
  for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f $moddir/$f ]] || die "$KPKG has no lib/modules/$kver/$f"
    cp "$moddir/$f" "$tree/lib/modules/$kver/$f"
  done
  say "kernel tree for the Debian root: ${#MOD_ORDER[@]} modules ($(du -sh "$tree" | cut -f1))"
}

# Resolves the module closure and installs it under BASE/lib/modules/KVER, with a
# modules.dep (so that `modprobe` of a loaded module succeeds in the guest) and the load
# order in BASE/lib/modules/ORDER (used by /init, which loads with insmod).
make_base_tree() {
  local base=$1 root=$2 moddir=$3 kver=$4
  mkdir -p "$base"/{bin,sbin,usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,etc,dev,proc,sys,tmp,run,mnt,root}
  # merged /usr, as on Debian 12: /lib and /lib64 lead into /usr
  ln -s usr/lib "$base/lib"
  mkdir -p "$base/usr/lib64"
  ln -s usr/lib64 "$base/lib64"
  if [[ $(id -u) -eq 0 ]]; then
    mknod -m 600 "$base/dev/console" c 5 1
    mknod -m 666 "$base/dev/null" c 1 3
  fi

  # busybox and its applets
  cp "$root/bin/busybox" "$base/bin/busybox"
  local a
  for a in $("$root/bin/busybox" --list); do
    [[ -e $base/bin/$a ]] || ln -s busybox "$base/bin/$a"
  done

  # modules
  local f n
  # shellcheck disable=SC2086 # a list of module names
  resolve_modules "$moddir" $MODULES
  local order=("${MOD_ORDER[@]}")
  local kdir=$base/lib/modules/$kver
  mkdir -p "$kdir"
  declare -A rel=()
  for n in "${order[@]}"; do
    rel[$n]=${MODPATH[$n]#"$moddir"/}
    mkdir -p "$kdir/$(dirname "${rel[$n]}")"
    cp "${MODPATH[$n]}" "$kdir/${rel[$n]}"
  done
  # modules.dep: each module with all its dependencies, the one to load first listed last.
  closure() {
    local n=$1 d deps
    deps=$(module_deps "${MODPATH[$n]}")
    for d in $deps; do
      d=${d//-/_}
      [[ -n ${BUILTIN[$d]:-} ]] && continue
      closure "$d"
      echo "$d"
    done
  }
  : >"$kdir/modules.dep"
  for n in "${order[@]}"; do
    local deps=() d
    mapfile -t deps < <(closure "$n" | awk '!seen[$0]++')
    local line="${rel[$n]}:"
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
      line="$line ${rel[${deps[$i]}]}"
    done
    echo "$line" >>"$kdir/modules.dep"
  done
  cp "$moddir/modules.builtin" "$kdir/" 2>/dev/null || true
  printf '%s\n' "${order[@]}" | while read -r n; do echo "$n ${rel[$n]}"; done >"$base/lib/modules/ORDER"
  echo "$kver" >"$base/lib/modules/RELEASE"
  say "kernel $kver; modules in load order: ${order[*]}"
  [[ ${#MOD_BUILTIN[@]} -eq 0 ]] || say "built into the kernel: ${MOD_BUILTIN[*]}"

  # guest tools and their libraries
  local b
  for b in $GUEST_BINS; do
    f=$(find_bin "$root" "$b") || die "the guest tool $b is neither in the unpacked packages nor on the host"
    copy_bin "$base" "$f" "/usr/sbin/$b" "$root"
  done
  ln -sf mke2fs "$base/usr/sbin/mkfs.ext4"
  ln -sf e2fsck "$base/usr/sbin/fsck.ext4"
  local conf
  for conf in "$root/etc/mke2fs.conf" /etc/mke2fs.conf; do
    if [[ -f $conf ]]; then
      cp "$conf" "$base/etc/mke2fs.conf"
      break
    fi
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$base/etc/passwd"
  echo 'root:x:0:' >"$base/etc/group"
}

# The path of binary NAME: in the unpacked ROOT first, then on the host.
find_bin() {
  local root=$1 name=$2 d
  for d in "$root/usr/sbin" "$root/sbin" "$root/usr/bin" "$root/bin" /usr/sbin /sbin /usr/bin /bin; do
    if [[ -f $d/$name && -x $d/$name ]]; then
      echo "$d/$name"
      return 0
    fi
  done
  return 1
}

# Copies binary SRC to DEST inside TREE with every shared library it loads (looked up in the
# unpacked ROOT first, then on the host), all into /usr/lib/x86_64-linux-gnu and the loader
# into /usr/lib64.
copy_bin() {
  local tree=$1 src=$2 dest=$3 root=${4:-}
  mkdir -p "$tree$(dirname "$dest")"
  cp -L "$src" "$tree$dest"
  local lp="" out lib
  [[ -n $root ]] && lp=$(lib_path "$root")
  out=$(LD_LIBRARY_PATH=$lp ldd "$src" 2>&1) || die "ldd $src failed: $out"
  if grep -q 'not found' <<<"$out"; then
    die "$src needs libraries found neither in the unpacked packages nor on the host: $(grep 'not found' <<<"$out" | awk '{print $1}' | tr '\n' ' ')"
  fi
  while read -r lib; do
    [[ -n $lib ]] || continue
    case $(basename "$lib") in
      ld-linux*) cp -L "$lib" "$tree/usr/lib64/$(basename "$lib")" ;;
      *) cp -L "$lib" "$tree/usr/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
    esac
  done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out" | sort -u)
}

# Packs TREE as a gzip-compressed newc cpio archive on stdout, with GNU cpio when installed,
# else with the given busybox.
pack_cpio() {
  local tree=$1 busybox=$2
  (
    cd "$tree"
    if command -v cpio >/dev/null 2>&1; then
      find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0
    else
      find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null
    fi
  ) | gzip -1
}

if [[ -f $RIG/.complete ]]; then
  say "cached rig $RIG (packages unchanged)"
else
  build_cached_rig
  # Keep the cache small: only the current rig.
  for old in "$CACHE"/rig-*; do
    [[ $old == "$RIG" ]] || rm -rf "$old"
  done
  say "built the cached rig in $((SECONDS - t0)) s: $(du -sh "$RIG" | cut -f1) in $RIG"
fi
rm -f "$CACHE"/resolved-*
printf '%s\n' "$KEY" "$KPKG" "${pins[@]}" >"$FP"

# ---------------------------------------------------------------------------------------------
# 3. The overlay: our binaries, /init and the scenarios (rebuilt every run)
# ---------------------------------------------------------------------------------------------
t1=$SECONDS
overlay=$(mktemp -d "$OUT/overlay.XXXXXX")
trap 'rm -rf "$overlay"' EXIT
mkdir -p "$overlay/bin" "$overlay/cryptnbd-vm" "$overlay/usr/lib/x86_64-linux-gnu" "$overlay/usr/lib64"
for bin in "$DAEMON_BIN" "$CTL_BIN"; do
  name=$(basename "$bin")
  copy_bin "$overlay" "$bin" "/bin/$name"
  # Line tables are of no use in the guest and make the initramfs slow to unpack.
  if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$overlay/bin/$name"
  else
    say "note: strip (binutils) is not installed; $name goes into the guest with its debug info"
  fi
done
install -m 0755 "$GUEST_SRC/init" "$overlay/init"
install -m 0644 "$GUEST_SRC"/*.sh "$overlay/cryptnbd-vm/"
pack_cpio "$overlay" "$RIG/root/bin/busybox" >"$overlay.cpio.gz"
# The kernel unpacks concatenated archives in turn: the overlay lands on top of the base.
cat "$RIG/base.cpio.gz" "$overlay.cpio.gz" >"$OUT/initramfs.cpio.gz.tmp"
rm -f "$overlay.cpio.gz"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"

R=$RIG/root
cat >"$OUT/rig.env.tmp" <<EOF
QEMU=$R/usr/bin/qemu-system-x86_64
QEMU_LD_LIBRARY_PATH=$(lib_path "$R")
QEMU_MODULE_DIR=$R/usr/lib/x86_64-linux-gnu/qemu
QEMU_FIRMWARE_DIRS=$R/usr/share/qemu:$R/usr/share/seabios
KERNEL=$RIG/vmlinuz
INITRD=$OUT/initramfs.cpio.gz
KERNEL_RELEASE=$(cat "$RIG/kernel-release")
KERNEL_TREE=$RIG/kernel-tree
EOF
mv "$OUT/rig.env.tmp" "$OUT/rig.env"
say "initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1) in $((SECONDS - t1)) s: $OUT/initramfs.cpio.gz"
