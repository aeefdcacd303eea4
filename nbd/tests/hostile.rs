//! Raw-socket tests: what no well-behaved client sends. After each, the server must still
//! serve a second client.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::proto::{
    self, ClientOption, Command, ExportNameReply, InfoRequest, OptionHeader, OptionReply,
    RequestHeader, client_flags, command_flags, info, opt, rep,
};
use nbd::{Errno, Limits};
use support::raw::RawClient;
use support::{MemDevice, MemRegistry, TestServer, pattern};

const EINVAL: u32 = Errno::Einval as u32;

fn server_with(limits: Limits) -> (TestServer, Arc<MemDevice>) {
    let reg = MemRegistry::new();
    let disk = Arc::new(MemDevice::new(16 << 20));
    reg.add("disk", "test disk", disk.clone());
    reg.add(
        "ro",
        "read-only disk",
        Arc::new(MemDevice::with(1 << 20, 1, 4096, 32 << 20, true)),
    );
    (TestServer::start(reg, limits), disk)
}

fn server() -> (TestServer, Arc<MemDevice>) {
    server_with(Limits {
        handshake_timeout: Duration::from_secs(2),
        ..Limits::default()
    })
}

/// A fresh client negotiates, writes and reads back.
fn still_serves(ts: &TestServer) {
    for structured in [false, true] {
        let mut c = RawClient::open(&ts.socket, "disk", structured);
        let data = pattern(7, 4096);
        assert_eq!(c.write_at(8192, &data).error, 0);
        let r = c.read_at(8192, 4096);
        assert_eq!(r.error, 0);
        assert_eq!(r.data, data);
        c.disconnect();
    }
}

#[test]
fn garbage_instead_of_client_flags_closes_only_that_connection() {
    let (ts, _) = server();
    let mut c = RawClient::connect(&ts.socket);
    c.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n");
    assert!(c.closed_by_server());
    still_serves(&ts);
}

#[test]
fn garbage_option_magic_closes_only_that_connection() {
    let (ts, _) = server();
    let mut c = RawClient::connect(&ts.socket);
    c.send_flags(client_flags::FIXED_NEWSTYLE);
    c.send(&[0xde; 64]);
    assert!(c.closed_by_server());
    still_serves(&ts);
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (ts, _) = server();
    let mut c = RawClient::open(&ts.socket, "disk", true);
    assert_eq!(c.read_at(0, 512).error, 0);
    c.send(&[0x55; 28]);
    assert!(c.closed_by_server());
    still_serves(&ts);
}

#[test]
fn unknown_options_are_refused_and_the_session_goes_on() {
    let (ts, _) = server();
    let mut c = RawClient::connect(&ts.socket);
    c.send_flags(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    let unsup = |r: &[OptionReply]| matches!(r, [OptionReply::Error { reply_type, .. }] if *reply_type == rep::ERR_UNSUP);
    let r = c.option(&ClientOption::Unknown {
        option: 0x1234,
        data: vec![1, 2, 3],
    });
    assert!(unsup(&r), "{r:?}");
    let r = c.option(&ClientOption::Unknown {
        option: opt::EXTENDED_HEADERS,
        data: vec![],
    });
    assert!(unsup(&r), "{r:?}");
    // A server without TLS refuses the upgrade by policy (issue 14).
    let r = c.option(&ClientOption::StartTls);
    assert!(
        matches!(&r[..], [OptionReply::Error { reply_type, .. }] if *reply_type == rep::ERR_POLICY),
        "{r:?}"
    );
    // NBD_OPT_LIST must not carry data.
    let r = c.option(&ClientOption::Unknown {
        option: opt::LIST,
        data: vec![0],
    });
    assert!(
        matches!(&r[..], [OptionReply::Error { reply_type, .. }] if *reply_type == rep::ERR_INVALID),
        "{r:?}"
    );
    // Meta contexts need structured replies first.
    let r = c.option(&ClientOption::SetMetaContext(proto::MetaContextRequest {
        export: "disk".into(),
        queries: vec![proto::BASE_ALLOCATION.into()],
    }));
    assert!(
        matches!(&r[..], [OptionReply::Error { reply_type, .. }] if *reply_type == rep::ERR_INVALID),
        "{r:?}"
    );
    // Unknown export: refused, not disclosed, session continues.
    assert_eq!(c.go("nope"), Err(rep::ERR_UNKNOWN));
    let r = c.option(&ClientOption::List);
    let names: Vec<_> = r
        .iter()
        .filter_map(|x| match x {
            OptionReply::Server { name, description } => {
                Some((name.as_str(), description.as_str()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(names, [("disk", "test disk"), ("ro", "read-only disk")]);
    let r = c.option(&ClientOption::Info(InfoRequest {
        name: "disk".into(),
        requests: vec![info::NAME, info::DESCRIPTION, info::BLOCK_SIZE, 999],
    }));
    assert!(r.contains(&OptionReply::Info(proto::InfoReply::Name("disk".into()))));
    assert!(r.contains(&OptionReply::Info(proto::InfoReply::Description(
        "test disk".into()
    ))));
    assert!(r.contains(&OptionReply::Info(proto::InfoReply::BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20
    })));
    assert_eq!(r.last(), Some(&OptionReply::Ack));
    c.go("disk").unwrap();
    assert_eq!(c.size, 16 << 20);
    assert_eq!(c.read_at(0, 4096).error, 0);
}

#[test]
fn oversized_options_are_refused_without_being_buffered() {
    let (ts, _) = server();
    // 100 KiB of option data: skipped, ERR_TOO_BIG, session continues.
    let mut c = RawClient::connect(&ts.socket);
    c.send_flags(client_flags::FIXED_NEWSTYLE);
    let mut v = Vec::new();
    OptionHeader {
        option: opt::GO,
        length: 100 << 10,
    }
    .encode(&mut v);
    v.resize(v.len() + (100 << 10), 0xaa);
    c.send(&v);
    let r = c.option_replies(opt::GO);
    assert!(
        matches!(&r[..], [OptionReply::Error { reply_type, .. }] if *reply_type == rep::ERR_TOO_BIG)
    );
    c.go("disk").unwrap();
    assert_eq!(c.read_at(0, 512).error, 0);

    // 4 GiB announced: answered and closed at once, nothing read or allocated.
    let mut c = RawClient::connect(&ts.socket);
    c.send_flags(client_flags::FIXED_NEWSTYLE);
    let mut v = Vec::new();
    OptionHeader {
        option: opt::SET_META_CONTEXT,
        length: u32::MAX,
    }
    .encode(&mut v);
    c.send(&v);
    let r = c.option_replies(opt::SET_META_CONTEXT);
    assert!(
        matches!(&r[..], [OptionReply::Error { reply_type, .. }] if *reply_type == rep::ERR_TOO_BIG)
    );
    assert!(c.closed_by_server());
    still_serves(&ts);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let (ts, _) = server();
    let mut c = RawClient::connect(&ts.socket);
    c.send_flags(0x8000_0001);
    assert!(c.closed_by_server());
    still_serves(&ts);
}

#[test]
fn export_name_with_and_without_zeroes() {
    let (ts, _) = server();
    for no_zeroes in [false, true] {
        let mut c = RawClient::connect(&ts.socket);
        let mut flags = client_flags::FIXED_NEWSTYLE;
        if no_zeroes {
            flags |= client_flags::NO_ZEROES;
        }
        c.send_flags(flags);
        let mut v = Vec::new();
        ClientOption::ExportName("disk".into()).encode(&mut v);
        c.send(&v);
        let len = if no_zeroes { 10 } else { 134 };
        let bytes = c.read_exact(len);
        let (r, _) = ExportNameReply::decode(&bytes, no_zeroes)
            .unwrap()
            .complete()
            .unwrap();
        assert_eq!(r.size, 16 << 20);
        assert_eq!(r.flags & proto::transmission_flags::SEND_DF, 0);
        let data = pattern(3, 1000);
        assert_eq!(c.write_at(12345, &data).error, 0);
        assert_eq!(c.read_at(12345, 1000).data, data);
        c.disconnect();
    }
    // Unknown export via EXPORT_NAME cannot be answered: the connection closes.
    let mut c = RawClient::connect(&ts.socket);
    c.send_flags(client_flags::FIXED_NEWSTYLE);
    let mut v = Vec::new();
    ClientOption::ExportName("nope".into()).encode(&mut v);
    c.send(&v);
    assert!(c.closed_by_server());
}

#[test]
fn four_gib_write_is_refused_and_the_connection_closed() {
    let (ts, _) = server();
    for structured in [false, true] {
        let mut c = RawClient::open(&ts.socket, "disk", structured);
        let h = c.request(Command::Write, 0, 0, u32::MAX, &[]);
        let r = c.reply();
        assert_eq!((r.handle, r.error), (h, EINVAL));
        assert!(c.closed_by_server());
    }
    still_serves(&ts);
}

#[test]
fn write_over_the_maximum_is_skipped_and_the_session_goes_on() {
    let (ts, disk) = server();
    let mut c = RawClient::open(&ts.socket, "disk", true);
    let big = vec![0xee; (32 << 20) + 4096];
    let h = c.request(Command::Write, 0, 0, big.len() as u32, &big);
    let r = c.reply();
    assert_eq!((r.handle, r.error), (h, EINVAL));
    assert_eq!(
        disk.allocated(),
        0,
        "nothing of the refused payload was written"
    );
    let r = c.read_at(0, 4096);
    assert_eq!(r.error, 0);
    assert_eq!(r.data, vec![0; 4096]);
    // A refused write to a read-only export is skipped too.
    let mut ro = RawClient::open(&ts.socket, "ro", false);
    let r = ro.write_at(0, &[1; 4096]);
    assert_eq!(r.error, Errno::Eperm as u32);
    assert_eq!(ro.read_at(0, 16).data, vec![0; 16]);
}

#[test]
fn unknown_commands_and_flags_get_einval_and_the_session_goes_on() {
    let (ts, _) = server();
    for structured in [false, true] {
        let mut c = RawClient::open(&ts.socket, "disk", structured);
        c.request_raw(
            RequestHeader {
                flags: 0,
                command: 0x77,
                handle: 99,
                offset: 0,
                length: 4096,
            },
            &[],
        );
        c.expect(99, Command::Flush, 0);
        let r = c.reply();
        assert_eq!((r.handle, r.error), (99, EINVAL));
        if structured {
            assert!(matches!(r.chunks[0], proto::ChunkPayload::Error { .. }));
        }
        c.request(Command::Read, 0x4000, 0, 512, &[]);
        assert_eq!(c.reply().error, EINVAL);
        c.request(Command::Flush, command_flags::REQ_ONE, 0, 0, &[]);
        assert_eq!(c.reply().error, EINVAL);
        let r = c.read_at(0, 512);
        assert_eq!(r.error, 0);
        assert_eq!(r.data.len(), 512);
    }
}

#[test]
fn simple_reply_errors_carry_no_payload() {
    let (ts, _) = server();
    let mut c = RawClient::open(&ts.socket, "disk", false);
    let r = c.read_at(c.size - 512, 1024);
    assert_eq!(r.error, EINVAL);
    assert!(r.data.is_empty());
    // The stream is still in step.
    let r = c.read_at(c.size - 512, 512);
    assert_eq!((r.error, r.data.len()), (0, 512));
}

#[test]
fn device_errors_become_eio_with_an_offset() {
    let (ts, disk) = server();
    disk.set_failing(8 << 20);
    let mut c = RawClient::open(&ts.socket, "disk", true);
    let r = c.read_at(8 << 20, 4096);
    assert_eq!(r.error, Errno::Eio as u32);
    assert!(matches!(
        r.chunks[..],
        [proto::ChunkPayload::ErrorOffset { offset, .. }] if offset == 8 << 20
    ));
    let mut s = RawClient::open(&ts.socket, "disk", false);
    assert_eq!(s.write_at(9 << 20, &[1; 512]).error, Errno::Eio as u32);
    assert_eq!(s.read_at(0, 512).error, 0);
}

#[test]
fn zero_length_requests_succeed() {
    let (ts, _) = server();
    for structured in [false, true] {
        let mut c = RawClient::open(&ts.socket, "disk", structured);
        assert_eq!(c.read_at(4096, 0).error, 0);
        assert_eq!(c.write_at(4096, &[]).error, 0);
        c.request(Command::Trim, 0, 4096, 0, &[]);
        assert_eq!(c.reply().error, 0);
        c.request(Command::WriteZeroes, 0, c.size, 0, &[]);
        assert_eq!(c.reply().error, 0);
    }
}

#[test]
fn disconnect_mid_payload_with_writes_in_flight() {
    let (ts, disk) = server();
    disk.set_slow(0, Duration::from_millis(50));
    let mut c = RawClient::open(&ts.socket, "disk", true);
    let blocks: Vec<Vec<u8>> = (0..4).map(|i| pattern(100 + i, 65536)).collect();
    for (i, b) in blocks.iter().enumerate() {
        c.request(Command::Write, 0, i as u64 * 65536, 65536, b);
    }
    // A fifth write whose payload stops half way, then the client vanishes.
    let mut v = Vec::new();
    RequestHeader {
        flags: 0,
        command: Command::Write.to_wire(),
        handle: 1000,
        offset: 1 << 20,
        length: 1 << 20,
    }
    .encode(&mut v);
    v.extend_from_slice(&[0xab; 4096]);
    c.send(&v);
    c.s.flush().unwrap();
    drop(c);
    // The complete writes are executed; the partial one is not.
    let deadline = Instant::now() + Duration::from_secs(10);
    while disk.writes_done.load(std::sync::atomic::Ordering::SeqCst) < 4 {
        assert!(
            Instant::now() < deadline,
            "in-flight writes never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = RawClient::open(&ts.socket, "disk", true);
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(&c.read_at(i as u64 * 65536, 65536).data, b);
    }
    assert_eq!(c.read_at(1 << 20, 4096).data, vec![0; 4096]);
    disk.set_slow(u64::MAX, Duration::ZERO);
    still_serves(&ts);
}

#[test]
fn replies_come_out_of_order_and_pipelining_is_honoured() {
    let (ts, disk) = server();
    disk.set_slow(8 << 20, Duration::from_millis(300));
    let mut c = RawClient::open(&ts.socket, "disk", true);
    let slow = c.request(Command::Read, 0, 8 << 20, 4096, &[]);
    let fast: Vec<u64> = (0..32)
        .map(|i| c.request(Command::Read, 0, i * 4096, 4096, &[]))
        .collect();
    let order: Vec<u64> = (0..33).map(|_| c.reply().handle).collect();
    assert_eq!(order.last(), Some(&slow), "the slow read is answered last");
    let mut sorted = order[..32].to_vec();
    sorted.sort();
    assert_eq!(sorted, fast);
}

#[test]
fn handshake_timeout_closes_idle_clients() {
    let (ts, _) = server_with(Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    });
    let start = Instant::now();
    let mut silent = RawClient::connect(&ts.socket);
    assert!(silent.closed_by_server());
    let mut half = RawClient::connect(&ts.socket);
    half.send_flags(client_flags::FIXED_NEWSTYLE);
    assert!(half.closed_by_server());
    assert!(start.elapsed() < Duration::from_secs(5));
    // A client that finished the handshake is not subject to it.
    let mut c = RawClient::open(&ts.socket, "disk", true);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.read_at(0, 512).error, 0);
}

/// Sends a 2 MiB READ or WRITE on `c` while other clients hold the whole in-flight budget:
/// it must wait at least `at_least` (until the server cuts them), and be answered within 5 s.
fn answered_once_the_budget_returns(mut c: RawClient, command: Command, at_least: Duration) {
    const LEN: u32 = 2 << 20;
    let payload = match command {
        Command::Write => vec![7u8; LEN as usize],
        _ => Vec::new(),
    };
    let start = Instant::now();
    let handle = c.request(command, 0, 0, LEN, &payload);
    let reply = c.reply();
    assert_eq!((reply.handle, reply.error), (handle, 0));
    let waited = start.elapsed();
    assert!(
        waited >= at_least && waited < Duration::from_secs(5),
        "the {command:?} was answered after {waited:?}"
    );
}

/// Clients that stall in the middle of write payloads hold their share of the in-flight
/// budget; without a payload timeout, enough of them starve every other writer. With it,
/// they are disconnected and the budget comes back.
#[test]
fn payload_timeout_frees_the_budget_of_stalled_writes() {
    const MIB: u32 = 1 << 20;
    let (ts, _) = server_with(Limits {
        max_payload: 2 * MIB,
        global_inflight_bytes: 8 * u64::from(MIB),
        payload_timeout: Duration::from_millis(500),
        ..Limits::default()
    });
    // Four clients each announce a 2 MiB write, send 4 KiB of it and stall: the whole global
    // budget is theirs.
    let mut stalled: Vec<RawClient> = (0..4)
        .map(|_| {
            let mut c = RawClient::open(&ts.socket, "disk", true);
            let h = RequestHeader {
                flags: 0,
                command: Command::Write.to_wire(),
                handle: 1,
                offset: 0,
                length: 2 * MIB,
            };
            c.request_raw(h, &[0u8; 4096]);
            c
        })
        .collect();
    // Another client's write waits for budget, then is served once the stalled ones are cut.
    let c = RawClient::open(&ts.socket, "disk", true);
    answered_once_the_budget_returns(c, Command::Write, Duration::from_millis(300));
    for s in &mut stalled {
        assert!(
            s.closed_by_server(),
            "a stalled writer was not disconnected"
        );
    }
    // A client that sends its payload in pieces within the time is not cut.
    let mut slow = RawClient::open(&ts.socket, "disk", true);
    let h = RequestHeader {
        flags: 0,
        command: Command::Write.to_wire(),
        handle: 9,
        offset: 0,
        length: 8192,
    };
    slow.request_raw(h, &[1u8; 4096]);
    std::thread::sleep(Duration::from_millis(200));
    slow.send(&[1u8; 4096]);
    slow.expect(9, Command::Write, 8192);
    assert_eq!(slow.reply().error, 0);
}

/// Clients that send READs and never read the replies hold their share of the in-flight
/// budget once their sockets are full; without a reply timeout, enough of them starve every
/// other client. With it, they are disconnected and the budget comes back. (A fuzzing
/// harness that read nothing until it had sent everything hung the server this way.)
#[test]
fn reply_timeout_frees_the_budget_of_clients_that_do_not_read() {
    const MIB: u32 = 1 << 20;
    let (ts, _) = server_with(Limits {
        max_payload: 2 * MIB,
        global_inflight_bytes: 8 * u64::from(MIB),
        reply_timeout: Duration::from_millis(500),
        ..Limits::default()
    });
    // Four clients each ask for sixteen 2 MiB reads and read nothing: their replies fill
    // their sockets, and the ones that do not fit hold the whole global budget.
    let mut deaf: Vec<RawClient> = (0..4)
        .map(|_| {
            let mut c = RawClient::open(&ts.socket, "disk", false);
            for _ in 0..16 {
                c.request(Command::Read, 0, 0, 2 * MIB, &[]);
            }
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Another client's read waits for budget, then is served once the deaf ones are cut.
    let c = RawClient::open(&ts.socket, "disk", false);
    answered_once_the_budget_returns(c, Command::Read, Duration::from_millis(100));
    for d in &mut deaf {
        assert!(
            d.drained_until_closed(),
            "a client that did not read was kept"
        );
    }
    // A client that reads its replies, even after a pause shorter than the timeout, is kept.
    let mut slow = RawClient::open(&ts.socket, "disk", false);
    let handles: Vec<u64> = (0..4)
        .map(|_| slow.request(Command::Read, 0, 0, 2 * MIB, &[]))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    slow.expect_success_of(&handles);
    still_serves(&ts);
}

#[test]
fn connection_limit() {
    let (ts, _) = server_with(Limits {
        max_connections: 2,
        ..Limits::default()
    });
    let mut a = RawClient::open(&ts.socket, "disk", true);
    let mut b = RawClient::open(&ts.socket, "disk", false);
    let mut c = RawClient::connect_raw(&ts.socket);
    assert!(c.closed_by_server());
    assert_eq!(a.read_at(0, 512).error, 0);
    assert_eq!(b.read_at(0, 512).error, 0);
    a.disconnect();
    // The freed slot is usable again once the server saw the disconnect.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut d = loop {
        if let Some(d) = RawClient::try_connect(&ts.socket) {
            break d;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        std::thread::sleep(Duration::from_millis(10));
    };
    d.send_flags(client_flags::FIXED_NEWSTYLE);
    d.go("disk").unwrap();
    assert_eq!(d.read_at(0, 512).error, 0);
}

#[test]
fn block_status_and_meta_contexts() {
    let (ts, _) = server();
    let mut c = RawClient::connect(&ts.socket);
    c.send_flags(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    assert_eq!(
        c.option(&ClientOption::StructuredReply),
        vec![OptionReply::Ack]
    );
    let list = c.option(&ClientOption::ListMetaContext(proto::MetaContextRequest {
        export: "disk".into(),
        queries: vec![],
    }));
    assert_eq!(
        list,
        vec![
            OptionReply::MetaContext {
                id: 0,
                name: proto::BASE_ALLOCATION.into()
            },
            OptionReply::Ack
        ]
    );
    let set = c.option(&ClientOption::SetMetaContext(proto::MetaContextRequest {
        export: "disk".into(),
        queries: vec![
            "x-unknown:thing".into(),
            "base:".into(),
            proto::BASE_ALLOCATION.into(),
            "qemu:dirty-bitmap:x".into(),
        ],
    }));
    assert_eq!(
        set,
        vec![
            OptionReply::MetaContext {
                id: 1,
                name: proto::BASE_ALLOCATION.into()
            },
            OptionReply::Ack
        ]
    );
    c.structured = true;
    c.go("disk").unwrap();
    assert_eq!(c.write_at(1 << 20, &[9; 65536]).error, 0);
    c.request(Command::BlockStatus, 0, 0, 2 << 20, &[]);
    let r = c.reply();
    assert_eq!(r.error, 0);
    let proto::ChunkPayload::BlockStatus {
        context_id,
        descriptors,
    } = &r.chunks[0]
    else {
        panic!("{r:?}")
    };
    assert_eq!(*context_id, 1);
    let d: Vec<(u32, u32)> = descriptors.iter().map(|d| (d.length, d.flags)).collect();
    assert_eq!(d, [(1 << 20, 3), (65536, 0), ((1 << 20) - 65536, 3)]);
    c.request(
        Command::BlockStatus,
        command_flags::REQ_ONE,
        0,
        2 << 20,
        &[],
    );
    let r = c.reply();
    let proto::ChunkPayload::BlockStatus { descriptors, .. } = &r.chunks[0] else {
        panic!("{r:?}")
    };
    assert_eq!(descriptors.len(), 1);
    // Without SET_META_CONTEXT for this export, block status is refused.
    let mut plain = RawClient::connect(&ts.socket);
    plain.send_flags(client_flags::FIXED_NEWSTYLE);
    plain.option(&ClientOption::StructuredReply);
    plain.structured = true;
    plain.go("disk").unwrap();
    plain.request(Command::BlockStatus, 0, 0, 4096, &[]);
    assert_eq!(plain.reply().error, EINVAL);
}

#[test]
fn the_inflight_budget_bounds_requests_in_progress() {
    // The smallest global budget: one 32 MiB request (plus overhead). 8 MiB writes cost
    // 8 MiB + overhead each, so at most 3 can be in flight, whatever the threads and the
    // client's pipelining.
    let (ts, disk) = server_with(Limits {
        global_inflight_bytes: 1,
        io_threads: 8,
        ..Limits::default()
    });
    disk.set_slow(0, Duration::from_millis(100));
    let mut c = RawClient::open(&ts.socket, "disk", true);
    let data = pattern(11, 8 << 20);
    let handles: Vec<u64> = (0..10)
        .map(|i| c.request(Command::Write, 0, (i % 2) * (8 << 20), 8 << 20, &data))
        .collect();
    let mut done: Vec<u64> = (0..10)
        .map(|_| {
            let r = c.reply();
            assert_eq!(r.error, 0);
            r.handle
        })
        .collect();
    done.sort();
    assert_eq!(done, handles);
    let max = disk
        .max_concurrent_writes
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=3).contains(&max), "{max} writes ran at once");
    assert_eq!(c.read_at(8 << 20, 4096).data, data[..4096]);
}
