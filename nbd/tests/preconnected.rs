//! Sessions negotiated out of band (`Server::serve_preconnected`), as the daemon makes for a
//! kernel NBD device: the client speaks only the transmission phase, with simple replies.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use nbd::proto::{Command, transmission_flags as tf};
use nbd::{Limits, Peer};
use support::raw::RawClient;
use support::{MemDevice, MemRegistry, TestServer, pattern};

#[test]
fn a_preconnected_session_serves_simple_replies_and_ends_with_its_export() {
    let reg = MemRegistry::new();
    reg.add("vol", "", Arc::new(MemDevice::new(4 << 20)));
    let ts = TestServer::start(reg, Limits::default());
    let kernel = Peer::Kernel {
        index: 3,
        connection: 1,
    };

    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let (params, handle) = {
        let _g = ts.rt.enter();
        let ours = tokio::net::UnixStream::from_std(ours).unwrap();
        ts.server
            .serve_preconnected(ours, "vol", kernel.clone())
            .unwrap()
    };
    assert_eq!(params.size, 4 << 20);
    for f in [tf::HAS_FLAGS, tf::SEND_FLUSH, tf::SEND_FUA, tf::SEND_TRIM] {
        assert_ne!(params.flags & f, 0, "flag {f:#x} in {:#x}", params.flags);
    }
    // No structured replies were negotiated, so DF is not offered.
    assert_eq!(params.flags & tf::SEND_DF, 0);

    let mut c = RawClient::preconnected(theirs, params.size, params.flags);
    let data = pattern(7, 64 << 10);
    assert_eq!(c.write_at(4096, &data).error, 0);
    c.request(Command::Flush, 0, 0, 0, &[]);
    assert_eq!(c.reply().error, 0);
    let r = c.read_at(4096, data.len() as u32);
    assert_eq!(r.error, 0);
    assert!(r.chunks.is_empty(), "simple replies only");
    assert_eq!(r.data, data);
    assert_eq!(c.read_at(params.size, 4096).error, 22);

    let conns = ts.server.connections(Some("vol"));
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].peer, kernel);
    assert_eq!(conns[0].peer.to_string(), "kernel /dev/nbd3 connection 1");
    assert_eq!(conns[0].bytes_written, data.len() as u64);

    // Ending the export ends the session: the client sees end-of-file, the handle completes.
    ts.registry.remove("vol");
    ts.rt.block_on(ts.server.disconnect_export("vol"));
    let mut buf = [0u8; 1];
    assert_eq!(c.s.read(&mut buf).unwrap(), 0);
    ts.rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), handle).await })
        .expect("the session task ended")
        .unwrap();
    assert!(ts.server.connections(None).is_empty());
}

#[test]
fn an_unknown_export_is_refused_and_the_client_side_closes_cleanly() {
    let reg = MemRegistry::new();
    reg.add("vol", "", Arc::new(MemDevice::new(1 << 20)));
    let ts = TestServer::start(reg, Limits::default());
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let served = {
        let _g = ts.rt.enter();
        let ours = tokio::net::UnixStream::from_std(ours).unwrap();
        ts.server.serve_preconnected(
            ours,
            "nope",
            Peer::Kernel {
                index: 0,
                connection: 0,
            },
        )
    };
    assert!(served.is_none());
    // Our end was dropped with the refusal: the other end reads end-of-file.
    let mut theirs = theirs;
    let mut buf = [0u8; 1];
    assert_eq!(theirs.read(&mut buf).unwrap(), 0);
    assert!(ts.server.connections(None).is_empty());
}

/// A kernel device reads its replies in the kernel, and its session may last as long as the
/// machine: it is never cut for leaving replies unread, where a socket client would be
/// (`hostile.rs`, `reply_timeout_frees_the_budget_of_clients_that_do_not_read`).
#[test]
fn a_kernel_session_is_not_cut_for_unread_replies() {
    let reg = MemRegistry::new();
    reg.add("vol", "", Arc::new(MemDevice::new(32 << 20)));
    let ts = TestServer::start(
        reg,
        Limits {
            reply_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
    );
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let kernel = Peer::Kernel {
        index: 0,
        connection: 0,
    };
    let (params, _handle) = {
        let _g = ts.rt.enter();
        let ours = tokio::net::UnixStream::from_std(ours).unwrap();
        ts.server.serve_preconnected(ours, "vol", kernel).unwrap()
    };
    let mut c = RawClient::preconnected(theirs, params.size, params.flags);
    // 16 MiB of replies, far more than the socket holds, left unread for five timeouts.
    let handles: Vec<u64> = (0..16)
        .map(|i| c.request(Command::Read, 0, i << 20, 1 << 20, &[]))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    c.expect_success_of(&handles);
    assert_eq!(ts.server.connections(Some("vol")).len(), 1);
}
