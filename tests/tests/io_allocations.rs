//! The daemon's I/O path makes no heap allocation in steady state.
//!
//! The real daemon runs in this process (`cryptnbd::run` on a multi-thread tokio runtime built
//! as `main` builds it) under a global allocator that counts every allocation. The real
//! `cryptnbdctl` attaches a volume, and a real NBD client (libnbd from Python, one connection,
//! 16 requests in flight) sends a warm-up round of reads, writes, FUA writes, flushes, trims and
//! write-zeroes of 4 KiB to 1 MiB, then the same mix again while the test counts. Any
//! allocation in that window, on any thread of the process, fails the test. The client also
//! reads back blocks it wrote (and zeroed), so a daemon that did no I/O fails too.
//!
//! The daemon's pools (request buffers by size class, write-zeroes scratch buffers, cipher
//! contexts) grow to the most buffers in use at once and are reused after that; the warm-up
//! therefore also piles up twice the usual depth of each kind of request behind one flush
//! per I/O thread, so the measured round never needs more than the pools already hold.
//!
//! What this cannot see: memory C code takes from libc's `malloc` directly (aws-lc's cipher
//! contexts), which does not go through Rust's global allocator.

// A counting allocator is an `unsafe impl GlobalAlloc` (the only way to observe every heap
// allocation of the process); each unsafe block below forwards to `System` unchanged.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use e2e_tests::{Ctl, TestDir, run};

/// Requests the client sends in the measured round (and in the warm-up round, besides the
/// bursts that fill the server's buffer pools).
const MEASURED_REQUESTS: u64 = 20_000;
/// Most allocations a window may find and still be followed by another: a pool growing to a
/// new peak of buffers in use at once (one buffer per request beyond the old peak).
const POOL_PEAK_ALLOCATIONS: u64 = 16;

// ---------------------------------------------------------------------------------------------
// The counting allocator
// ---------------------------------------------------------------------------------------------

/// Calls of `alloc`, `alloc_zeroed` and `realloc` since the process started, on every thread.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// `System`, counting allocations (frees are not counted: freeing is not the cost we look for).
struct CountingAllocator;

// SAFETY: every method forwards its arguments unchanged to `System`, which implements
// `GlobalAlloc` correctly; the counter update touches no memory that is handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller keeps `GlobalAlloc::alloc`'s contract (non-zero size), which is
        // `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller guarantees `ptr` came from this allocator (so from `System`) with
        // `layout`, and that `new_size` is valid, as `System.realloc` requires.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller guarantees `ptr` came from this allocator (so from `System`) with
        // `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// The daemon, in this process
// ---------------------------------------------------------------------------------------------

/// `cryptnbd::run` on its own runtime in a background thread.
struct InProcessDaemon {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl InProcessDaemon {
    fn start(config: cryptnbd::Config) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cryptnbd".into())
            .spawn(move || {
                // As daemon/src/main.rs: I/O flusher before the runtime's threads start.
                let _ = cryptnbd::hardening::set_io_flusher();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .on_thread_start(|| {
                        let _ = cryptnbd::hardening::set_io_flusher();
                    })
                    .build()
                    .map_err(|e| format!("cannot build the tokio runtime: {e}"))?;
                rt.block_on(cryptnbd::run(config, async {
                    let _ = stopped.await;
                }))
                .map_err(|e| format!("cryptnbd failed: {e:?}"))
            })
            .expect("start the daemon thread");
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Fails the test if the daemon already stopped (it could not start).
    #[track_caller]
    fn assert_running(&mut self) {
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            let result = self.thread.take().map(JoinHandle::join);
            panic!("cryptnbd stopped during start-up: {result:?}");
        }
    }

    /// Shuts the daemon down (as SIGTERM would) and asserts it stopped cleanly.
    #[track_caller]
    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let thread = self.thread.take().expect("running");
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the daemon thread panicked"),
        }
    }
}

impl Drop for InProcessDaemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until the daemon answers `status` on its control socket.
#[track_caller]
fn wait_ready(ctl: &Ctl, daemon: &mut InProcessDaemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        daemon.assert_running();
        let out = ctl.run_quiet(&["status"]);
        if out.code == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cryptnbd did not answer on its control socket within 30 s: {}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The client: libnbd from Python
// ---------------------------------------------------------------------------------------------

/// The client. argv: URI, requests per round, the daemon's I/O threads. It connects, fills
/// the volume, runs a warm-up round (with bursts that make the server's buffer pools as large
/// as the measured round can need), prints `warm`, then runs a measured round and prints
/// `done N` (N = requests sent in that round) for each `go` line on stdin; any other line (or
/// the end of stdin) makes it disconnect.
///
/// A round: write the check blocks (and zero two of them), the mix in shuffled cycles with 16
/// requests in flight at random sector-aligned offsets above the check area, then read the
/// check blocks back and compare. Any failed request or wrong byte exits non-zero.
const CLIENT: &str = r#"
import random
import sys

import nbd

KIB = 1024
MIB = 1024 * KIB
SECTOR = 4 * KIB
DEPTH = 16
# The first 4 MiB hold the check blocks; the mix runs above them.
CHECK_AREA = 4 * MIB
CHECK_BLOCKS = [(i * 512 * KIB, 4 * KIB if i % 2 == 0 else 64 * KIB) for i in range(8)]
ZEROED = {6, 7}
MIX = (
    [("read", 4 * KIB)] * 8
    + [("write", 4 * KIB)] * 6
    + [("fua", 4 * KIB)] * 2
    + [("read", 64 * KIB)] * 3
    + [("write", 64 * KIB)] * 3
    + [("fua", 64 * KIB)] * 1
    + [("read", MIB)] * 1
    + [("write", MIB)] * 1
    + [("flush", 0)] * 2
    + [("trim", 64 * KIB)] * 2
    + [("zero", 64 * KIB)] * 2
    + [("zero", MIB)] * 1
)

uri, measured, io_threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
# The URI may name the TLS certificate directory (tls-certificates=DIR).
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
size = h.get_size()
rng = random.Random(7)
data = {n: nbd.Buffer.from_bytearray(rng.randbytes(n)) for n in (4 * KIB, 64 * KIB, MIB)}
# cookie -> None, or (read buffer, expected bytes, what) for a read to check
pending = {}
sent = 0


def retire():
    for cookie in list(pending):
        # Raises nbd.Error if the request failed.
        if h.aio_command_completed(cookie):
            check = pending.pop(cookie)
            if check is not None:
                buf, expected, what = check
                if buf.to_bytearray() != expected:
                    sys.exit(f"{what}: read back different bytes than were written")


def wait_below(depth):
    retire()
    silent = 0
    while len(pending) >= depth:
        if h.poll(1000) == 0:
            silent += 1
            if silent >= 60:
                sys.exit(f"no reply for 60 s with {len(pending)} requests in flight")
        retire()


def submit(kind, length, offset=0, depth=DEPTH, buf=None, expect=None):
    """Sends one request once fewer than `depth` are in flight. A read with `expect` (bytes,
    what) is compared when it completes; a write sends `buf` if given."""
    global sent
    wait_below(depth)
    check = None
    if kind == "read":
        buf = nbd.Buffer(length)
        cookie = h.aio_pread(buf, offset)
        if expect is not None:
            check = (buf, expect[0], expect[1])
    elif kind == "write":
        cookie = h.aio_pwrite(buf if buf is not None else data[length], offset)
    elif kind == "fua":
        cookie = h.aio_pwrite(data[length], offset, flags=nbd.CMD_FLAG_FUA)
    elif kind == "flush":
        cookie = h.aio_flush()
    elif kind == "trim":
        cookie = h.aio_trim(length, offset)
    elif kind == "zero":
        cookie = h.aio_zero(length, offset)
    else:
        raise ValueError(kind)
    pending[cookie] = check
    sent += 1


def wait_all():
    wait_below(1)


def random_offset(length):
    return CHECK_AREA + rng.randrange((size - CHECK_AREA - length) // SECTOR + 1) * SECTOR


def fill_pools():
    """The server keeps the buffers it allocates for reuse, so it allocates only when more
    are in use at once than ever before. Make each kind of request pile up on the server:
    one flush per I/O thread behind freshly dirtied data keeps every thread busy while twice
    the usual depth of requests queues up, each holding its buffer."""
    depth = io_threads + 2 * DEPTH
    for length in (4 * KIB, 64 * KIB, MIB):
        for kind in ("read", "write", "zero", "trim"):
            for _ in range(8):
                submit("write", MIB, random_offset(MIB))
            wait_all()
            for _ in range(io_threads):
                submit("flush", 0, depth=depth)
            for _ in range(2 * DEPTH):
                submit(kind, length, random_offset(length), depth=depth)
            wait_all()


def run_round(requests, bursts):
    global sent
    sent = 0
    expected = {}
    for i, (offset, length) in enumerate(CHECK_BLOCKS):
        expected[i] = bytearray(rng.randbytes(length))
        submit("write", length, offset, buf=nbd.Buffer.from_bytearray(expected[i]))
    wait_all()
    for i in ZEROED:
        offset, length = CHECK_BLOCKS[i]
        submit("zero", length, offset)
        expected[i] = bytearray(length)
    wait_all()
    if bursts:
        fill_pools()
    done = 0
    while done < requests:
        cycle = list(MIX)
        rng.shuffle(cycle)
        for kind, length in cycle[: requests - done]:
            offset = random_offset(length) if length else 0
            submit(kind, length, offset)
            done += 1
    wait_all()
    for i, (offset, length) in enumerate(CHECK_BLOCKS):
        submit("read", length, offset, expect=(expected[i], f"check block {i} at {offset}"))
    wait_all()
    return sent


# Fill the volume, so reads decrypt real ciphertext.
for offset in range(0, size, MIB):
    submit("write", MIB, offset)
wait_all()
run_round(measured, True)
print("warm", flush=True)
while sys.stdin.readline().strip() == "go":
    n = run_round(measured, False)
    print(f"done {n}", flush=True)
h.shutdown()
"#;

/// The Python client process, killed if the test fails before it exits.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Reused for every line, so reading one does not allocate.
    line: String,
}

impl Client {
    fn start(uri: &str, requests: u64, io_threads: usize) -> Self {
        let python = "/usr/bin/python3";
        assert!(
            run(Command::new(python).args(["-c", "import nbd"])).code == Some(0),
            "this test's NBD client is libnbd's Python binding, which {python} cannot import: \
             apt-get install python3-libnbd"
        );
        let mut child = Command::new(python)
            .args(["-c", CLIENT, uri])
            .args([requests.to_string(), io_threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Python NBD client");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            stdin: Some(stdin),
            stdout,
            line: String::with_capacity(256),
        }
    }

    /// Reads one line (without allocating); fails the test on end of file.
    #[track_caller]
    fn read_line(&mut self) -> &str {
        self.line.clear();
        let n = self
            .stdout
            .read_line(&mut self.line)
            .expect("read the client's stdout");
        if n == 0 {
            let status = self.child.wait();
            panic!("the NBD client exited early ({status:?}); its stderr is above");
        }
        self.line.trim_end()
    }

    /// Lets the client go on (without allocating).
    #[track_caller]
    fn proceed(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .expect("write to the client's stdin");
    }

    /// Lets the client disconnect and asserts it exits 0.
    #[track_caller]
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait for the NBD client");
        assert!(
            status.success(),
            "the NBD client failed ({status}); its stderr is above"
        );
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// What one measurement found.
struct Measured {
    /// Allocations in the last window.
    allocations: u64,
    /// Requests in it.
    requests: u64,
    elapsed: Duration,
    /// Allocations in each window.
    windows: Vec<u64>,
}

/// Runs the daemon in this process with `extra` config, attaches a volume, and counts the
/// allocations while the client sends the mix over the URI that `uri` picks from attach's
/// URIs (the unix socket's), with `query` appended.
fn measure(extra: &str, query: &str) -> Measured {
    // The allocation counter is the whole process's: one measurement at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The daemon's own log, as `main` installs it (info): a per-request log line would be
    // caught here too.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .try_init();

    let dir = TestDir::new("io-alloc");
    let state_dir = dir.state_dir();
    let runtime_dir = dir.join("run");
    let config = cryptnbd::Config::parse(&format!(
        "state_dir = \"{}\"\nruntime_dir = \"{}\"\n{extra}",
        state_dir.display(),
        runtime_dir.display()
    ))
    .expect("daemon config");
    let io_threads = config.limits.to_limits().io_threads;
    let mut daemon = InProcessDaemon::start(config);
    let mut ctl = Ctl::new(&state_dir);
    ctl.socket = Some(runtime_dir.join("control.sock"));
    wait_ready(&ctl, &mut daemon);

    ctl.create_key("alloc");
    ctl.create_volume("vol", "256M", "alias/alloc", 4096, &[]);
    let attached = ctl
        .run(&["--json", "attach", "vol"])
        .assert_success()
        .json();
    let uri = attached["uris"][0]
        .as_str()
        .unwrap_or_else(|| panic!("attach --json has no uris[0]: {attached}"))
        .to_owned()
        + query;

    let mut client = Client::start(&uri, MEASURED_REQUESTS, io_threads);
    let warm = client.read_line();
    assert_eq!(warm, "warm", "unexpected line from the NBD client");

    // A window: from here to the client's `done`, only the daemon serving requests runs
    // (this thread blocks in a read; the line buffers exist already). A window that finds a
    // few allocations is one in which a pool met a new peak of buffers in use at once (the
    // warm-up piles requests up to make that unlikely, but it depends on timing); the next
    // window must then find none. An allocation per request, even in one kind of request in
    // the mix, makes hundreds in every window.
    let mut windows = Vec::new();
    let (allocations, requests, elapsed) = loop {
        let before = allocations();
        let started = Instant::now();
        client.proceed();
        let line = client.read_line();
        let in_window = allocations() - before;
        let elapsed = started.elapsed();
        let requests = line
            .strip_prefix("done ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("unexpected line from the NBD client: {line:?}"));
        windows.push(in_window);
        if in_window == 0 || in_window > POOL_PEAK_ALLOCATIONS || windows.len() == 3 {
            break (in_window, requests, elapsed);
        }
    };
    client.finish();
    daemon.stop();
    assert!(
        requests >= MEASURED_REQUESTS,
        "the client sent only {requests} requests"
    );
    let m = Measured {
        allocations,
        requests,
        elapsed,
        windows,
    };
    println!(
        "io_allocations{}: {} heap allocations during {} NBD requests ({:.4} per request) in \
         {:.2} s ({:.0} requests/s); allocations in each window: {:?}",
        if query.is_empty() { "" } else { " over TLS" },
        m.allocations,
        m.requests,
        m.per_request(),
        m.elapsed.as_secs_f64(),
        m.requests as f64 / m.elapsed.as_secs_f64(),
        m.windows
    );
    m
}

impl Measured {
    fn per_request(&self) -> f64 {
        self.allocations as f64 / self.requests as f64
    }
}

#[test]
fn steady_state_io_makes_no_heap_allocation() {
    let m = measure("", "");
    assert_eq!(
        m.allocations,
        0,
        "the daemon's I/O path allocated {} times in steady state ({:.4} per request over {} \
         requests); `heaptrack` on this test's binary shows where",
        m.allocations,
        m.per_request(),
        m.requests
    );
}

/// With the metrics endpoint on: each request is counted in counters and a histogram found
/// when the volume was attached (docs/metrics.md).
#[test]
fn steady_state_io_counted_in_the_metrics_makes_no_heap_allocation() {
    let m = measure("[metrics]\nlisten = \"127.0.0.1:0\"\n", "");
    assert_eq!(
        m.allocations,
        0,
        "with metrics on the I/O path allocated {} times in steady state ({:.4} per request \
         over {} requests); `heaptrack` on this test's binary shows where",
        m.allocations,
        m.per_request(),
        m.requests
    );
}

/// Over TLS too (docs/tls.md, "Allocations"): the server seals and opens records itself,
/// in one receive buffer made at the handshake and one send buffer that keeps its size.
#[test]
fn steady_state_io_over_tls_makes_no_heap_allocation() {
    let dir = TestDir::new("io-alloc-pki");
    let pki = e2e_tests::pki::Pki::new(&dir, "alloc");
    let client = pki.client("client", "/CN=client.example.com");
    let m = measure(
        &format!(
            "[nbd.tls]\nunix_mode = \"require\"\ncertificates = \"{}\"\n",
            pki.server.display()
        ),
        &format!("&tls-certificates={}", client.display()),
    );
    assert_eq!(
        m.allocations,
        0,
        "over TLS the I/O path allocated {} times in steady state ({:.4} per request over {} \
         requests); `heaptrack` on this test's binary shows where",
        m.allocations,
        m.per_request(),
        m.requests
    );
}
