//! 1,000 clients at once, each streaming a 32 MiB write: the in-flight budget keeps the
//! server's memory bounded, and everyone is served. Its own test binary, so the process's
//! peak RSS belongs to this test alone.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nbd::Limits;
use nbd::proto::{Command, RequestHeader, SimpleReplyHeader};
use support::raw::RawClient;
use support::{MemDevice, MemRegistry, TestServer, pattern, peak_rss_bytes, rss_bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;
const CLIENTS: usize = 1000;

/// Needs about two descriptors per client (both ends live in this process).
fn ensure_fd_limit(want: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if soft >= want {
        return;
    }
    let prlimit = support::tool("prlimit", "util-linux");
    let ok = std::process::Command::new(prlimit)
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={want}:{want}"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "RLIMIT_NOFILE is {soft}; this test needs {want} (raise the hard limit: ulimit -Hn)"
    );
}

#[test]
fn thousand_clients_sending_32_mib_writes_keep_memory_bounded() {
    ensure_fd_limit(4 * CLIENTS as u64 + 256);
    let global = 96 * MIB;
    let reg = MemRegistry::new();
    let disk = Arc::new(MemDevice::new(64 * MIB));
    reg.add("disk", "", disk.clone());
    let ts = TestServer::start(
        reg,
        Limits {
            global_inflight_bytes: global,
            handshake_timeout: Duration::from_secs(30),
            ..Limits::default()
        },
    );

    // The clients' data: one shared, resident buffer.
    let payload = Arc::new(pattern(1, 32 * MIB as usize));

    // Phase 1: 1,000 connections negotiated and held open at once; each writes and reads
    // back its own 4 KiB.
    let mut clients: Vec<RawClient> = (0..CLIENTS)
        .map(|_| RawClient::open(&ts.socket, "disk", false))
        .collect();
    assert_eq!(ts.server.connections(Some("disk")).len(), CLIENTS);
    for (i, c) in clients.iter_mut().enumerate() {
        c.request(
            Command::Write,
            0,
            (32 * MIB) + i as u64 * 4096,
            4096,
            &pattern(i as u64, 4096),
        );
    }
    for c in clients.iter_mut() {
        assert_eq!(c.reply().error, 0);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c.read_at((32 * MIB) + i as u64 * 4096, 4096);
        assert_eq!(r.data, pattern(i as u64, 4096), "client {i}");
    }

    // Phase 2: every client streams a 32 MiB write at once (32 GB offered). The server
    // takes each payload off the socket only once its 32 MiB fit the 96 MiB global budget.
    let base = rss_bytes();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let completed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let std_stream = c.s;
        std_stream.set_nonblocking(true).unwrap();
        let payload = payload.clone();
        let completed = completed.clone();
        tasks.push(client_rt.spawn(async move {
            let mut s = tokio::net::UnixStream::from_std(std_stream).unwrap();
            let h = RequestHeader {
                flags: 0,
                command: Command::Write.to_wire(),
                handle: i as u64,
                offset: 0,
                length: 32 << 20,
            };
            s.write_all(&h.to_bytes()).await?;
            s.write_all(&payload).await?;
            let mut r = [0; 16];
            s.read_exact(&mut r).await?;
            let (reply, _) = SimpleReplyHeader::decode(&r).unwrap().complete().unwrap();
            assert_eq!((reply.handle, reply.error), (i as u64, 0));
            completed.fetch_add(1, Ordering::SeqCst);
            std::io::Result::Ok(())
        }));
    }
    std::thread::sleep(Duration::from_secs(3));
    let done = completed.load(Ordering::SeqCst);
    // The clients vanish mid-payload.
    for t in &tasks {
        t.abort();
    }
    client_rt.shutdown_timeout(Duration::from_secs(5));
    // The kernel's high-water mark: catches any spike, not just sampled moments.
    let peak = peak_rss_bytes();

    // Bound: the global budget (buffers live or pooled never exceed it), the 32 MiB the
    // device may allocate for the written range, per-connection state for 1,000 clients
    // on both ends (a 32 KiB read buffer, tasks, channels: < 64 KiB each), and 64 MiB for
    // allocator and thread slack. Without the budget this would be up to 32 GB.
    let allowed = global + 32 * MIB + CLIENTS as u64 * 64 * 1024 + 64 * MIB;
    eprintln!(
        "writes completed: {done}; rss base {} MiB, peak {} MiB, allowed growth {} MiB",
        base / MIB,
        peak / MIB,
        allowed / MIB
    );
    assert!(
        peak.saturating_sub(base) < allowed,
        "peak RSS grew by {} MiB, more than {} MiB",
        (peak - base) / MIB,
        allowed / MIB
    );
    assert!(done >= 1, "no 32 MiB write completed in 3 s");

    // Every connection goes away; the server still serves.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ts.server.connections(None).is_empty() {
        assert!(Instant::now() < deadline, "connections never closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = RawClient::open(&ts.socket, "disk", true);
    let data = pattern(99, 65536);
    assert_eq!(c.write_at(40 * MIB, &data).error, 0);
    assert_eq!(c.read_at(40 * MIB, 65536).data, data);
}
