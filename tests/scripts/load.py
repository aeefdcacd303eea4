# Clients at the limits, for tests/tests/load.rs (run under nbdsh, which brings libnbd).
# MODE picks one; each prints one JSON line of figures on stdout.
#
# connections: COUNT libnbd connections to URI, each reading and checking a 4 KiB block of
#   the pattern the test wrote (block i holds bytes i % 251); prints {"connected": N, ...},
#   then "HELD", and holds them until a line arrives on stdin.
# writes: COUNT connections, each sending one write of SIZE bytes at once (one shared
#   buffer), at offset (i * SIZE) % VOLUME; waits for every reply.
# slowloris: one raw socket to ADDR (a unix path, or HOST:PORT) that stops after the
#   greeting (STAGE=greeting), or after STARTTLS was accepted and a few bytes of a TLS hello
#   (STAGE=tls), or that sends a WRITE header of SIZE bytes and part of its payload
#   (STAGE=payload, export EXPORT); then it trickles a byte every second and reports how long
#   the server took to close it ({"closed_after": seconds} or {"still_open_after": ...}),
#   after a line "READY" once it stalls. STAGE=replies sends 64 READs of SIZE bytes and then
#   reads nothing for DEAF seconds: it only watches (poll, no read) for the server to hang up.
#   A TCP server's FIN cannot reach a client whose receive window is full, so if no hang-up
#   was seen by then, it reads what is there and reports {"closed_before": DEAF,
#   "bytes_read": N} if the end of the stream comes (N less than the 64 replies: the server
#   gave up on them), else {"still_open_after": ...}.
import json
import os
import select
import socket
import struct
import sys
import time

import nbd

mode = os.environ["MODE"]


def raise_nofile(n):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, n + 64))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def connections():
    uri, count = os.environ["URI"], int(os.environ["COUNT"])
    raise_nofile(count)
    started = time.monotonic()
    handles = []
    for i in range(count):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    connected = time.monotonic() - started
    wrong = 0
    for i, h in enumerate(handles):
        if h.pread(4096, i * 4096) != bytes([i % 251]) * 4096:
            wrong += 1
    print(
        json.dumps(
            {
                "connected": len(handles),
                "connect_seconds": round(connected, 3),
                "read_seconds": round(time.monotonic() - started - connected, 3),
                "wrong": wrong,
            }
        ),
        flush=True,
    )
    print("HELD", flush=True)
    sys.stdin.readline()
    for h in handles:
        h.shutdown()


def writes():
    uri, count = os.environ["URI"], int(os.environ["COUNT"])
    size, volume = int(os.environ["SIZE"]), int(os.environ["VOLUME"])
    raise_nofile(count)
    handles = []
    for _ in range(count):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    buf = nbd.Buffer.from_bytearray(bytearray(b"\xa5" * size))
    started = time.monotonic()
    cookies = [h.aio_pwrite(buf, (i * size) % volume) for i, h in enumerate(handles)]
    failed = 0
    pending = list(zip(handles, cookies))
    while pending:
        still = []
        for h, c in pending:
            try:
                if h.aio_command_completed(c):
                    continue
            except nbd.Error:
                failed += 1
                continue
            still.append((h, c))
        pending = still
        if pending:
            # Let every handle move its bytes.
            for h, _ in pending:
                h.poll(0)
            time.sleep(0.001)
    seconds = time.monotonic() - started
    for h in handles:
        h.shutdown()
    print(
        json.dumps(
            {
                "writes": count,
                "failed": failed,
                "seconds": round(seconds, 3),
                "mb_per_s": round(count * size / seconds / 1e6, 1),
            }
        ),
        flush=True,
    )


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes" % (len(data), n))
        data += chunk
    return data


def slowloris():
    addr, stage, limit = os.environ["ADDR"], os.environ["STAGE"], float(os.environ["LIMIT"])
    if addr.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(addr)
    else:
        host, port = addr.rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
    greeting = recv_exact(s, 18)
    assert greeting[:8] == b"NBDMAGIC", greeting
    if stage in ("tls", "payload", "replies"):
        s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if stage == "tls":
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0))  # NBD_OPT_STARTTLS
        reply = recv_exact(s, 20)
        assert struct.unpack(">I", reply[12:16])[0] == 1, reply  # NBD_REP_ACK
        # A TLS record header announcing 16 KiB of handshake, of which nothing more comes.
        s.sendall(b"\x16\x03\x01\x40\x00")
    if stage in ("payload", "replies"):
        name = os.environ["EXPORT"].encode()
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)  # EXPORT_NAME
        recv_exact(s, 10)  # size and flags (no zeroes)
        size = int(os.environ["SIZE"])
    if stage == "payload":
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, size))
        s.sendall(b"\x00" * 4096)
    if stage == "replies":
        # The server reads these as its budget allows; the kernel holds the rest.
        s.setblocking(False)
        for i in range(64):
            try:
                s.send(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, size))
            except BlockingIOError:
                break
    print("READY", flush=True)
    started = time.monotonic()
    if stage == "replies":
        deaf = float(os.environ["DEAF"])
        p = select.poll()
        p.register(s, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while time.monotonic() - started < deaf:
            if p.poll(500):
                print(json.dumps({"closed_after": round(time.monotonic() - started, 2)}))
                return
        s.setblocking(True)
        s.settimeout(2.0)
        got = 0
        try:
            while time.monotonic() - started < limit:
                chunk = s.recv(1 << 20)
                if not chunk:
                    print(json.dumps({"closed_before": deaf, "bytes_read": got}))
                    return
                got += len(chunk)
        except ConnectionResetError:
            print(json.dumps({"closed_before": deaf, "bytes_read": got}))
            return
        except socket.timeout:
            pass
        print(json.dumps({"still_open_after": round(time.monotonic() - started, 2)}))
        return
    s.settimeout(1.0)
    while time.monotonic() - started < limit:
        try:
            if s.recv(1) == b"":
                print(json.dumps({"closed_after": round(time.monotonic() - started, 2)}))
                return
        except socket.timeout:
            pass
        except OSError:
            print(json.dumps({"closed_after": round(time.monotonic() - started, 2)}))
            return
        try:
            s.sendall(b"\x00")
        except OSError:
            print(json.dumps({"closed_after": round(time.monotonic() - started, 2)}))
            return
    print(json.dumps({"still_open_after": round(time.monotonic() - started, 2)}))


{"connections": connections, "writes": writes, "slowloris": slowloris}[mode]()
