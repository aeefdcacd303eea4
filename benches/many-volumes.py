#!/usr/bin/python3
"""Many volumes in one daemon, under load (issue 17, item 6).

    benches/many-volumes.py [-n VOLUMES] [-N ATTACHED] [-c CONNECTIONS] [-t SECONDS]
                            [-s SIZE_MIB] [-d WORKDIR] [-b BINDIR] [-o RESULTS.md]
                            [-T load,attach,idle,slow]

Four parts, each with a daemon of its own (release build, local KMS, 4096-byte sectors):
  load    VOLUMES volumes (default 100) of SIZE_MIB MiB (default 64), each filled with random
          data, then one fio client per volume (nbd engine, 4K randrw 50/50, iodepth 8, fio
          threads, SECONDS each, default 15). Beside it, the same fio jobs on one volume of
          VOLUMES x SIZE_MIB, each job on its own SIZE_MIB region: the same clients, total
          queue depth and working set on a single volume. Reports total IOPS and
          their ratio, p99 completion latency, and the daemon's RSS: started, attached and
          idle, and the peak under load (sampled every 0.25 s), per volume.
  attach  ATTACHED volumes (default 1000) of 16 MiB: each created, then attached with
          `cryptnbdctl attach` (timed per call, the CLI process included); the RSS once all
          are attached; then every one detached, timed in total.
  idle    CONNECTIONS idle NBD connections (default 1000, libnbd) to one volume: the daemon's
          RSS before and after they are opened, per connection.
  slow    a volume on a slow store beside a normal one. The slow store is a loop device over
          nbdfuse's file of an nbdkit file export with the delay filter (20 ms per read and
          write), named in [store.devices]. fio 4K randread at iodepth 8 on the normal volume
          alone, then again while another fio reads the slow volume at iodepth 8: IOPS and p99.
-b takes the cryptnbd and cryptnbdctl to measure (default: target/release, built here), so
that two builds can be compared in one sitting. Writes a Markdown table to RESULTS.md
(default WORKDIR/results.md) and stdout. Run as root (the daemon locks its memory; the slow
part needs losetup and FUSE). Needs fio, libnbd-bin, python3-libnbd, nbdkit (its random
plugin fills the load part's volumes) and for `slow` nbdfuse (apt-get install fio libnbd-bin
python3-libnbd nbdkit nbdfuse).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SID = "S-1-5-21-277731876-1789304096-451871588-1107"
DIRECTORY = "d-1234abcd01"


def log(msg):
    print(f"== {time.strftime('%H:%M:%S')} {msg}", flush=True)


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Sampler:
    """The peak RSS of a process, sampled every 0.25 s while in a `with` block."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self):
        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_kib(self.pid))
                self._stop.wait(0.25)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class Daemon:
    """A release daemon of its own under WORKDIR/NAME; `state_from` seeds its state directory
    (the local keystore and the catalog of another daemon)."""

    def __init__(self, bindir, work, name, extra="", state_from=None):
        self.work = Path(work) / name
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.state, self.run = self.work / "state", self.work / "run"
        if state_from:
            shutil.copytree(state_from, self.state)
        config = self.work / "cryptnbd.toml"
        config.write_text(f'state_dir = "{self.state}"\nruntime_dir = "{self.run}"\n{extra}')
        self.bindir = Path(bindir)
        self.logf = open(self.work / "daemon.log", "w")
        self.proc = subprocess.Popen(
            [self.bindir / "cryptnbd", "--config", config], stdout=self.logf, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while subprocess.run(self.ctl_args("status"), capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: see {self.work / 'daemon.log'}")
            time.sleep(0.1)
        if not state_from:
            self.ctl("kms", "create-key", "--alias", "alias/many")

    def ctl_args(self, *args):
        return [self.bindir / "cryptnbdctl", "--state-dir", self.state, "--socket", self.run / "control.sock", *args]

    def ctl(self, *args):
        r = subprocess.run(self.ctl_args(*args), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cryptnbdctl {' '.join(map(str, args))}: {r.stderr.strip()}")
        return r.stdout

    def create(self, name, size_mib, *extra):
        self.ctl("create", name, "--size", f"{size_mib}M", "--kms-key", "alias/many",
                 "--sid", SID, "--directory", DIRECTORY, *extra)

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.run / 'nbd.sock'}"

    def rss(self):
        return rss_kib(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


def fio(uris, seconds, rw, iodepth=8, label="fio", region_mib=None):
    """One fio thread per URI (the same URI may repeat); returns (IOPS, p99 ms). With
    `region_mib`, job i works on its own region i of that size (the same URI repeated)."""
    lines = ["[global]", "ioengine=nbd", f"rw={rw}", "bs=4k", f"iodepth={iodepth}", "time_based=1",
             f"runtime={seconds}", "thread=1", "group_reporting=1", "randrepeat=0"]
    for i, u in enumerate(uris):
        lines += [f"[j{i}]", f"uri={u}"]
        if region_mib:
            lines += [f"offset={i * region_mib}M", f"size={region_mib}M"]
    with tempfile.NamedTemporaryFile("w", suffix=".fio", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        r = subprocess.run(["fio", "--output-format=json", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise RuntimeError(f"{label}: fio failed: {r.stderr.strip()[-2000:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    p99 = max(
        job[d]["clat_ns"].get("percentile", {}).get("99.000000", 0) for d in ("read", "write")
    ) / 1e6
    if job["error"]:
        raise RuntimeError(f"{label}: fio reports error {job['error']}")
    return iops, p99


def wait_for(path, failure, seconds=10):
    """Waits until `path` exists; raises `failure` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(0.05)


def fill(uri, size_mib):
    subprocess.run(["nbdcopy", "--", "[", "nbdkit", "random", f"{size_mib}M", "]", uri], check=True)


def part_load(a, rows):
    d = Daemon(a.bindir, a.workdir, "load")
    try:
        started = d.rss()
        names = [f"v{i}" for i in range(a.volumes)]
        log(f"load: creating, attaching and filling {a.volumes} volumes of {a.size} MiB")
        for n in names:
            d.create(n, a.size)
            d.ctl("attach", n, "--transient")
        attached = d.rss()
        for n in names:
            fill(d.uri(n), a.size)
        idle = d.rss()
        log(f"load: one fio job per volume, {a.volumes} jobs at iodepth 8, {a.seconds} s")
        with Sampler(d.proc.pid) as s:
            many_iops, many_p99 = fio([d.uri(n) for n in names], a.seconds, "randrw", label="many")
        many_peak = s.peak
        log(f"load: the same {a.volumes} jobs on one volume of {a.volumes} x {a.size} MiB, "
            "each on its own region")
        d.create("big", a.volumes * a.size)
        d.ctl("attach", "big", "--transient")
        fill(d.uri("big"), a.volumes * a.size)
        with Sampler(d.proc.pid) as s:
            one_iops, one_p99 = fio([d.uri("big")] * a.volumes, a.seconds, "randrw", label="one",
                                    region_mib=a.size)
        one_peak = s.peak
    finally:
        d.stop()
    per_vol = (many_peak - started) / a.volumes / 1024
    rows.append(("load", [
        f"{a.volumes} volumes, a client each: {many_iops:,.0f} IOPS, p99 {many_p99:.2f} ms",
        f"one volume of the same total size, the same {a.volumes} clients each on its own "
        f"region: {one_iops:,.0f} IOPS, p99 {one_p99:.2f} ms",
        f"ratio many / one: {many_iops / one_iops:.2f}",
        f"daemon RSS: started {started / 1024:.1f} MiB, {a.volumes} attached {attached / 1024:.1f} MiB, "
        f"filled and idle {idle / 1024:.1f} MiB, peak under load {many_peak / 1024:.1f} MiB "
        f"({per_vol:.2f} MiB per volume over the started daemon); one volume's load peak "
        f"{one_peak / 1024:.1f} MiB",
    ]))


def part_attach(a, rows):
    d = Daemon(a.bindir, a.workdir, "attach")
    try:
        started = d.rss()
        names = [f"a{i}" for i in range(a.attached)]
        log(f"attach: creating {a.attached} volumes of 16 MiB")
        t0 = time.monotonic()
        for n in names:
            d.create(n, 16)
        create_s = time.monotonic() - t0
        log(f"attach: attaching {a.attached}")
        times = []
        for n in names:
            t = time.monotonic()
            d.ctl("attach", n, "--transient")
            times.append((time.monotonic() - t) * 1000)
        attached = d.rss()
        status = json.loads(d.ctl("--json", "status"))
        count = len(status["attachments"])
        log(f"attach: detaching {a.attached}")
        t0 = time.monotonic()
        for n in names:
            d.ctl("detach", n)
        detach_s = time.monotonic() - t0
        after = d.rss()
    finally:
        d.stop()
    q = statistics.quantiles(times, n=10)
    rows.append(("attach", [
        f"{a.attached} volumes created in {create_s:.1f} s",
        f"attach (one `cryptnbdctl attach` each): median {statistics.median(times):.1f} ms, "
        f"p90 {q[8]:.1f} ms, max {max(times):.1f} ms; status lists {count}",
        f"daemon RSS: started {started / 1024:.1f} MiB, {a.attached} attached {attached / 1024:.1f} MiB "
        f"({(attached - started) / a.attached:.0f} KiB per volume), after detaching all {after / 1024:.1f} MiB",
        f"detaching all {a.attached} (one `cryptnbdctl detach` each): {detach_s:.2f} s",
    ]))


def part_idle(a, rows):
    import nbd  # python3-libnbd

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, a.connections + 256)), hard))
    d = Daemon(a.bindir, a.workdir, "idle")
    handles = []
    try:
        d.create("idle", 64)
        d.ctl("attach", "idle", "--transient")
        before = d.rss()
        log(f"idle: opening {a.connections} connections")
        t0 = time.monotonic()
        for _ in range(a.connections):
            h = nbd.NBD()
            h.connect_uri(d.uri("idle"))
            handles.append(h)
        open_s = time.monotonic() - t0
        time.sleep(1)
        after = d.rss()
        # Every connection still answers.
        for h in handles:
            h.pread(4096, 0)
        answered = d.rss()
        for h in handles:
            h.shutdown()
        handles.clear()
    finally:
        handles.clear()
        d.stop()
    rows.append(("idle", [
        f"{a.connections} connections opened in {open_s:.1f} s",
        f"daemon RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with them open "
        f"({(after - before) / a.connections:.1f} KiB per connection), {answered / 1024:.1f} MiB "
        f"after each answered one 4 KiB read",
    ]))


def part_slow(a, rows):
    for tool in ("nbdkit", "nbdfuse", "losetup"):
        if not shutil.which(tool):
            raise RuntimeError(f"the slow part needs {tool}: apt-get install nbdkit nbdfuse")
    work = Path(a.workdir) / "slow-store"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sock, mnt = work / "nbdkit.sock", work / "mnt"
    mnt.mkdir()
    # The slow volume: made offline as a file, then served back through a delay.
    d = Daemon(a.bindir, a.workdir, "slow-make")
    try:
        d.create("slowfile", a.size)
        d.ctl("attach", "slowfile", "--transient")
        fill(d.uri("slowfile"), a.size)
        d.ctl("detach", "slowfile")
    finally:
        d.stop()
    image = d.state / "volumes" / "slowfile.luks"
    procs, loop = [], None
    try:
        procs.append(subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--filter=delay", "file",
                                       str(image), "delay-read=20ms", "delay-write=20ms"]))
        wait_for(sock, "nbdkit did not start")
        procs.append(subprocess.Popen(["nbdfuse", str(mnt), f"nbd+unix:///?socket={sock}"]))
        wait_for(mnt / "nbd", "nbdfuse did not mount")
        loop = subprocess.run(["losetup", "--find", "--show", str(mnt / "nbd")],
                              capture_output=True, text=True, check=True).stdout.strip()
        # The same volume, now named `slow` and read through the loop device: every read
        # that misses the page cache waits 20 ms in nbdkit.
        d = Daemon(a.bindir, a.workdir, "slow", f'[store.devices]\nslow = "{loop}"\n',
                   state_from=d.state)
        try:
            d.create("fast", a.size)
            d.ctl("attach", "fast", "--transient")
            d.ctl("attach", "slow", "--transient")
            fill(d.uri("fast"), a.size)
            log(f"slow: the normal volume alone, {a.seconds} s")
            alone, alone_p99 = fio([d.uri("fast")], a.seconds, "randread", label="alone")
            log("slow: the normal volume beside the slow one")
            slow_out = {}

            def slow_client():
                slow_out["r"] = fio([d.uri("slow")], a.seconds + 4, "randread", label="slow")

            t = threading.Thread(target=slow_client)
            t.start()
            time.sleep(2)
            beside, beside_p99 = fio([d.uri("fast")], a.seconds, "randread", label="beside")
            t.join()
            slow_iops, slow_p99 = slow_out["r"]
        finally:
            d.stop()
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop])
        for p in reversed(procs):
            if p.args[0] == "nbdfuse":
                subprocess.run(["umount", str(mnt)], capture_output=True)
            p.terminate()
            p.wait()
    rows.append(("slow", [
        f"normal volume alone: {alone:,.0f} IOPS, p99 {alone_p99:.2f} ms",
        f"beside the slow one: {beside:,.0f} IOPS, p99 {beside_p99:.2f} ms "
        f"({beside / alone:.2f} of alone)",
        f"the slow volume (20 ms per store read): {slow_iops:,.0f} IOPS, p99 {slow_p99:.2f} ms",
    ]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", dest="volumes", type=int, default=100)
    p.add_argument("-N", dest="attached", type=int, default=1000)
    p.add_argument("-c", dest="connections", type=int, default=1000)
    p.add_argument("-t", dest="seconds", type=int, default=15)
    p.add_argument("-s", dest="size", type=int, default=64)
    p.add_argument("-d", dest="workdir", default="/var/tmp/cryptnbd-many")
    p.add_argument("-b", dest="bindir", default=None)
    p.add_argument("-o", dest="out", default=None)
    p.add_argument("-T", dest="parts", default="load,attach,idle,slow")
    a = p.parse_args()
    for tool in ("fio", "nbdcopy", "nbdkit"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install fio libnbd-bin python3-libnbd nbdkit")
    if a.bindir is None:
        log("building release binaries")
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "daemon", "-p", "ctl"], cwd=REPO, check=True)
        a.bindir = str(REPO / "target" / "release")
    shutil.rmtree(a.workdir, ignore_errors=True)
    Path(a.workdir).mkdir(parents=True)
    rows = []
    parts = {"load": part_load, "attach": part_attach, "idle": part_idle, "slow": part_slow}
    for name in a.parts.split(","):
        parts[name](a, rows)
    out = [f"`benches/many-volumes.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    for name, lines in rows:
        out.append(f"**{name}**")
        out += [f"- {line}" for line in lines]
        out.append("")
    text = "\n".join(out)
    Path(a.out or Path(a.workdir) / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
