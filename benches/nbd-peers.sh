#!/usr/bin/env bash
# Whole-pipeline benchmark: cryptnbd beside its peers on the same machine, in one run.
#
#   benches/nbd-peers.sh [-r RUNS] [-t FIO_SECONDS] [-s SIZE_MIB] [-d WORKDIR] [-o RESULTS.md]
#                        [-T write,read,randread,randwrite] [-w WARMUP] [-p] [-P] [SERVER...]
#
# SERVERs (default: all, in this order):
#   cryptnbd       the release cryptnbd daemon, local KMS, a 4096-byte-sector volume
#   nbdkit-luks    nbdkit file plugin + luks filter on a LUKS1 image (nbdkit reads LUKS1 only)
#   qemu-nbd-luks  qemu-nbd on the same kind of LUKS1 image
#   nbdkit-file    nbdkit file plugin, unencrypted
#   nbdkit-memory  nbdkit memory plugin: the transport ceiling (no disk, no crypto)
# and (not in the default list):
#   qemu-nbd-file  qemu-nbd -f raw --cache=none --aio=io_uring on the unencrypted file: the
#                  unencrypted O_DIRECT peer
#   cryptnbd-4conn cryptnbd, its clients on 4 connections (nbdcopy -C 4; fio numjobs=4 at
#                  iodepth 8 each, the same total queue depth of 32)
#   cryptnbd-512   cryptnbd, a volume of 512-byte sectors (what dm-crypt and the kernel client
#                  use by default)
#   cryptnbd-direct cryptnbd with [store.file] io = "direct" (O_DIRECT: reads come from the
#                  disk, not the page cache)
# and, over TCP on loopback (not in the default list):
#   cryptnbd-tcp   cryptnbd, plaintext TCP
#   cryptnbd-tls   cryptnbd, TLS required, client certificates checked
#   nbdkit-tls     nbdkit file plugin, unencrypted volume, --tls=require --tls-verify-peer (GnuTLS)
# and on Ceph RBD (issue 15; not in the default list; use -s 1024 or less: a memstore OSD holds
# what is written in memory, about 2.6 GB of RSS per GiB), each on its own image of one
# throwaway cluster (tests/src/bin/ceph-cluster.rs, the tests' fixture), removed after it:
#   cryptnbd-rbd       cryptnbd with [store.rbd], librbd's default cache
#   qemu-nbd-rbd       qemu-nbd 7.2, -f raw rbd:POOL/IMAGE, unencrypted, --cache=writeback
#   qemu-nbd-rbd-luks  qemu-nbd 7.2 with librbd's own LUKS2 encryption (encrypt.format=luks2),
#                      --cache=writeback
#   fio-rbd            fio's rbd engine straight on librbd: the ceiling (no NBD hop, no
#                      encryption; seq figures are fio with 1 MiB blocks, iodepth 32)
# qemu 7.2's rbd driver (qemu-block-extra) is unpacked under WORKDIR/qemu72 with apt-get download
# when the system's qemu is another version; nothing is installed over it.
# The TLS servers use certificates made here with openssl (WORKDIR/pki). Their clients run as
# nobody with HOME=WORKDIR/tls-home, where libnbd finds its certificates (.pki/libnbd): fio's
# nbd engine cannot name them in the URI, and for root libnbd looks only in /etc/pki/libnbd.
#
# Four figures per server, each the median [min-max] of RUNS runs (default 3):
#   seq write MB/s    nbdcopy SOURCE URI (the whole export, random data)
#   seq read MB/s     nbdcopy URI null: (the whole export)
#   4K randread IOPS  fio --ioengine=nbd --bs=4k --iodepth=32, time based
#   4K randwrite IOPS the same, randwrite
# and the server's CPU use in cores (CPU-seconds / wall-seconds, from /proc/PID/stat), and the
# client's (nbdcopy, fio: its children's rusage) for the sequential figures. After the first
# five columns (which other tooling reads; keep them), the table has the CPU columns, each
# figure over nbdkit-file's of the same run (when nbdkit-file is in the run), the server's
# CPU-seconds per GB of the sequential copies, and the two-core limit they imply:
# 2 cores / (client + server CPU-seconds per GB), beside which the throughput is read
# (`of limit` = throughput / limit; 1.00 means both cores were busy with client and server).
# Both are each run's own figure, then the median of the runs.
# The last column says where the rest of the two cores went during the sequential copies,
# from /proc/stat: idle (iowait included), other (busy, but neither server nor client:
# kernel threads such as write-back and softirq work, other processes) and steal (taken by
# the hypervisor).
# Writes a Markdown table to RESULTS.md (default WORKDIR/results.md) and stdout.
# Needs: nbdkit, libnbd-bin, fio, qemu-utils, cryptsetup-bin. As root it drops the page cache
# before each server; without root it cannot, and the figures then depend on what ran before.
# Every server starts on unallocated space: cryptnbd on a new volume, the others on images whose
# data is punched out before each server, so every first write allocates its blocks alike.
# A server that is not written first (-T without write) is measured on a fresh, unwritten export.
# -w N writes the whole export N times, unmeasured, before the measured runs: a fresh RBD
# image on memstore is slower to write until its objects exist (the first pass ran at half
# the speed of the fourth for every peer), a ramp that belongs to the cluster, not the server.
# -p pins every thread of the server to CPU 0 and the client to CPU 1 (taskset), as if each
# had a host of its own: the figures then show which side is the limit, where by default
# client and server compete for the same cores.
# -P profiles the server during the first run of each kind: `perf record` (sampled, no call
# graphs) and `perf stat` (task-clock, page faults, context switches, system calls) into
# WORKDIR/profiles/SERVER.KIND.*, and a line per kind with CPU-ms, system calls, page faults
# and context switches per request (nbdcopy's requests are 256 KiB; fio's are counted by fio).
# Those runs carry perf's overhead: profile in a run of its own, not with the figures you quote.
# Takes about 4 minutes per server with the defaults. The machine is shared and noisy:
# compare servers from the same run, as ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=3 FIO_SECONDS=15 SIZE_MIB=4096 WORK=/var/tmp/cryptnbd-bench OUT="" KINDS="write,read,randread,randwrite"
WARMUP=0
PIN=""
PROFILE=""
while getopts "r:t:s:d:o:T:w:pPh" o; do
  case $o in
    r) RUNS=$OPTARG ;; t) FIO_SECONDS=$OPTARG ;; s) SIZE_MIB=$OPTARG ;; d) WORK=$OPTARG ;; o) OUT=$OPTARG ;;
    T) KINDS=$OPTARG ;; w) WARMUP=$OPTARG ;; p) PIN=1 ;; P) PROFILE=1 ;;
    *) sed -n '2,/^set -euo/{/^set/!p}' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
SERVERS=("$@")
((${#SERVERS[@]})) || SERVERS=(cryptnbd nbdkit-luks qemu-nbd-luks nbdkit-file nbdkit-memory)
OUT=${OUT:-$WORK/results.md}
for tool in nbdkit nbdcopy nbdinfo fio qemu-img qemu-nbd cryptsetup python3 openssl setpriv taskset fallocate; do
  command -v $tool >/dev/null || { echo "missing $tool: apt-get install nbdkit libnbd-bin fio qemu-utils cryptsetup-bin" >&2; exit 1; }
done
SIZE=$((SIZE_MIB << 20))
mkdir -p "$WORK"
LOGS=$WORK/logs
mkdir -p "$LOGS"
SOCK=$WORK/nbd.sock
PASS=bench-passphrase

echo "== building release binaries"
cargo build --release -q -p daemon -p ctl
BIN=$PWD/target/release

SRC=$WORK/source.bin
if [[ ! -s $SRC || $(stat -c %s "$SRC") -ne $SIZE ]]; then
  echo "== making $SRC ($SIZE_MIB MiB of random data)"
  head -c "$SIZE" /dev/urandom >"$SRC"
fi
# The images of an earlier run of another size (-s) are made again.
LUKS1=$WORK/luks1.img
if [[ ! -s $LUKS1 || $(stat -c %s "$LUKS1") -ne $((SIZE + (4 << 20))) ]]; then
  echo "== making a LUKS1 image for nbdkit and qemu-nbd"
  rm -f "$LUKS1"
  truncate -s $((SIZE + (4 << 20))) "$LUKS1"
  printf %s "$PASS" | cryptsetup luksFormat --batch-mode --type luks1 --cipher aes-xts-plain64 \
    --key-size 512 --hash sha256 --pbkdf-force-iterations 1000 --key-file - "$LUKS1"
fi
PLAIN=$WORK/plain.img
if [[ ! -s $PLAIN || $(stat -c %s "$PLAIN") -ne $SIZE ]]; then
  rm -f "$PLAIN"
  truncate -s "$SIZE" "$PLAIN"
fi

# The data of the shared images is given back to the filesystem (the LUKS1 header is kept).
unallocate_images() {
  fallocate --punch-hole --offset 0 --length "$SIZE" "$PLAIN"
  local payload
  payload=$(cryptsetup luksDump "$LUKS1" | awk '/^Payload offset:/ {print $3}')
  [[ $payload =~ ^[0-9]+$ ]] || { echo "cannot read the payload offset of $LUKS1 from cryptsetup luksDump: delete the file and run again (it is made anew)" >&2; exit 1; }
  fallocate --punch-hole --offset $((payload * 512)) --length "$SIZE" "$LUKS1"
}

# A CA, the server's certificate (127.0.0.1) and a client's, for the TLS servers.
PKI=$WORK/pki
make_pki() {
  [[ -s $PKI/server/server-key.pem ]] && return 0
  rm -rf "$PKI" && mkdir -p "$PKI/ca/newcerts" "$PKI/server" "$WORK/tls-home/.pki/libnbd"
  (
    cd "$PKI/ca"
    : >index.txt && echo 1000 >serial && echo 1000 >crlnumber
    cat >openssl.cnf <<'CNF'
[ ca ]
default_ca = ca_default
[ ca_default ]
dir = .
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
default_md = sha256
default_days = 30
policy = policy_any
[ policy_any ]
organizationName = optional
commonName = supplied
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = unused
[ ca_ext ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[ server_ext ]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[ client_ext ]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
CNF
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    openssl req -x509 -config openssl.cnf -extensions ca_ext "${ec[@]}" -keyout ca-key.pem \
      -out ca-cert.pem -days 30 -subj "/CN=bench CA" 2>/dev/null
    for who in server client; do
      openssl req -new -config openssl.cnf "${ec[@]}" -keyout $who-key.pem -out $who.csr \
        -subj "/CN=bench $who" 2>/dev/null
      openssl ca -batch -notext -config openssl.cnf -cert ca-cert.pem -keyfile ca-key.pem \
        -extensions ${who}_ext -in $who.csr -out $who-cert.pem 2>/dev/null
    done
    install -m 0644 ca-cert.pem server-cert.pem "$PKI/server/"
    install -m 0600 server-key.pem "$PKI/server/"
    install -m 0644 ca-cert.pem client-cert.pem "$WORK/tls-home/.pki/libnbd/"
    install -m 0600 -o 65534 client-key.pem "$WORK/tls-home/.pki/libnbd/"
  )
}
PORT=10899

# The Ceph cluster of the RBD servers: started on first use, stopped at exit.
CEPH_PID="" CEPH_CONF="" CEPH_POOL="" CEPH_DIR="" RBD_IMAGE=""
ceph_start() {
  [[ -n $CEPH_PID ]] && return 0
  cargo build -q -p e2e-tests --bin ceph-cluster
  local out=$WORK/ceph-cluster.out
  : >"$out"
  "$PWD/target/debug/ceph-cluster" 8 >"$out" 2>"$LOGS/ceph-cluster.log" &
  CEPH_PID=$!
  for _ in $(seq 1 600); do
    grep -q '^conf=' "$out" && break
    kill -0 "$CEPH_PID" 2>/dev/null || { echo "the Ceph cluster did not start; see $LOGS/ceph-cluster.log" >&2; exit 1; }
    sleep 0.1
  done
  read -r c p d <"$out"
  CEPH_CONF=${c#conf=} CEPH_POOL=${p#pool=} CEPH_DIR=${d#dir=}
  echo "   Ceph cluster up: $CEPH_CONF, pool $CEPH_POOL"
}
ceph_stop() {
  [[ -n $CEPH_PID ]] || return 0
  kill -KILL "$CEPH_PID" 2>/dev/null || true
  wait "$CEPH_PID" 2>/dev/null || true
  CEPH_PID=""
  [[ -n $CEPH_DIR ]] && rm -rf "$CEPH_DIR"
}
rbd_cli() { rbd -c "$CEPH_CONF" "$@"; }
QEMU72=$WORK/qemu72
qemu72() {
  [[ -x $QEMU72/usr/bin/qemu-nbd && -e $QEMU72/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ]] && return 0
  local v
  v=$(apt-cache madison qemu-block-extra | awk '$3 ~ /^1:7\.2/ {print $3; exit}')
  [[ -n $v ]] || { echo "no qemu-block-extra 7.2 in the apt sources (Debian 12)" >&2; exit 1; }
  rm -rf "$QEMU72.debs" && mkdir -p "$QEMU72.debs"
  (cd "$QEMU72.debs" && apt-get download -q "qemu-utils=$v" "qemu-block-extra=$v" >/dev/null 2>&1)
  for deb in "$QEMU72.debs"/*.deb; do dpkg -x "$deb" "$QEMU72"; done
}
# exec: started in the background, the server's PID is qemu-nbd's own (for stop and CPU).
qemu_nbd72() {
  QEMU_MODULE_DIR=$QEMU72/usr/lib/x86_64-linux-gnu/qemu exec "$QEMU72/usr/bin/qemu-nbd" "$@"
}

SPID=""
URI=""
TLS_CLIENT=""
chmod 0777 "$LOGS"
stop_server() {
  if [[ -n $SPID ]]; then
    kill -TERM "$SPID" 2>/dev/null || true
    wait "$SPID" 2>/dev/null || true
  fi
  SPID=""
  # Each RBD peer's image goes once it is measured (memstore holds it in memory).
  if [[ -n $RBD_IMAGE ]]; then
    rbd_cli snap purge "$CEPH_POOL/$RBD_IMAGE" >/dev/null 2>&1 || true
    rbd_cli rm "$CEPH_POOL/$RBD_IMAGE" >/dev/null 2>&1 || true
    RBD_IMAGE=""
  fi
}
trap 'stop_server; ceph_stop' EXIT

wait_uri() {
  for _ in $(seq 1 300); do
    client nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
    kill -0 "$SPID" 2>/dev/null || { echo "the server died; see $LOGS" >&2; return 1; }
    sleep 0.1
  done
  echo "no answer on $URI" >&2
  return 1
}

# Runs a client: as nobody with HOME=WORKDIR/tls-home for the TLS servers; on CPU 1 with -p.
# Its CPU-seconds (user + system, with everything it waited for) go to $CLIENT_CPU.
CLIENT_CPU=$WORK/client-cpu
client() {
  local pin=()
  [[ -n $PIN ]] && pin=(taskset -c 1)
  if [[ -n $TLS_CLIENT ]]; then
    pin+=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$WORK/tls-home")
  fi
  python3 -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{u.ru_utime + u.ru_stime}\n")
sys.exit(rc)' "$CLIENT_CPU" "${pin[@]}" "$@"
}

start_server() {
  local name=$1
  TLS_CLIENT=""
  rm -f "$SOCK"
  case $name in
    cryptnbd | cryptnbd-tcp | cryptnbd-tls | cryptnbd-rbd | cryptnbd-4conn | cryptnbd-512 | cryptnbd-direct)
      local state=$WORK/cryptnbd-state run=$WORK/cryptnbd-run config=$WORK/cryptnbd.toml
      rm -rf "$state" "$run"
      if [[ $name == cryptnbd-rbd ]]; then
        ceph_start
        RBD_IMAGE=bench
      fi
      {
        echo "state_dir = \"$state\""
        echo "runtime_dir = \"$run\""
        # CRYPTNBD_BENCH_CONFIG: more lines for the daemon's configuration (say, [limits]).
        [[ -n ${CRYPTNBD_BENCH_CONFIG:-} ]] && printf '%s\n' "$CRYPTNBD_BENCH_CONFIG"
        [[ $name == cryptnbd-direct ]] && printf '[store.file]\nio = "direct"\n'
        if [[ $name == cryptnbd-rbd ]]; then
          printf '[store]\ndefault = "rbd"\n[store.rbd]\nconf = "%s"\npool = "%s"\nid = "admin"\n' \
            "$CEPH_CONF" "$CEPH_POOL"
        fi
        if [[ $name == cryptnbd-tcp || $name == cryptnbd-tls ]]; then
          printf '[nbd]\ntcp = "127.0.0.1:%s"\n' "$PORT"
        fi
        if [[ $name == cryptnbd-tls ]]; then
          make_pki
          printf '[nbd.tls]\nmode = "require"\ncertificates = "%s"\n' "$PKI/server"
        fi
      } >"$config"
      "$BIN/cryptnbd" --config "$config" >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      local ctl=("$BIN/cryptnbdctl" --state-dir "$state" --socket "$run/control.sock")
      for _ in $(seq 1 300); do "${ctl[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
      "${ctl[@]}" kms create-key --alias alias/bench >/dev/null
      local sector=()
      [[ $name == cryptnbd-512 ]] && sector=(--sector-size 512)
      "${ctl[@]}" create bench --size "${SIZE_MIB}M" --kms-key alias/bench "${sector[@]}" \
        --sid S-1-5-21-277731876-1789304096-451871588-1107 --directory d-1234abcd01 >/dev/null
      case $name in
        cryptnbd | cryptnbd-rbd | cryptnbd-4conn | cryptnbd-512 | cryptnbd-direct)
          "${ctl[@]}" attach bench --transient >/dev/null
          URI="nbd+unix:///bench?socket=$run/nbd.sock" ;;
        cryptnbd-tcp)
          "${ctl[@]}" attach bench --transient --tcp >/dev/null
          URI="nbd://127.0.0.1:$PORT/bench" ;;
        cryptnbd-tls)
          "${ctl[@]}" attach bench --transient --tcp >/dev/null
          URI="nbds://127.0.0.1:$PORT/bench"
          TLS_CLIENT=1 ;;
      esac
      ;;
    nbdkit-tls)
      make_pki
      nbdkit -f -i 127.0.0.1 -p "$PORT" --tls=require --tls-certificates="$PKI/server" \
        --tls-verify-peer file "$PLAIN" >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      URI="nbds://127.0.0.1:$PORT/"
      TLS_CLIENT=1
      ;;
    nbdkit-luks)
      nbdkit -f -U "$SOCK" --filter=luks file "$LUKS1" passphrase="$PASS" >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      URI="nbd+unix:///?socket=$SOCK"
      ;;
    qemu-nbd-luks)
      qemu-nbd --socket="$SOCK" --persistent --shared=8 --cache=none --aio=threads \
        --object "secret,id=sec0,data=$PASS" --image-opts \
        "driver=luks,key-secret=sec0,file.driver=file,file.filename=$LUKS1" >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      URI="nbd+unix:///?socket=$SOCK"
      ;;
    nbdkit-file)
      nbdkit -f -U "$SOCK" file "$PLAIN" >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      URI="nbd+unix:///?socket=$SOCK"
      ;;
    qemu-nbd-file)
      qemu-nbd --socket="$SOCK" --persistent --shared=8 -f raw --cache=none --aio=io_uring \
        "$PLAIN" >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      URI="nbd+unix:///?socket=$SOCK"
      ;;
    nbdkit-memory)
      nbdkit -f -U "$SOCK" memory "$SIZE" >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      URI="nbd+unix:///?socket=$SOCK"
      ;;
    qemu-nbd-rbd)
      ceph_start && qemu72
      RBD_IMAGE=plain
      rbd_cli create --size "$SIZE_MIB" "$CEPH_POOL/$RBD_IMAGE"
      qemu_nbd72 --socket="$SOCK" --persistent --shared=8 --cache=writeback -f raw \
        "rbd:$CEPH_POOL/$RBD_IMAGE:conf=$CEPH_CONF:id=admin" >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      URI="nbd+unix:///?socket=$SOCK"
      ;;
    qemu-nbd-rbd-luks)
      ceph_start && qemu72
      RBD_IMAGE=luks2
      # librbd's LUKS2 header takes room at the start: the image is made larger so that the
      # export has the same size as the others.
      rbd_cli create --size $((SIZE_MIB + 32)) "$CEPH_POOL/$RBD_IMAGE"
      printf %s "$PASS" >"$WORK/rbd-pass"
      rbd_cli encryption format "$CEPH_POOL/$RBD_IMAGE" luks2 "$WORK/rbd-pass" >/dev/null
      qemu_nbd72 --socket="$SOCK" --persistent --shared=8 --cache=writeback \
        --object "secret,id=sec0,file=$WORK/rbd-pass" --image-opts \
        "driver=rbd,pool=$CEPH_POOL,image=$RBD_IMAGE,conf=$CEPH_CONF,user=admin,encrypt.format=luks2,encrypt.key-secret=sec0" \
        >"$LOGS/$name.log" 2>&1 &
      SPID=$!
      URI="nbd+unix:///?socket=$SOCK"
      ;;
    fio-rbd)
      ceph_start
      RBD_IMAGE=fio
      rbd_cli create --size "$SIZE_MIB" "$CEPH_POOL/$RBD_IMAGE"
      # No server: fio runs librbd itself. A placeholder process keeps the loop's shape.
      sleep infinity &
      SPID=$!
      URI=""
      return 0
      ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  wait_uri
}

ticks() { awk '{print $14 + $15}' "/proc/$SPID/stat"; }
# The whole machine's CPU time from /proc/stat, in ticks: "BUSY IDLE STEAL" (busy is user,
# nice, system, irq and softirq; idle counts iowait too).
machine() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8, $5 + $6, $9; exit}' /proc/stat; }
# cores T0 T1 M0 M1 S0 S1 CLIENT_SECONDS: "SERVER CLIENT IDLE OTHER STEAL" in cores over the
# interval, where OTHER is what the machine did beside server and client (kernel threads such
# as write-back, other processes).
cores() {
  python3 -c '
import sys
t0, t1, s0, s1, client, tck = (float(x) for x in sys.argv[1:7])
m0, m1 = [float(x) for x in sys.argv[7].split()], [float(x) for x in sys.argv[8].split()]
wall = t1 - t0
server = (s1 - s0) / tck / wall
client = client / wall
busy, idle, steal = ((b - a) / tck / wall for a, b in zip(m0, m1))
print(f"{server} {client} {idle} {max(busy - server - client, 0)} {steal}")' "$@" "$(getconf CLK_TCK)" "$M0" "$M1"
}

# measure KIND RUN: prints "VALUE SERVER_CORES CLIENT_CORES IDLE_CORES OTHER_CORES STEAL_CORES"
measure() {
  local kind=$1 run=$2 log="$LOGS/$CURRENT.$1.$2" t0 t1 s0 s1 value
  rm -f "$log.json"
  sync
  s0=$(ticks)
  M0=$(machine)
  t0=$(date +%s.%N)
  if [[ $CURRENT == fio-rbd ]]; then
    local rw=$kind bs=4k timed=()
    [[ $kind == write || $kind == read ]] && bs=1M
    [[ $kind == randread || $kind == randwrite ]] && timed=(--time_based --runtime="$FIO_SECONDS" --ramp_time=2)
    CEPH_CONF=$CEPH_CONF client fio --name="$kind" --ioengine=rbd --clientname=admin --pool="$CEPH_POOL" \
      --rbdname="$RBD_IMAGE" --rw="$rw" --bs="$bs" --iodepth=32 --numjobs=1 \
      "${timed[@]}" \
      --size="$SIZE" --output-format=json --output="$log.json" \
      --direct=1 >"$log" 2>&1
    t1=$(date +%s.%N)
    M1=$(machine)
    value=$(python3 -c "
import json; t=open('$log.json').read(); j=json.loads(t[t.index('{'):])['jobs'][0]
k='$([[ $kind == *read ]] && echo read || echo write)'
print(j[k]['bw_bytes'] / 1e6 if '$bs' == '1M' else j[k]['iops'])")
    read -r _ cc idle other steal < <(cores "$t0" "$t1" 0 0 "$(cat "$CLIENT_CPU")")
    echo "$value 0 $cc $idle $other $steal"
    return 0
  fi
  # cryptnbd-4conn: 4 connections, the same total queue depth.
  local conns=() jobs=(--iodepth=32 --numjobs=1)
  if [[ $CURRENT == cryptnbd-4conn ]]; then
    conns=(-C 4)
    jobs=(--iodepth=8 --numjobs=4 --group_reporting)
  fi
  local prof="" rec="" st=""
  if [[ -n $PROFILE && $run == 1 ]]; then
    command -v perf >/dev/null || { echo "-P needs perf: apt-get install linux-perf" >&2; exit 1; }
    prof=$WORK/profiles/$CURRENT.$kind
    mkdir -p "$WORK/profiles"
    perf record -q -F 999 -p "$SPID" -o "$prof.perf.data" >/dev/null 2>&1 &
    rec=$!
    perf stat -x, -e task-clock,page-faults,context-switches,raw_syscalls:sys_enter -p "$SPID" \
      -o "$prof.stat" >/dev/null 2>&1 &
    st=$!
    sleep 0.5
  fi
  case $kind in
    write) client nbdcopy --no-extents "${conns[@]}" "$SRC" "$URI" >"$log" 2>&1 ;;
    read) client nbdcopy --no-extents "${conns[@]}" "$URI" null: >"$log" 2>&1 ;;
    randread | randwrite)
      client fio --name="$kind" --ioengine=nbd --uri="$URI" --rw="$kind" --bs=4k "${jobs[@]}" \
        --time_based --runtime="$FIO_SECONDS" --ramp_time=2 --size="$SIZE" \
        --output-format=json --output="$log.json" >"$log" 2>&1 ;;
  esac
  t1=$(date +%s.%N)
  s1=$(ticks)
  M1=$(machine)
  if [[ -n $prof ]]; then
    kill -INT "$rec" "$st" 2>/dev/null || true
    wait "$rec" "$st" 2>/dev/null || true
    perf report -i "$prof.perf.data" --no-children --sort dso,sym --percent-limit 0.5 --stdio \
      >"$prof.report.txt" 2>/dev/null || true
    python3 - "$prof.stat" "$log.json" "$kind" "$SIZE" "$(python3 -c "print($t1 - $t0)")" \
      >"$prof.summary" <<'PY' || true
import json, sys
stat, fio, kind, size, wall = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
c = {}
for line in open(stat):
    f = line.strip().split(",")
    if len(f) > 2 and f[0] and f[0][0].isdigit():
        c[f[2]] = float(f[0])
if kind in ("write", "read"):
    reqs = size / (256 << 10)
else:
    t = open(fio).read()
    j = json.loads(t[t.index("{"):])["jobs"][0]
    # fio counts the requests after its ramp; perf saw the whole run: scale to it.
    reqs = j["read" if kind == "randread" else "write"]["total_ios"] * wall / (j["job_runtime"] / 1000)
print(f"{kind}: {reqs:.0f} requests; per request: {c.get('task-clock', 0) * 1000 / reqs:.1f} us CPU, "
      f"{c.get('raw_syscalls:sys_enter', 0) / reqs:.2f} syscalls, {c.get('page-faults', 0) / reqs:.3f} page faults, "
      f"{c.get('context-switches', 0) / reqs:.2f} context switches")
PY
    echo "   profile: $(cat "$prof.summary") ($prof.report.txt)" >&2
  fi
  case $kind in
    write | read) value=$(python3 -c "print($SIZE / ($t1 - $t0) / 1e6)") ;;
    *) value=$(python3 -c "
import json; t=open('$log.json').read(); j=json.loads(t[t.index('{'):])['jobs'][0]
print(j['$([[ $kind == randread ]] && echo read || echo write)']['iops'])") ;;
  esac
  echo "$value $(cores "$t0" "$t1" "$s0" "$s1" "$(cat "$CLIENT_CPU")")"
}

summary() { python3 -c '
import sys, statistics as st
v = [float(x) for x in sys.argv[1:]]
print(f"{st.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]")' "$@"; }
median() { python3 -c 'import sys, statistics as st; print(f"{st.median([float(x) for x in sys.argv[1:]]):.2f}")' "$@"; }

# Medians per server and kind, for the columns computed once every server has run:
# RESULT[server:kind] = "shown|value server_cores client_cores idle other steal server_per_gb
# of_limit": medians over the runs; the last two are each run's own figure (CPU-seconds per GB,
# and (server + client cores) / 2), then the median, so that a slow first write into a fresh
# file does not pair one run's CPU with another's throughput.
declare -A RESULT=()
for CURRENT in "${SERVERS[@]}"; do
  echo "== $CURRENT"
  # Every server starts from an empty page cache: the folio sizes the cache holds for a file
  # decide small random-write speed (docs/benchmarks.md), so none inherits another's.
  sync
  if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
  # The source of the writes is read into the page cache again: nbdcopy evicts the pages of
  # a source file that were not cached when it read them, so without this every write run
  # waited for the disk under the source, for every server alike.
  cat "$SRC" >/dev/null
  # Every server's first write goes into unallocated space, as cryptnbd's new volume does:
  # the images the other servers share are made sparse again (a write that allocates blocks
  # costs more than an overwrite; before 2026-12-06 only cryptnbd paid it).
  unallocate_images
  start_server "$CURRENT"
  # -p: every thread the server has (and, inherited, every one it starts) on CPU 0.
  [[ -n $PIN ]] && taskset -a -p -c 0 "$SPID" >/dev/null
  for w in $(seq 1 "$WARMUP"); do
    read -r v _ < <(measure write "warmup$w")
    echo "   warm-up write $w: $(printf %.0f "$v") (not counted)"
  done
  for kind in write read randread randwrite; do
    [[ ",$KINDS," == *",$kind,"* ]] || continue
    vals=() cs=() ccs=() idles=() others=() steals=() pergbs=() oflimits=()
    for r in $(seq 1 "$RUNS"); do
      read -r v c cc idle other steal < <(measure "$kind" "$r")
      vals+=("$v") cs+=("$c") ccs+=("$cc") idles+=("$idle") others+=("$other") steals+=("$steal")
      pergbs+=("$(python3 -c "print($c / ($v / 1000) if $v > 0 else 0)")")
      oflimits+=("$(python3 -c "print(($c + $cc) / 2)")")
      echo "   $kind run $r: $(printf %.0f "$v") (cores: server $(printf %.2f "$c"), client $(printf %.2f "$cc"), idle $(printf %.2f "$idle"), other $(printf %.2f "$other"), steal $(printf %.2f "$steal"))"
    done
    RESULT[$CURRENT:$kind]="$(summary "${vals[@]}")|$(median "${vals[@]}") $(median "${cs[@]}") $(median "${ccs[@]}") $(median "${idles[@]}") $(median "${others[@]}") $(median "${steals[@]}") $(median "${pergbs[@]}") $(median "${oflimits[@]}")"
  done
  stop_server
done

# The table: one row per server, its columns from RESULT.
RESULTS=$(for k in "${!RESULT[@]}"; do printf '%s=%s\n' "$k" "${RESULT[$k]}"; done)
{
  echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
  echo "export $SIZE_MIB MiB, $RUNS runs (after $WARMUP unmeasured writes), fio ${FIO_SECONDS}s; median [min-max]; CPU in cores (median)${PIN:+; server pinned to CPU 0, client to CPU 1}."
  echo
  python3 - "${SERVERS[@]}" <<PY
import sys
res = {}
for line in """$RESULTS""".splitlines():
    if not line.strip():
        continue
    key, val = line.split("=", 1)
    shown, nums = val.split("|")
    v, c, cc, idle, other, steal, per_gb, of_limit = (float(x) for x in nums.split())
    res[key] = (shown, v, c, cc, idle, other, steal, per_gb, of_limit)
kinds = ["write", "read", "randread", "randwrite"]
print("| server | seq write MB/s | seq read MB/s | 4K randread IOPS | 4K randwrite IOPS "
      "| server cores w / r / rr / rw | client cores w / r "
      "| vs nbdkit-file w / r / rr / rw | server core-s/GB w / r | 2-core limit w / r MB/s (of limit) "
      "| machine idle / other / steal cores w / r |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
def get(s, k):
    return res.get(f"{s}:{k}")
for s in sys.argv[1:]:
    cells = [s]
    cells += [get(s, k)[0] if get(s, k) else "-" for k in kinds]
    cells.append(" / ".join(f"{get(s, k)[2]:.2f}" if get(s, k) else "-" for k in kinds))
    cells.append(" / ".join(f"{get(s, k)[3]:.2f}" if get(s, k) else "-" for k in ["write", "read"]))
    ratios = []
    for k in kinds:
        a, b = get(s, k), get("nbdkit-file", k)
        ratios.append(f"{a[1] / b[1]:.2f}" if a and b and b[1] else "-")
    cells.append(" / ".join(ratios))
    per_gb, limits = [], []
    for k in ["write", "read"]:
        r = get(s, k)
        if r and r[1] > 0:
            per_gb.append(f"{r[7]:.2f}")
            if r[8] > 0:
                # The limit at the median throughput, and the median run's share of it.
                limits.append(f"{r[1] / r[8]:.0f} ({r[8]:.2f})")
            else:
                limits.append("-")
        else:
            per_gb.append("-")
            limits.append("-")
    cells.append(" / ".join(per_gb))
    cells.append(" / ".join(limits))
    cells.append(" ; ".join(" / ".join(f"{get(s, k)[i]:.2f}" for i in (4, 5, 6)) if get(s, k) else "-"
                            for k in ["write", "read"]))
    print("| " + " | ".join(cells) + " |")
PY
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo
cat "$OUT"
