//! Load at the limits through the real daemon, with its encryption and file engine (issue 18,
//! docs/reliability.md "Load"): 1,000 connections on one export, 1,000 large writes at once
//! within the memory budget, slow-loris clients on every listener (TLS included), and
//! attach/detach cycles with the audit trail rotating under them. Each test prints its
//! figures.
//!
//! `CRYPTNBD_LOAD=full` runs the by-hand sizes: 32 MiB writes instead of 1 MiB, 10,000
//! attach/detach cycles instead of 1,000. Needs libnbd-bin and python3-libnbd; the TLS
//! listener's certificates are made with openssl, as in tests/tests/tls.rs.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::daemon::{Daemon, nbdinfo, nbdsh, wait_connections};
use e2e_tests::pki::Pki;
use e2e_tests::{TestDir, open_fds, run, status_kib};

const SCRIPT: &str = include_str!("../scripts/load.py");

fn full() -> bool {
    std::env::var("CRYPTNBD_LOAD").is_ok_and(|v| v == "full")
}

fn load_script(mode: &str, env: &[(&str, String)]) -> std::process::Command {
    let mut cmd = nbdsh();
    cmd.args(["-c", SCRIPT]).env("MODE", mode);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn json_line(text: &str) -> serde_json::Value {
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in {text:?}"))
}

fn volume_daemon(label: &str, extra: &str, size: &str) -> (TestDir, Daemon) {
    let dir = TestDir::new(label);
    let d = Daemon::start(&dir, extra);
    let key = d.ctl.create_key("load");
    d.ctl.create_volume("v", size, &key, 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    (dir, d)
}

#[test]
fn a_thousand_connections_on_one_export_are_all_served() {
    let (dir, d) = volume_daemon("load-conns", "", "8M");
    let pattern: Vec<u8> = (0..1000usize)
        .flat_map(|i| std::iter::repeat_n((i % 251) as u8, 4096))
        .collect();
    d.write_export("v", &pattern, &dir.join("scratch"));
    let pid = d.pid();
    let (fds_before, rss_before) = (open_fds(pid), status_kib(pid, "VmRSS:"));
    let mut held: Child = load_script(
        "connections",
        &[("URI", d.uri("v")), ("COUNT", "1000".into())],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("nbdsh");
    let mut out = BufReader::new(held.stdout.take().expect("stdout"));
    let mut figures = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 && line.trim() != "HELD" {
        figures.push_str(&line);
        line.clear();
    }
    assert_eq!(line.trim(), "HELD", "the client did not connect: {figures}");
    let f = json_line(&figures);
    assert_eq!(f["connected"], 1000, "{f}");
    assert_eq!(f["wrong"], 0, "{f}");
    let conns = wait_connections(&d, "v", 1000);
    let (fds_held, rss_held) = (open_fds(pid), status_kib(pid, "VmRSS:"));
    // Everyone else is still served at once.
    let started = Instant::now();
    run(std::process::Command::new(nbdinfo()).arg(d.uri("v"))).assert_success();
    let other = started.elapsed();
    writeln!(held.stdin.as_mut().expect("stdin")).ok();
    let status = held.wait().expect("wait");
    assert!(status.success());
    wait_connections(&d, "v", 0);
    let fds_after = open_fds(pid);
    println!(
        "1,000 connections: {f}; the daemon saw {}; descriptors {fds_before} -> {fds_held} -> \
         {fds_after}; RSS {rss_before} -> {rss_held} KiB ({:.1} KiB per connection); another \
         client's nbdinfo took {other:?} meanwhile",
        conns.len(),
        (rss_held.saturating_sub(rss_before)) as f64 / 1000.0
    );
    assert!(
        fds_held >= fds_before + 990,
        "{fds_before} -> {fds_held} descriptors"
    );
    assert!(
        fds_after <= fds_before + 2,
        "descriptors {fds_before} before, {fds_after} after the connections closed"
    );
    assert!(other < Duration::from_secs(5), "{other:?}");
    d.stop();
}

#[test]
fn a_thousand_large_writes_at_once_stay_within_the_memory_budget() {
    let budget: u64 = 256 << 20;
    let (size, volume): (u64, u64) = if full() {
        (32 << 20, 4 << 30)
    } else {
        (1 << 20, 1 << 30)
    };
    let (_dir, d) = volume_daemon(
        "load-writes",
        &format!("[limits]\nglobal_inflight_bytes = {budget}\n"),
        &volume.to_string(),
    );
    let pid = d.pid();
    let hwm_before = status_kib(pid, "VmHWM:");
    let out = run(&mut load_script(
        "writes",
        &[
            ("URI", d.uri("v")),
            ("COUNT", "1000".into()),
            ("SIZE", size.to_string()),
            ("VOLUME", volume.to_string()),
        ],
    ));
    out.assert_success();
    let f = json_line(&out.stdout_text());
    let hwm_after = status_kib(pid, "VmHWM:");
    let grew = (hwm_after.saturating_sub(hwm_before)) << 10;
    println!(
        "1,000 writes of {} MiB at once: {f}; the daemon's peak RSS {hwm_before} -> {hwm_after} \
         KiB (+{} MiB, budget {} MiB)",
        size >> 20,
        grew >> 20,
        budget >> 20
    );
    assert_eq!(f["failed"], 0, "{f}");
    // The budget holds the buffers of requests in flight; the rest is the daemon's own
    // working memory (threads' stacks, the cipher's scratch).
    assert!(
        grew <= budget + (128 << 20),
        "the daemon grew by {} MiB with a {} MiB in-flight budget",
        grew >> 20,
        budget >> 20
    );
    // What was written is there.
    let check = format!(
        "import os, nbd\nh = nbd.NBD()\nh.connect_uri(os.environ['URI'])\nassert h.pread(4096, {}) == b'\\xa5' * 4096\nh.shutdown()\n",
        (999 * size) % volume
    );
    run(nbdsh().args(["-c", &check]).env("URI", d.uri("v"))).assert_success();
    d.stop();
}

/// Runs a slow-loris client against `addr` at `stage`; returns its report.
fn slowloris(addr: &str, stage: &str, limit: u32, extra: &[(&str, String)]) -> Child {
    let mut env = vec![
        ("ADDR", addr.to_owned()),
        ("STAGE", stage.to_owned()),
        ("LIMIT", limit.to_string()),
    ];
    env.extend(extra.iter().cloned());
    load_script("slowloris", &env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh")
}

#[test]
fn slow_loris_clients_on_every_listener_are_cut_and_the_others_served() {
    let dir = TestDir::new("load-loris");
    let pki = Pki::new(&dir, "loris");
    let d = Daemon::start(
        &dir,
        &format!(
            "[limits]\nhandshake_timeout_secs = 2\npayload_timeout_secs = 3\nreply_timeout_secs = 3\n[nbd]\ntcp = \"127.0.0.1:0\"\n[nbd.tls]\nmode = \"on\"\ncertificates = \"{}\"\n",
            pki.server.display()
        ),
    );
    let key = d.ctl.create_key("loris");
    d.ctl.create_volume("v", "64M", &key, 4096, &[]);
    let a = d
        .ctl
        .run(&["--json", "attach", "v", "--tcp"])
        .assert_success()
        .json();
    let tcp_uri = a["uris"][1].as_str().expect("a TCP URI").to_owned();
    let tcp = tcp_uri
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("host:port")
        .to_owned();
    let unix = d.nbd_socket().display().to_string();
    let limit: u32 = 20;
    // Five of each: stalled after the greeting on both listeners, stalled inside the TLS
    // handshake, stalled in the middle of a 32 MiB write's payload, and deaf on both
    // listeners (32 MiB reads whose replies are never read: each holds its connection's
    // 64 MiB of the budget, and together with the stalled writers more than the 512 MiB the
    // server has).
    let mut clients = Vec::new();
    let deaf = |addr: &str| {
        slowloris(
            addr,
            "replies",
            limit,
            &[
                ("EXPORT", "v".into()),
                ("SIZE", (32u64 << 20).to_string()),
                ("DEAF", "8".into()),
            ],
        )
    };
    for _ in 0..5 {
        clients.push(("unix replies", deaf(&unix)));
        clients.push(("tcp replies", deaf(&tcp)));
        clients.push(("unix greeting", slowloris(&unix, "greeting", limit, &[])));
        clients.push(("tcp greeting", slowloris(&tcp, "greeting", limit, &[])));
        clients.push(("tcp tls", slowloris(&tcp, "tls", limit, &[])));
        clients.push((
            "unix payload",
            slowloris(
                &unix,
                "payload",
                limit,
                &[("EXPORT", "v".into()), ("SIZE", (32u64 << 20).to_string())],
            ),
        ));
    }
    // Each says READY once it stalls.
    let mut clients: Vec<(&str, Child, BufReader<std::process::ChildStdout>)> = clients
        .into_iter()
        .map(|(what, mut c)| {
            let mut out = BufReader::new(c.stdout.take().expect("stdout"));
            let mut line = String::new();
            out.read_line(&mut line).expect("read");
            assert_eq!(line.trim(), "READY", "{what}: {line}");
            (what, c, out)
        })
        .collect();
    // Meanwhile real clients are served on both listeners, TLS included, reads and writes.
    let started = Instant::now();
    // A 32 MiB write, the largest request: it needs as much of the budget as a stalled one
    // holds.
    let work = "import os, nbd\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(os.environ['URI'])\nh.pwrite(b'\\x11' * (32 << 20), 0)\nassert h.pread(65536, 0) == b'\\x11' * 65536\nh.shutdown()\n";
    run(nbdsh().args(["-c", work]).env("URI", d.uri("v"))).assert_success();
    let client = pki.client("host1", "/CN=host1.example.com");
    let tls_uri = format!(
        "{}?tls-certificates={}",
        tcp_uri.replacen("nbd://", "nbds://", 1),
        client.display()
    );
    run(nbdsh().args(["-c", work]).env("URI", &tls_uri)).assert_success();
    let served_in = started.elapsed();
    let mut report = Vec::new();
    for (what, c, out) in &mut clients {
        let mut rest = String::new();
        std::io::Read::read_to_string(out, &mut rest).expect("read");
        c.wait().expect("wait");
        report.push((*what, json_line(&rest)));
    }
    println!("slow-loris clients: {report:?}; real clients served in {served_in:?} meanwhile");
    assert!(served_in < Duration::from_secs(10), "{served_in:?}");
    for (what, f) in &report {
        let closed = f["closed_after"].as_f64();
        match *what {
            // The handshake has 2 s.
            "unix greeting" | "tcp greeting" | "tcp tls" => assert!(
                closed.is_some_and(|s| s < 5.0),
                "{what}: not cut by the handshake timeout: {f}"
            ),
            // The payload has 3 s.
            "unix payload" => assert!(
                closed.is_some_and(|s| s < 6.0),
                "{what}: a stalled write payload holds its connection (and its share of the \
                 in-flight budget): {f}"
            ),
            // Unread replies have 3 s once the socket is full. Over TCP the client sees the
            // end only when it reads again, after 8 s, and then not all 64 replies.
            _ => assert!(
                closed.is_some_and(|s| s < 6.0)
                    || f["bytes_read"]
                        .as_u64()
                        .is_some_and(|n| n < 64 * (32 << 20)),
                "{what}: a client that reads no reply holds its connection (and its share of \
                 the in-flight budget): {f}"
            ),
        }
    }
    d.stop();
}

#[test]
fn attach_detach_cycles_leak_nothing_while_the_audit_trail_rotates() {
    let cycles: usize = if full() { 10_000 } else { 1_000 };
    let (dir, d) = volume_daemon(
        "load-cycles",
        "[audit]\nmax_bytes = 65536\nkeep = 3\n",
        "16M",
    );
    d.ctl.run(&["detach", "v"]).assert_success();
    let pid = d.pid();
    let cycle = |d: &Daemon| {
        d.ctl.run_quiet(&["attach", "v"]).assert_success();
        d.ctl.run_quiet(&["detach", "v"]).assert_success();
    };
    // Warm-up: the allocator's arenas, the runtime's threads.
    for _ in 0..50 {
        cycle(&d);
    }
    let (fds_before, rss_before) = (open_fds(pid), status_kib(pid, "VmRSS:"));
    let started = Instant::now();
    let mut rss_at = Vec::new();
    for i in 0..cycles {
        cycle(&d);
        if i % (cycles / 10) == 0 {
            rss_at.push(status_kib(pid, "VmRSS:"));
        }
    }
    let took = started.elapsed();
    let (fds_after, rss_after) = (open_fds(pid), status_kib(pid, "VmRSS:"));
    // The trail rotated, every file holds whole JSON records, and it still reads.
    let audit = dir.state_dir().join("audit");
    let mut files: Vec<String> = std::fs::read_dir(&audit)
        .expect("audit dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut records = 0;
    for f in files.iter().filter(|f| f.starts_with("audit.jsonl")) {
        let text = std::fs::read_to_string(audit.join(f)).expect("audit file");
        assert!(
            text.len() <= 65536 + 4096,
            "{f} is {} bytes with max_bytes 65536",
            text.len()
        );
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{f}: a record that is not JSON ({e}): {line}"));
            records += 1;
        }
    }
    d.ctl
        .run(&["audit", "--limit", "2", "--json"])
        .assert_success();
    println!(
        "{cycles} attach/detach cycles in {took:?} ({:.1} ms each, two cryptnbdctl calls); \
         descriptors {fds_before} -> {fds_after}; RSS {rss_before} -> {rss_after} KiB, every \
         tenth: {rss_at:?}; audit files {files:?} with {records} records",
        took.as_secs_f64() * 1000.0 / cycles as f64
    );
    assert!(
        files.iter().any(|f| f == "audit.jsonl.3"),
        "the audit trail did not rotate: {files:?}"
    );
    assert!(!files.iter().any(|f| f == "audit.jsonl.4"), "{files:?}");
    assert!(
        fds_after <= fds_before + 1,
        "descriptors grew from {fds_before} to {fds_after}"
    );
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB over {cycles} cycles"
    );
    d.stop();
}
