# A libnbd client that knows exactly which of its writes the server acknowledged
# (tests/tests/crash_cycles.rs runs it under nbdsh).
#
# MODE=write: random 4 KiB writes over [START, START+SIZE), DEPTH in flight, never two at
# once to the same block; every 8th write has FUA and a FLUSH follows every 16 writes. Runs
# until the connection dies (or LIMIT seconds), then writes STATE, a JSON object:
#   acked:    {block: generation} the last write of each block the server acknowledged
#   inflight: {block: generation} writes sent and not answered when the connection died
#   durable:  how many acknowledged writes an acknowledged FLUSH or FUA covered
#   written, acked_writes: how many writes were sent, and answered
# Block B's generation G is 4096 bytes made of "c<CYCLE> b<B> g<G>" lines.
#
# MODE=check: reads every block in STATE; each must hold its acknowledged generation, or the
# one in flight when the connection died. Prints what it checked; exits 1 on a lost write.
# fio's own verify state cannot do this after a kill: it counts the writes that failed in
# flight as written (docs/reliability.md).
import json
import os
import random
import sys
import time

import nbd

BS = 4096
uri = os.environ["URI"]
start = int(os.environ["START"])
cycle = int(os.environ["CYCLE"])
state_file = os.environ["STATE"]


def block(b, g):
    line = b"c%06d b%08d g%06d\n" % (cycle, b, g)
    data = line * (BS // len(line))
    return data + b"." * (BS - len(data))


def write():
    size = int(os.environ["SIZE"])
    depth = int(os.environ.get("DEPTH", "16"))
    limit = float(os.environ.get("LIMIT", "30"))
    rnd = random.Random(cycle * 7919 + start)
    blocks = size // BS
    gen = {}  # block -> last generation sent
    acked = {}
    inflight = {}  # cookie -> (block, generation, buffer, is_fua)
    flushes = {}  # cookie -> acked writes count when the flush was sent
    sent_acked = []  # (block, generation) acked, in order, not yet covered by a flush
    durable = 0
    written = 0
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            busy = {v[0] for v in inflight.values()}
            while len(inflight) + len(flushes) < depth:
                b = rnd.randrange(blocks)
                if b in busy:
                    continue
                g = gen.get(b, 0) + 1
                gen[b] = g
                buf = nbd.Buffer.from_bytearray(bytearray(block(b, g)))
                fua = written % 8 == 7
                cookie = h.aio_pwrite(
                    buf, start + b * BS, flags=nbd.CMD_FLAG_FUA if fua else 0
                )
                inflight[cookie] = (b, g, buf, fua)
                busy.add(b)
                written += 1
                if written % 16 == 0:
                    flushes[h.aio_flush()] = len(sent_acked)
            h.poll(-1)
            for cookie in list(inflight):
                if h.aio_command_completed(cookie):
                    b, g, _, fua = inflight.pop(cookie)
                    acked[b] = g
                    if fua:
                        durable += 1
                    else:
                        sent_acked.append((b, g))
            for cookie in list(flushes):
                if h.aio_command_completed(cookie):
                    covered = flushes.pop(cookie)
                    durable += covered
                    del sent_acked[:covered]
                    for c in flushes:
                        flushes[c] = max(0, flushes[c] - covered)
    except nbd.Error:
        pass
    with open(state_file + ".tmp", "w") as f:
        json.dump(
            {
                "acked": acked,
                "inflight": {b: g for (b, g, _, _) in inflight.values()},
                "durable": durable,
                "written": written,
                "acked_writes": written - len(inflight),
            },
            f,
        )
    os.rename(state_file + ".tmp", state_file)


def check():
    with open(state_file) as f:
        state = json.load(f)
    acked = {int(b): g for b, g in state["acked"].items()}
    inflight = {int(b): g for b, g in state["inflight"].items()}
    h = nbd.NBD()
    h.connect_uri(uri)
    lost = []
    for b, g in sorted(acked.items()):
        got = h.pread(BS, start + b * BS)
        if got != block(b, g) and not (b in inflight and got == block(b, inflight[b])):
            lost.append((b, g, got[:24]))
    h.shutdown()
    print(
        json.dumps(
            {
                "blocks": len(acked),
                "lost": len(lost),
                "acked_writes": state["acked_writes"],
                "durable": state["durable"],
            }
        )
    )
    if lost:
        b, g, got = lost[0]
        print(
            "%d of %d acknowledged writes lost; the first: block %d, generation %d, holds %r"
            % (len(lost), len(acked), b, g, got),
            file=sys.stderr,
        )
        sys.exit(1)


{"write": write, "check": check}[os.environ["MODE"]]()
