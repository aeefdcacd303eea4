//! The Prometheus endpoint of the real daemon (`[metrics] listen`, docs/metrics.md), scraped
//! over HTTP while a real NBD client (libnbd's nbdsh) works on a volume: every figure it shows
//! is checked against what the test did.

use std::collections::BTreeMap;

use e2e_tests::TestDir;
use e2e_tests::daemon::{Daemon, hold_connection, http, nbdsh, wait_connections};
use e2e_tests::run;

/// The samples of a scrape: `name{labels}` → value.
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (status, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(body.ends_with("# EOF\n"), "not OpenMetrics text:\n{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of `name{labels}` (0 when absent, as Prometheus reads a missing counter).
fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}

#[test]
fn the_metrics_endpoint_counts_what_clients_and_operations_did() {
    let dir = TestDir::new("metrics");
    let d = Daemon::start(&dir, "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let addr = d.metrics_addr();
    let key = d.ctl.create_key("metrics");
    d.ctl.create_volume("m", "64M", &key, 4096, &[]);
    d.ctl.run(&["attach", "m"]).assert_success();

    // What a client does: 10 writes of 64 KiB (2 with FUA), 5 reads of 4 KiB, 2 flushes,
    // 1 trim of 1 MiB, and 1 read past the end (refused: EINVAL).
    let work = r#"
import os, nbd
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
for i in range(10):
    h.pwrite(b"\x5a" * 65536, i * 65536, nbd.CMD_FLAG_FUA if i < 2 else 0)
for i in range(5):
    h.pread(4096, i * 4096)
h.flush()
h.flush()
h.trim(1 << 20, 8 << 20)
# libnbd checks bounds itself unless told not to: the server must see this one.
h.set_strict_mode(0)
try:
    h.pread(4096, 64 << 20)
    raise SystemExit("a read past the end succeeded")
except nbd.Error as e:
    assert "command failed" in str(e) and "EINVAL" in str(e), e
h.shutdown()
"#;
    let out = run(nbdsh().args(["-c", work]).env("URI", d.uri("m")));
    out.assert_success();

    let mut held = hold_connection(&d.uri("m"));
    wait_connections(&d, "m", 1);
    let s = scrape(&addr);
    let v = |k: &str| value(&s, k);
    let req = |c: &str| {
        v(&format!(
            "cryptnbd_requests_total{{volume=\"m\",command=\"{c}\"}}"
        ))
    };
    let bytes = |c: &str| {
        v(&format!(
            "cryptnbd_request_bytes_total{{volume=\"m\",command=\"{c}\"}}"
        ))
    };
    let dump = || {
        s.iter()
            .filter(|(k, _)| !k.contains("_bucket"))
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(req("write"), 10.0, "{}", dump());
    assert_eq!(bytes("write"), 10.0 * 65536.0, "{}", dump());
    // libnbd reads nothing itself while it connects (no probing reads).
    assert_eq!(req("read"), 5.0, "{}", dump());
    assert_eq!(bytes("read"), 5.0 * 4096.0, "{}", dump());
    assert_eq!(req("flush"), 2.0, "{}", dump());
    assert_eq!(req("trim"), 1.0, "{}", dump());
    assert_eq!(bytes("trim"), f64::from(1u32 << 20), "{}", dump());
    assert_eq!(
        v("cryptnbd_request_errors_total{volume=\"m\",errno=\"EINVAL\"}"),
        1.0,
        "{}",
        dump()
    );
    assert_eq!(
        v("cryptnbd_request_errors_total{volume=\"m\",errno=\"EIO\"}"),
        0.0
    );
    // The latency histogram saw every write, and the slowest within its buckets.
    assert_eq!(
        v("cryptnbd_request_duration_seconds_count{volume=\"m\",command=\"write\"}"),
        10.0,
        "{}",
        dump()
    );
    let sum = v("cryptnbd_request_duration_seconds_sum{volume=\"m\",command=\"write\"}");
    assert!(sum > 0.0 && sum < 10.0, "write latency sum {sum}");
    assert_eq!(
        v("cryptnbd_request_duration_seconds_bucket{le=\"+Inf\",volume=\"m\",command=\"write\"}"),
        10.0,
        "{}",
        dump()
    );
    assert_eq!(v("cryptnbd_requests_in_flight{volume=\"m\"}"), 0.0);
    assert_eq!(v("cryptnbd_connections{volume=\"m\"}"), 1.0, "{}", dump());
    assert_eq!(v("cryptnbd_volumes_attached"), 1.0);
    assert_eq!(
        v("cryptnbd_key_check{volume=\"m\",state=\"unchecked\"}")
            + v("cryptnbd_key_check{volume=\"m\",state=\"Enabled\"}"),
        1.0,
        "{}",
        dump()
    );
    // The KMS: one GenerateDataKey (create), one Decrypt (attach).
    assert_eq!(
        v("cryptnbd_kms_calls_total{operation=\"GenerateDataKey\",outcome=\"ok\"}"),
        1.0,
        "{}",
        dump()
    );
    assert_eq!(
        v("cryptnbd_kms_calls_total{operation=\"Decrypt\",outcome=\"ok\"}"),
        1.0,
        "{}",
        dump()
    );
    assert_eq!(
        v("cryptnbd_kms_call_duration_seconds_count{operation=\"Decrypt\"}"),
        1.0
    );
    assert_eq!(
        v("cryptnbd_operations_total{operation=\"attach\",outcome=\"ok\"}"),
        1.0,
        "{}",
        dump()
    );
    let _ = held.kill();
    let _ = held.wait();

    // Every metric the shipped Grafana dashboard asks for is one the daemon serves.
    let dashboard =
        std::fs::read_to_string(e2e_tests::workspace_root().join("docs/grafana-dashboard.json"))
            .expect("docs/grafana-dashboard.json");
    let served: std::collections::BTreeSet<&str> = s
        .keys()
        .map(|k| k.split('{').next().unwrap_or_default())
        .collect();
    let mut asked = 0;
    for (at, _) in dashboard.match_indices("cryptnbd_") {
        let name: String = dashboard[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            served.contains(name.as_str()),
            "the dashboard asks for {name}, which the daemon does not serve: {served:?}"
        );
        asked += 1;
    }
    assert!(asked >= 10, "the dashboard names only {asked} metrics");

    // A key the KMS refuses: the attach fails, and the Decrypt error and the failed attach
    // are counted.
    let other = d.ctl.create_key("metrics-off");
    d.ctl.create_volume("off", "16M", &other, 4096, &[]);
    d.ctl.run(&["kms", "disable-key", &other]).assert_success();
    let refused = d.ctl.run(&["attach", "off"]);
    assert_ne!(
        refused.code,
        Some(0),
        "a volume under a disabled key attached"
    );
    d.ctl.run(&["detach", "m"]).assert_success();
    let s = scrape(&addr);
    let v = |k: &str| value(&s, k);
    assert_eq!(
        v("cryptnbd_kms_calls_total{operation=\"Decrypt\",outcome=\"error\"}"),
        1.0,
        "{s:#?}"
    );
    assert_eq!(
        v("cryptnbd_operations_total{operation=\"attach\",outcome=\"error\"}"),
        1.0,
        "{s:#?}"
    );
    assert_eq!(
        v("cryptnbd_operations_total{operation=\"detach\",outcome=\"ok\"}"),
        1.0,
        "{s:#?}"
    );
    // A detached volume's series are gone.
    assert!(
        !s.keys().any(|k| k.contains("volume=\"m\"")),
        "series of the detached volume remain: {s:#?}"
    );
    assert_eq!(v("cryptnbd_volumes_attached"), 0.0);

    // Only GET /metrics.
    assert_eq!(http(&addr, "GET", "/").0, "HTTP/1.1 404 Not Found");
    assert_eq!(
        http(&addr, "POST", "/metrics").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    d.stop();
}

/// A metrics address that is taken stops the start with a sentence naming it.
#[test]
fn a_taken_metrics_port_fails_the_start_with_a_sentence() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = TestDir::new("metrics-taken");
    let config = dir.join("cryptnbd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nruntime_dir = \"{}\"\n[metrics]\nlisten = \"{addr}\"\n",
            dir.state_dir().display(),
            dir.join("run").display()
        ),
    )
    .expect("config");
    let out = run(
        std::process::Command::new(e2e_tests::daemon::cryptnbd_bin())
            .arg("--config")
            .arg(&config),
    );
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr
            .contains(&format!("cannot serve the metrics on {addr}")),
        "{}",
        out.stderr
    );
}
