#!/bin/bash
# Makes the fuzz targets' seed corpora (fuzz/seeds/TARGET/) from real tools:
#   luks2_header  header copies written by cryptsetup luksFormat and by cryptnbdctl create
#   kms_token     the cryptnbd-kms token of cryptnbdctl's header
#   nbd_session   what real clients sent to the daemon (nbdinfo, nbdinfo --list, nbdsh,
#                 qemu-img, qemu-io, nbdcopy), recorded by a proxy on the unix socket
#   nbd_option    the options of those sessions
#   nbd_request   their transmission phase (from the first request on)
#   control_line  the lines cryptnbdctl and the daemon exchanged, recorded the same way
#   boot_cmdline  this machine's /proc/cmdline and the command lines of the VM tests' boots
#   local_kms     the wrapped key (CNKW blob) of the volume cryptnbdctl made, and a keystore
#                 file (a throwaway keystore made here, unsealed: it holds only its own key)
#   initramfs     small newc archives as initramfs-tools writes them (an early archive, then
#                 a gzip or zstd part; a symlinked /sbin; a symlink loop)
#   keyslot_af    sizes (hash, key size, stripes) and random AF material
#   nbd_starttls  the nbd_session seeds behind a byte that picks the TLS mode (off, on,
#                 require), STARTTLS followed by a real TLS ClientHello (Python's ssl), STARTTLS
#                 with data, and LIST then EXPORT_NAME of the TLS-only export before TLS
#   daemon_config systemd/cryptnbd.toml, docs/daemon.md's every-key example (as written and
#                 with its placeholders filled in), and one with TLS, RBD, devices and metrics
#   rbd_metadata  a holder record and a pool's image names (every kind of hidden image)
#   cert_names    a CA and a client certificate made by openssl (a multi-valued RDN, a comma
#                 in a value, email and UID attributes), and allow-cert patterns
# Run by hand after a protocol or format change, then minimize (scripts/fuzz.sh -m) and
# commit. Needs: cryptsetup, nbdinfo, nbdsh, nbdcopy (libnbd-bin, python3-libnbd), qemu-utils,
# and the release binaries (cargo build --release -p daemon -p ctl).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in cryptsetup nbdinfo nbdsh nbdcopy qemu-img qemu-io python3 openssl; do
  command -v $tool >/dev/null || { echo "make-seeds.sh needs $tool" >&2; exit 1; }
done
BIN=$PWD/target/release
[[ -x $BIN/cryptnbd && -x $BIN/cryptnbdctl ]] || { echo "build first: cargo build --release -p daemon -p ctl" >&2; exit 1; }
SEEDS=$PWD/fuzz/seeds
WORK=$(mktemp -d /tmp/cryptnbd-seeds.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
mkdir -p "$SEEDS"/{luks2_header,kms_token,nbd_session,nbd_option,nbd_request,control_line,boot_cmdline,local_kms,initramfs,keyslot_af,cert_names,nbd_starttls,daemon_config,rbd_metadata}

# A header copy as the luks2_header target takes it: a byte that picks the offset (0: primary,
# 1: the secondary at 16 KiB) and whether the target fixes the checksum, then hdr_size bytes.
python3_copy() {
  python3 - "$@" <<'PY'
import struct, sys
image, out, which = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(image, "rb").read(1 << 20)
size = struct.unpack(">Q", data[8:16])[0]
at = 0 if which == 0 else size
open(out, "wb").write(bytes([which]) + data[at:at + size])
# The same with bit 2 set: the target rewrites the checksum, so mutations reach the JSON.
open(out + "-fixsum", "wb").write(bytes([which | 4]) + data[at:at + size])
PY
}

echo "== cryptsetup headers"
truncate -s 32M "$WORK/cs.img"
head -c 64 /dev/urandom >"$WORK/key"
cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
  --key-file "$WORK/key" "$WORK/cs.img"
python3_copy "$WORK/cs.img" "$SEEDS/luks2_header/cryptsetup-primary" 0
python3_copy "$WORK/cs.img" "$SEEDS/luks2_header/cryptsetup-secondary" 1

echo "== the daemon, behind a recording proxy"
cat >"$WORK/proxy.py" <<'PY'
# A unix-socket proxy that records what each side sent, one file pair per connection.
import os, socket, sys, threading
listen, target, out = sys.argv[1], sys.argv[2], sys.argv[3]
srv = socket.socket(socket.AF_UNIX)
srv.bind(listen)
srv.listen(16)
n = 0
def pump(a, b, path):
    with open(path, "wb") as f:
        while True:
            d = a.recv(1 << 16)
            if not d:
                break
            f.write(d)
            f.flush()
            try:
                b.sendall(d)
            except OSError:
                break
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
while True:
    c, _ = srv.accept()
    n += 1
    s = socket.socket(socket.AF_UNIX)
    s.connect(target)
    threading.Thread(target=pump, args=(c, s, f"{out}/{n:03}.client"), daemon=True).start()
    threading.Thread(target=pump, args=(s, c, f"{out}/{n:03}.server"), daemon=True).start()
PY
printf 'state_dir = "%s/state"\nruntime_dir = "%s/run"\n' "$WORK" "$WORK" >"$WORK/c.toml"
"$BIN/cryptnbd" --config "$WORK/c.toml" >"$WORK/daemon.log" 2>&1 &
ctl=("$BIN/cryptnbdctl" --state-dir "$WORK/state" --socket "$WORK/run/control.sock")
for _ in $(seq 1 100); do "${ctl[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
mkdir -p "$WORK/ctl" "$WORK/nbd"
python3 "$WORK/proxy.py" "$WORK/ctl.sock" "$WORK/run/control.sock" "$WORK/ctl" &
python3 "$WORK/proxy.py" "$WORK/nbd.sock" "$WORK/run/nbd.sock" "$WORK/nbd" &
sleep 0.5
pctl=("$BIN/cryptnbdctl" --state-dir "$WORK/state" --socket "$WORK/ctl.sock")
"${pctl[@]}" kms create-key --alias alias/seed >/dev/null
"${pctl[@]}" create v --size 16M --kms-key alias/seed --sid S-1-5-21-1-2-3-1107 --directory d-1234abcd01 >/dev/null
"${pctl[@]}" --json status >/dev/null
"${pctl[@]}" attach v >/dev/null
"${pctl[@]}" --json list >/dev/null
"${pctl[@]}" --json inspect v >/dev/null || true
"${pctl[@]}" kms list-keys >/dev/null || true
"${pctl[@]}" snapshot v v-snap >/dev/null || true
URI="nbd+unix:///v?socket=$WORK/nbd.sock"
nbdinfo "$URI" >/dev/null
nbdinfo --list "nbd+unix://?socket=$WORK/nbd.sock" >/dev/null
nbdinfo --map "$URI" >/dev/null
# Outside the repository, whose nbd/ folder would import as the module; the system's python3
# has libnbd's bindings.
(cd "$WORK" && URI="$URI" /usr/bin/python3 -m nbd -c '
import os
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(os.environ["URI"])
h.pwrite(b"seed" * 1024, 0)
h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(4096, 0) == b"seed" * 1024
h.pread(100, 7)
h.trim(4096, 65536)
h.zero(4096, 131072)
h.cache(65536, 0) if h.can_cache() else None
h.block_status(1 << 20, 0, lambda *a: 0)
h.shutdown()
')
head -c 256K /dev/urandom >"$WORK/data"
nbdcopy "$WORK/data" "$URI"
qemu-img info --image-opts "driver=nbd,path=$WORK/nbd.sock,export=v" >/dev/null
qemu-io -f raw -c 'read 0 64k' -c 'write -P 7 64k 64k' -c flush "nbd+unix:///v?socket=$WORK/nbd.sock" >/dev/null
"${pctl[@]}" detach v >/dev/null
sleep 0.5
python3_copy "$WORK/state/volumes/v.luks" "$SEEDS/luks2_header/cryptnbd-primary" 0
python3 - "$WORK/state/volumes/v.luks" "$SEEDS/kms_token/cryptnbd" <<'PY'
import json, struct, sys
data = open(sys.argv[1], "rb").read(1 << 20)
size = struct.unpack(">Q", data[8:16])[0]
area = data[4096:size].split(b"\0", 1)[0]
tokens = json.loads(area)["tokens"]
open(sys.argv[2], "w").write(json.dumps(next(iter(tokens.values()))))
PY
python3 - "$WORK/nbd" "$WORK/ctl" "$SEEDS" <<'PY'
import glob, os, struct, sys
nbd, ctl, seeds = sys.argv[1:]
REQUEST_MAGIC = struct.pack(">I", 0x25609513)
for i, path in enumerate(sorted(glob.glob(f"{nbd}/*.client"))):
    data = open(path, "rb").read()
    if not data:
        continue
    open(f"{seeds}/nbd_session/{i:02}", "wb").write(data)
    open(f"{seeds}/nbd_option/{i:02}", "wb").write(data[4:])
    at = data.find(REQUEST_MAGIC)
    if at >= 0:
        open(f"{seeds}/nbd_request/{i:02}", "wb").write(data[at:])
for i, path in enumerate(sorted(glob.glob(f"{ctl}/*"))):
    data = open(path, "rb").read()
    if data:
        open(f"{seeds}/control_line/{i:02}-{os.path.basename(path).split('.')[1]}", "wb").write(data)
PY
echo "== kernel command lines"
cp /proc/cmdline "$SEEDS/boot_cmdline/this-machine"
uuid=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["uuid"])' < <("$BIN/cryptnbdctl" --json inspect "$WORK/state/volumes/v.luks"))
printf 'console=ttyS0 panic=-1 cryptnbd.root=UUID=%s ip=dhcp\n' "$uuid" >"$SEEDS/boot_cmdline/dm-crypt-by-uuid"
printf 'console=ttyS0 panic=-1 cryptnbd.root=root cryptnbd.mode=nbd\n' >"$SEEDS/boot_cmdline/nbd-by-name"
printf 'quiet cryptnbd.root=/dev/vdb cryptnbd.config="/etc/cryptnbd/root config.toml" -- init args\n' \
  >"$SEEDS/boot_cmdline/path-quoted-config"
echo "== local KMS blobs and keystores, initramfs archives, AF material"
python3 - "$WORK/state" "$SEEDS" <<'PY'
import base64, gzip, json, os, sys
state, seeds = sys.argv[1], sys.argv[2]
header = open(f"{state}/volumes/v.luks", "rb").read(16384)
meta = json.loads(header[4096:].split(b"\0")[0])
token = next(t for t in meta["tokens"].values() if t["type"] == "cryptnbd-kms")
# The first byte picks what the local_kms target reads: even a blob, odd a keystore file.
open(f"{seeds}/local_kms/blob-real", "wb").write(b"\x00" + base64.b64decode(token["wrapped_key"]))
open(f"{seeds}/local_kms/keystore-real", "wb").write(b"\x01" + open(f"{state}/keystore/keystore.json", "rb").read())
open(f"{seeds}/local_kms/keystore-empty", "wb").write(b'\x01{"format": 1, "keys": []}')

def newc(entries):
    out = b""
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        out += ("070701" + "".join("%08X" % v for v in fields)).encode() + nb
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return out

main = newc([("usr", 0o040755, b""), ("usr/sbin", 0o040755, b""),
             ("usr/sbin/cryptnbd", 0o100755, b"\x7fELF"), ("sbin", 0o120777, b"usr/sbin"),
             ("etc/cryptnbd/root.toml", 0o100600, b'state_dir = "/run/x"\n'),
             ("lib/modules/6.1.0/kernel/drivers/block/nbd.ko", 0o100644, b"ko")])
early = newc([("kernel/x86/microcode/AuthenticAMD.bin", 0o100644, b"ucode")])
pad = b"\0" * (-len(early) % 512)
open(f"{seeds}/initramfs/plain", "wb").write(main)
open(f"{seeds}/initramfs/early-then-gzip", "wb").write(early + pad + gzip.compress(main))
open(f"{seeds}/initramfs/early-then-zstd", "wb").write(early + b"\x28\xb5\x2f\xfd" + os.urandom(64))
open(f"{seeds}/initramfs/symlink-loop", "wb").write(
    newc([("a", 0o120777, b"b"), ("b", 0o120777, b"a"), ("c", 0o120777, b"/c/c")]))
for n, (h, k, s) in enumerate([(1, 64, 16), (3, 32, 4), (2, 255, 200)]):
    open(f"{seeds}/keyslot_af/seed-{n}", "wb").write(bytes([h, k, 0, s]) + os.urandom(600))
PY
echo "== STARTTLS sessions"
python3 - "$SEEDS" <<'PY'
import glob, ssl, struct, sys
seeds = sys.argv[1]
out = f"{seeds}/nbd_starttls"
for m in range(3):
    for i, p in enumerate(sorted(glob.glob(f"{seeds}/nbd_session/*"))[:8]):
        open(f"{out}/mode{m}-session{i}", "wb").write(bytes([m]) + open(p, "rb").read())
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
client = ctx.wrap_bio(incoming, outgoing, server_hostname="fuzz.invalid")
try:
    client.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
flags = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
option = lambda n, data=b"": b"IHAVEOPT" + struct.pack(">II", n, len(data)) + data
for m in (1, 2):
    open(f"{out}/mode{m}-starttls-hello", "wb").write(bytes([m]) + flags + option(5) + hello)
    open(f"{out}/mode{m}-starttls-with-data", "wb").write(bytes([m]) + flags + option(5, b"abcd"))
for m in range(3):
    open(f"{out}/mode{m}-list-then-tls-only-export", "wb").write(
        bytes([m]) + flags + option(3) + option(1, b"secret"))
PY
echo "== daemon configurations"
cp systemd/cryptnbd.toml "$SEEDS/daemon_config/systemd-example"
python3 - "$SEEDS/daemon_config" <<'PY'
import sys
out = sys.argv[1]
block = open("docs/daemon.md").read().split("```toml", 1)[1].split("```", 1)[0]
open(f"{out}/docs-every-key", "w").write(block)
open(f"{out}/docs-every-key-filled", "w").write(block.replace("\u2026", "0"))
PY
cat >"$SEEDS/daemon_config/tls-rbd-metrics" <<'TOML'
state_dir = "/var/lib/cryptnbd"
[nbd]
tcp = "0.0.0.0:10809"
[nbd.tls]
mode = "require"
certificates = "/etc/cryptnbd/pki"
verify_peer = true
[store]
default = "rbd"
[store.rbd]
pool = "rbd"
id = "cryptnbd"
timeout_secs = 20
[store.devices]
root = "UUID=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
[metrics]
listen = "127.0.0.1:9810"
[limits]
payload_timeout_secs = 30
handshake_timeout_secs = 10
TOML
echo "== RBD metadata"
printf 'host1.example.com\0/var/lib/cryptnbd\0b8a6e3f0-1c2d-4e5f-8a9b-0c1d2e3f4a5b\0v\nw\n.v.staged-1733371200\n.w.replaced\n.v.snapshots-1733371200123\n.\n..x\n' \
  >"$SEEDS/rbd_metadata/holder-and-pool"
printf '\0\0\0root\nhome\n' >"$SEEDS/rbd_metadata/no-holder"
echo "== certificates and allow-cert patterns"
(
  cd "$WORK"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
    -out ca.pem -subj "/O=Example/CN=Example CA" -days 30 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout c.key -out c.csr \
    -subj "/C=FR/O=Example, Inc./OU=hosts+OU=fleet/CN=host1.example.com/emailAddress=ops@example.com/UID=42" \
    -multivalue-rdn 2>/dev/null
  openssl x509 -req -in c.csr -CA ca.pem -CAkey ca.key -set_serial 0x00ff10 -days 30 -out c.pem 2>/dev/null
  # The first byte picks what the cert_names target reads: even a certificate, odd a pattern.
  { printf '\x00'; openssl x509 -in c.pem -outform DER; } >"$SEEDS/cert_names/client"
  { printf '\x00'; openssl x509 -in ca.pem -outform DER; } >"$SEEDS/cert_names/ca"
  printf '\x01CN=host*.example.com,O=Example\x00CN=host1.example.com,O=Example' >"$SEEDS/cert_names/pattern"
  printf '\x01CN=a\\,b+UID=1,O=x\x00CN=a\\,b+UID=1,O=x' >"$SEEDS/cert_names/escaped"
)
for t in "$SEEDS"/*; do echo "$(basename "$t"): $(find "$t" -type f | wc -l) seeds, $(du -sh "$t" | cut -f1)"; done
