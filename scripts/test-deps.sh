# shellcheck shell=bash
# Everything outside the workspace that the tests run or import, in one place.
# Sourced by scripts/test-all.sh (which installs what is missing, then checks every line
# again) and readable on its own: each line is "DEBIAN-PACKAGE|PROBE".
#
# A probe *uses* the thing, the way a test does: it runs the program or imports the module,
# from `/` (never from the checkout: there the folder `nbd/` imports as a Python namespace
# package and hides a missing python3-libnbd) with /usr/bin first on PATH (the first python3
# on PATH may be a build that does not see Debian's modules). It never asks dpkg: a package
# can be installed and broken, or gone while a file lingers.
#
# Python packages from PyPI (the AES-XTS oracle, moto) live in the project's .venv and are
# listed in TEST_VENV_PROBES below.

# shellcheck disable=SC2034  # read by scripts/test-all.sh
TEST_DEPS=(
  # The real NBD clients (nbd/tests, tests/tests/daemon_*.rs, lifecycle*, kms_daemon, ...).
  "libnbd-bin|nbdinfo --version"
  "libnbd-bin|nbdcopy --version"
  "libnbd-bin|nbdfuse --version"
  # nbdsh and the libnbd module for Debian's python3 (io_allocations, daemon_clients, hostile).
  "python3-libnbd|nbdsh --version"
  "python3-libnbd|/usr/bin/python3 -c 'import nbd; nbd.NBD()'"
  "fio|fio --version"
  "qemu-utils|qemu-img --version"
  "qemu-utils|qemu-io --version"
  "qemu-utils|qemu-nbd --version"
  # LUKS2 interoperability (cryptsetup_*, recovery_keyslot, dmcrypt, lifecycle).
  "cryptsetup-bin|cryptsetup --version"
  # Filesystems on top of an export (nbdfuse + loop + mkfs + mount), reflink tests on XFS.
  "e2fsprogs|mkfs.ext4 -V"
  "e2fsprogs|e2fsck -V"
  "e2fsprogs|debugfs -V"
  "xfsprogs|mkfs.xfs -V"
  "mount|losetup --version"
  "mount|mount --version"
  "mount|umount --version"
  "util-linux|prlimit --version"
  "util-linux|setpriv --version"
  "util-linux|unshare --version"
  "util-linux|nsenter --version"
  "util-linux|flock --version"
  "coreutils|sha256sum --version"
  "coreutils|timeout --version"
  # Certificates for the TLS tests (tests/src/pki.rs).
  "openssl|openssl version"
  # The daemon unit's ExecReload (systemd_units).
  "procps|/usr/bin/kill --version"
  # The systemd units: systemd-analyze verify/security, and the daemon under systemd (nspawn).
  "systemd|systemd-analyze --version"
  "systemd|systemd-tmpfiles --version"
  "systemd-container|systemd-nspawn --version"
  # The VM rig (tests/vm/build-rig.sh) downloads and unpacks Debian packages.
  "apt|apt-get --version"
  "dpkg|dpkg-query --version"
  "libc-bin|ldd --version"
  "gzip|gzip --version"
  # zstd: Debian 12's initramfs compression, read by `initramfs check` (root_unlock).
  "zstd|zstd --version"
  # A real single-node Ceph cluster for the RBD engine (tests/src/ceph.rs), librbd and
  # librados for its bindings (loaded at run time), and Ceph's own LUKS2 reader.
  "ceph-mon|ceph-mon --version"
  "ceph-osd|ceph-osd --version"
  "ceph-common|ceph --version"
  "ceph-common|rados --version"
  "ceph-common|rbd --version"
  "librbd-dev|test -e /usr/include/rbd/librbd.h"
  "librados-dev|test -e /usr/include/rados/librados.h"
  "python3-rbd|/usr/bin/python3 -c 'import rados, rbd'"
  # Python for the oracle's virtual environment.
  "python3|/usr/bin/python3 --version"
  "python3-venv|/usr/bin/python3 -c 'import venv, ensurepip'"
)

# "PIP-REQUIREMENT|PROBE run with the venv's python": the AES-XTS oracle and the AWS KMS peer.
TEST_VENV_PROBES=(
  "cryptography>=42|import cryptography.hazmat.primitives.ciphers.modes as m; m.XTS"
  "moto[server]>=5,<6|import moto.server, boto3"
)
