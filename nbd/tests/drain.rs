//! Connection bookkeeping and graceful ends: `connections`, `disconnect_export`, `drain_all`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use nbd::proto::Command;
use nbd::{Limits, Peer};
use support::raw::RawClient;
use support::{MemDevice, MemRegistry, TestServer, pattern};

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn my_uid() -> u32 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn connections_report_export_peer_and_counters() {
    let reg = MemRegistry::new();
    reg.add("a", "", Arc::new(MemDevice::new(1 << 20)));
    reg.add("b", "", Arc::new(MemDevice::new(1 << 20)));
    let ts = TestServer::start(reg, Limits::default());
    let before = SystemTime::now();
    let mut a = RawClient::open(&ts.socket, "a", true);
    let mut b = RawClient::open(&ts.socket, "b", false);
    assert_eq!(a.write_at(0, &pattern(1, 8192)).error, 0);
    assert_eq!(a.read_at(0, 4096).error, 0);
    assert_eq!(a.read_at(c_past_end(), 4096).error, 22);
    assert_eq!(b.read_at(0, 512).error, 0);
    let all = ts.server.connections(None);
    assert_eq!(all.len(), 2);
    let ca = ts.server.connections(Some("a"));
    assert_eq!(ca.len(), 1);
    let ca = &ca[0];
    assert_eq!(ca.export, "a");
    assert_eq!(
        (ca.bytes_written, ca.bytes_read, ca.requests),
        (8192, 4096, 3)
    );
    assert!(ca.since >= before - Duration::from_secs(1));
    match ca.peer {
        Peer::Unix { pid, uid, .. } => {
            assert_eq!(pid, Some(std::process::id() as i32));
            assert_eq!(uid, my_uid());
        }
        ref other => panic!("{other:?}"),
    }
    assert!(ts.server.connections(Some("nope")).is_empty());
    a.disconnect();
    wait_until("a's connection to leave", || {
        ts.server.connections(Some("a")).is_empty()
    });
    assert_eq!(ts.server.connections(None).len(), 1);
}

fn c_past_end() -> u64 {
    1 << 20
}

#[test]
fn disconnect_export_answers_requests_in_flight_then_closes() {
    let reg = MemRegistry::new();
    let slow = Arc::new(MemDevice::new(8 << 20));
    slow.set_slow(0, Duration::from_millis(200));
    let other = Arc::new(MemDevice::new(1 << 20));
    reg.add("slow", "", slow.clone());
    reg.add("other", "", other);
    let ts = TestServer::start(reg.clone(), Limits::default());

    let mut o = RawClient::open(&ts.socket, "other", true);
    let mut c1 = RawClient::open(&ts.socket, "slow", true);
    let mut c2 = RawClient::open(&ts.socket, "slow", false);
    let blocks: Vec<Vec<u8>> = (0..8).map(|i| pattern(50 + i, 65536)).collect();
    let mut handles = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let c = if i % 2 == 0 { &mut c1 } else { &mut c2 };
        handles.push(c.request(Command::Write, 0, i as u64 * 65536, 65536, b));
    }
    // Both connections have read all four requests (the reader counts a request when its
    // header arrives and queues it right after reading the payload).
    wait_until("every request to be read", || {
        let c = ts.server.connections(Some("slow"));
        c.len() == 2 && c.iter().all(|c| c.requests == 4)
    });
    wait_until("writes to reach the device", || {
        slow.writes_started.load(Ordering::SeqCst) >= 2
    });
    assert!(
        slow.writes_done.load(Ordering::SeqCst) < 8,
        "still in flight"
    );

    // What the daemon does on detach: unregister, then disconnect and wait.
    reg.remove("slow");
    let server = ts.server.clone();
    let started = Instant::now();
    let done = ts
        .rt
        .spawn(async move { server.disconnect_export("slow").await });

    // Every request in flight is answered, then the server closes.
    for c in [&mut c1, &mut c2] {
        for _ in 0..4 {
            assert_eq!(c.reply().error, 0);
        }
        assert!(c.closed_by_server());
    }
    ts.rt.block_on(done).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(slow.writes_done.load(Ordering::SeqCst), 8);
    assert!(ts.server.connections(Some("slow")).is_empty());
    for (i, b) in blocks.iter().enumerate() {
        let mut got = vec![0; 65536];
        nbd::BlockDevice::read(&*slow, i as u64 * 65536, &mut got).unwrap();
        assert!(&got == b);
    }
    // A new client cannot reach the removed export; the other export is untouched.
    let mut n = RawClient::connect(&ts.socket);
    n.send_flags(nbd::proto::client_flags::FIXED_NEWSTYLE);
    assert_eq!(n.go("slow"), Err(nbd::proto::rep::ERR_UNKNOWN));
    assert_eq!(o.write_at(0, &[1; 512]).error, 0);
    assert_eq!(ts.server.connections(Some("other")).len(), 1);
    // With nothing connected it returns at once.
    let server = ts.server.clone();
    ts.rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(1), server.disconnect_export("slow"))
            .await
            .unwrap()
    });
}

#[test]
fn drain_all_ends_every_connection() {
    let reg = MemRegistry::new();
    let disk = Arc::new(MemDevice::new(4 << 20));
    reg.add("disk", "", disk.clone());
    let mut ts = TestServer::start(reg, Limits::default());
    let mut a = RawClient::open(&ts.socket, "disk", true);
    let mut b = RawClient::open(&ts.socket, "disk", false);
    // One client still negotiating.
    let mut h = RawClient::connect(&ts.socket);
    h.send_flags(nbd::proto::client_flags::FIXED_NEWSTYLE);
    disk.set_slow(0, Duration::from_millis(200));
    let handle = a.request(Command::Write, 0, 0, 4096, &[7; 4096]);
    wait_until("the write to reach the device", || {
        disk.writes_started.load(Ordering::SeqCst) >= 1
    });
    ts.stop();
    let r = a.reply();
    assert_eq!((r.handle, r.error), (handle, 0));
    assert!(a.closed_by_server());
    assert!(b.closed_by_server());
    assert!(h.closed_by_server());
    assert!(ts.server.connections(None).is_empty());
}
