//! The soak (issue 18, docs/reliability.md "Soak"): the real daemon on AWS KMS (moto, behind a
//! proxy that slows it and takes it down for a while), 20 volumes, and mixed real clients at
//! once for `CRYPTNBD_SOAK_SECS` (120 by default, in CI; 1800 by hand):
//! - nbdcopy copies a new random 8 MiB image into one volume and back out, and compares;
//! - fio writes a volume with crc32c verification, run after run;
//! - ext4 over nbdfuse and a loop device: files written, synced, read back, removed;
//! - ten volumes attached and detached in turn, each written and read back while attached;
//! - a snapshot every 1/30 of the run (a minute in 30 minutes) and a rekey every 1/6 (five);
//! - the KMS slowed (500 ms per call) for a tenth of the run, then down for 5 s.
//!
//! Every two seconds the daemon's RSS and descriptors are sampled; at the end the metrics
//! endpoint gives the p99 latency. Targets: no verify error, no failure outside the KMS's
//! bad moments, no descriptor growth, RSS flat after warm-up (the slope is printed).

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::daemon::{Daemon, http, nbdcopy, nbdsh};
use e2e_tests::kms_proxy::{KmsProxy, Reply, Rule};
use e2e_tests::moto::{Moto, daemon_aws_config};
use e2e_tests::mount::Mounted;
use e2e_tests::{TestDir, TestRng, open_fds, require_tool, run, status_kib};

/// No credentials from the test's own environment, no instance metadata lookups.
const ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", ""),
    ("AWS_SECRET_ACCESS_KEY", ""),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// Volumes attached and detached in turn.
const CHURN: std::ops::Range<usize> = 10..20;

/// What the workers share.
struct Shared {
    deadline: Instant,
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
    /// When the KMS was slowed or down (start, end, which), for failures expected then.
    kms_trouble: Mutex<Vec<(Instant, Instant, &'static str)>>,
    counts: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// The latest a failure came after the KMS's trouble ended.
    latest_failure_after_trouble: Mutex<Duration>,
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    fn error(&self, what: String) {
        eprintln!("soak error: {what}");
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    fn count(&self, what: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(what)
            .or_default() += 1;
    }

    /// Whether the KMS was down (or slow: `slow_counts`) between `started` and `ended`, or
    /// less than 10 s before: the trouble that explains a failure then.
    fn kms_trouble_during(&self, started: Instant, ended: Instant) -> Option<&'static str> {
        let trouble = self.kms_trouble.lock().unwrap_or_else(|p| p.into_inner());
        let t = trouble
            .iter()
            .find(|(s, e, _)| started <= *e + Duration::from_secs(10) && ended >= *s)?;
        // How long after the trouble ended a failure still came.
        let late = ended.saturating_duration_since(t.1);
        let mut worst = self
            .latest_failure_after_trouble
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *worst = (*worst).max(late);
        Some(t.2)
    }

    /// Counts a failure the KMS's trouble explains, or records an error.
    fn refused(&self, started: Instant, what: String) {
        let kind = match self.kms_trouble_during(started, Instant::now()) {
            Some("down") => "operations refused while the KMS was down",
            Some(_) => "operations refused while the KMS was slow",
            None => return self.error(what),
        };
        let first = !self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(kind);
        if first {
            eprintln!("soak: the first of the {kind}: {what}");
        }
        self.count(kind);
    }
}

/// Least-squares slope of `(seconds, kib)` samples, in KiB per minute.
fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

/// The `q` quantile (seconds) of the request latency histogram for `command`, over every
/// volume, from a scrape's text.
fn quantile(scrape: &str, command: &str, q: f64) -> Option<f64> {
    let mut buckets: std::collections::BTreeMap<u64, f64> = Default::default();
    let tag = format!("command=\"{command}\"");
    for line in scrape.lines() {
        if !line.starts_with("cryptnbd_request_duration_seconds_bucket{") || !line.contains(&tag) {
            continue;
        }
        let le = line.split("le=\"").nth(1)?.split('"').next()?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let count: f64 = line.rsplit(' ').next()?.parse().ok()?;
        // Keyed by the bound's bits: positive floats sort as their bits do.
        *buckets.entry(le.to_bits()).or_default() += count;
    }
    let total = *buckets.values().last()?;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| **c >= q * total)
        .map(|(le, _)| f64::from_bits(*le))
}

/// nbdcopy: a new random image into `v0`, back out, compared.
fn nbdcopy_worker(s: &Shared, d: &Daemon, dir: &Path) {
    let mut round = 0u64;
    while s.running() {
        round += 1;
        let image = TestRng::new(round).bytes(8 << 20);
        let (src, back) = (dir.join("copy-in"), dir.join("copy-out"));
        std::fs::write(&src, &image).expect("write image");
        let _ = std::fs::remove_file(&back);
        let into = run(Command::new(nbdcopy()).arg(&src).arg(d.uri("v0")));
        let out = run(Command::new(nbdcopy()).arg(d.uri("v0")).arg(&back));
        if into.code != Some(0) || out.code != Some(0) {
            s.error(format!(
                "nbdcopy round {round} failed: {}{}",
                into.stderr, out.stderr
            ));
            continue;
        }
        let got = std::fs::read(&back).unwrap_or_default();
        if got.len() < image.len() || got[..image.len()] != image[..] {
            s.error(format!(
                "nbdcopy round {round}: the image read back differs"
            ));
        }
        s.count("nbdcopy rounds");
    }
}

/// fio with crc32c verification on `v1`, run after run.
fn fio_worker(s: &Shared, d: &Daemon, dir: &Path) {
    let fio = require_tool("fio", "fio");
    let mut round = 0u64;
    while s.running() {
        round += 1;
        let out = run(Command::new(&fio).current_dir(dir).args([
            "--name=soak",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri("v1")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            &format!("--randseed={round}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ]));
        let text = out.stdout_text();
        let report: serde_json::Value =
            serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).unwrap_or_default();
        if out.code != Some(0) || report["jobs"][0]["error"] != 0 {
            s.error(format!("fio round {round} failed: {}", out.stderr));
        }
        s.count("fio verified runs");
    }
}

/// ext4 on `v2` through nbdfuse and a loop device: files written, synced, read back.
fn ext4_worker(s: &Shared, d: &Daemon, dir: &TestDir) {
    let m = Mounted::new(dir, &d.nbd_socket(), "v2", true);
    let mut round = 0u64;
    while s.running() {
        round += 1;
        let files: Vec<(String, Vec<u8>)> = (0..8)
            .map(|i| {
                (
                    format!("f{round}-{i}"),
                    TestRng::new(round * 100 + i).bytes(100_000 + i as usize * 77_777),
                )
            })
            .collect();
        for (name, data) in &files {
            std::fs::write(m.mnt.join(name), data).expect("write a file");
        }
        run(&mut Command::new("sync")).assert_success();
        for (name, data) in &files {
            if std::fs::read(m.mnt.join(name)).ok().as_ref() != Some(data) {
                s.error(format!("ext4 round {round}: {name} reads back differently"));
            }
            let _ = std::fs::remove_file(m.mnt.join(name));
        }
        s.count("ext4 rounds");
    }
    m.fsck_and_unmount();
}

/// Ten volumes attached in turn, written and read back, detached.
fn churn_worker(s: &Shared, d: &Daemon) {
    let mut round = 0usize;
    let check = "import os, nbd\nh = nbd.NBD()\nh.connect_uri(os.environ['URI'])\nb = bytes([int(os.environ['SEED']) % 251]) * (1 << 20)\nh.pwrite(b, 0)\nh.flush()\nassert h.pread(1 << 20, 0) == b\nh.shutdown()\n";
    while s.running() {
        let v = format!("v{}", CHURN.start + round % CHURN.len());
        round += 1;
        let started = Instant::now();
        let attach = d.ctl.run_quiet(&["attach", &v]);
        if attach.code != Some(0) {
            s.refused(started, format!("attach {v}: {}", attach.stderr.trim()));
            continue;
        }
        let io = run(nbdsh()
            .args(["-c", check])
            .env("URI", d.uri(&v))
            .env("SEED", round.to_string()));
        if io.code != Some(0) {
            s.error(format!("I/O on {v}: {}", io.stderr.trim()));
        }
        let detach = d.ctl.run_quiet(&["detach", &v]);
        if detach.code != Some(0) {
            s.error(format!("detach {v}: {}", detach.stderr.trim()));
        }
        s.count("attach/detach cycles");
    }
}

/// Snapshots (the oldest of each volume deleted) and rekeys, on schedule.
fn lifecycle_worker(s: &Shared, d: &Daemon, keys: &[String; 2], every: (Duration, Duration)) {
    let started = Instant::now();
    let (mut next_snapshot, mut next_rekey) = (every.0, every.1);
    let (mut snapshots, mut rekeys) = (0usize, 0usize);
    while s.running() {
        std::thread::sleep(Duration::from_millis(200));
        let now = started.elapsed();
        if now >= next_snapshot {
            next_snapshot += every.0;
            let v = format!("v{}", 3 + snapshots % 7);
            let name = format!("s{snapshots}");
            let t0 = Instant::now();
            let out = d.ctl.run_quiet(&["snapshot", &v, &name]);
            if out.code == Some(0) {
                s.count("snapshots");
                if snapshots >= 7 {
                    let old = format!("s{}", snapshots - 7);
                    let del = d.ctl.run_quiet(&["delete-snapshot", &v, &old]);
                    if del.code != Some(0) {
                        s.error(format!("delete-snapshot {v} {old}: {}", del.stderr.trim()));
                    }
                }
            } else {
                s.refused(t0, format!("snapshot {v}: {}", out.stderr.trim()));
            }
            snapshots += 1;
        }
        if now >= next_rekey {
            next_rekey += every.1;
            let to = &keys[(rekeys + 1) % 2];
            let t0 = Instant::now();
            let out = d.ctl.run_quiet(&["rekey", "v3", "--kms-key", to]);
            if out.code == Some(0) {
                s.count("rekeys");
                rekeys += 1;
            } else {
                s.refused(t0, format!("rekey v3: {}", out.stderr.trim()));
            }
        }
    }
}

/// The KMS slowed for a tenth of the run from a quarter of it, then down for 5 s at 60 %.
fn kms_worker(s: &Shared, proxy: &KmsProxy, total: Duration) {
    let started = Instant::now();
    let phases = [
        (total / 4, "slow"),
        (total / 4 + total / 10, "fast"),
        (total * 6 / 10, "down"),
        (total * 6 / 10 + Duration::from_secs(5), "up"),
    ];
    for (at, what) in phases {
        while started.elapsed() < at {
            if !s.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let now = Instant::now();
        match what {
            "slow" => proxy.push(Rule::on(&[], Reply::Delay(Duration::from_millis(500)))),
            "fast" => proxy.clear(),
            "down" => proxy.set_down(true),
            _ => proxy.set_down(false),
        }
        let mut trouble = s.kms_trouble.lock().unwrap_or_else(|p| p.into_inner());
        match what {
            "slow" | "down" => trouble.push((now, now + total, what)),
            _ => {
                if let Some(last) = trouble.last_mut() {
                    last.1 = now;
                }
            }
        }
        drop(trouble);
        eprintln!("soak: the KMS is {what} at {:.0?}", started.elapsed());
    }
}

#[test]
fn a_soak_of_mixed_clients_churn_lifecycle_and_a_troubled_kms() {
    let total = Duration::from_secs(
        std::env::var("CRYPTNBD_SOAK_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120),
    );
    let dir = TestDir::new("soak");
    let moto = Moto::start();
    let proxy = KmsProxy::start(Some(moto.addr));
    let keys = [moto.create_key("soak a"), moto.create_key("soak b")];
    let config = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        daemon_aws_config(
            dir.path(),
            &proxy.url(),
            "key_check_interval_secs = 15",
            "",
            (2.0, 5.0)
        )
    );
    let d = Daemon::start_env(&dir, &config, ENV);
    for i in 0..20 {
        let size = if i == 2 { "64M" } else { "16M" };
        d.ctl
            .create_volume(&format!("v{i}"), size, &keys[0], 4096, &[]);
        if !CHURN.contains(&i) {
            d.ctl.run(&["attach", &format!("v{i}")]).assert_success();
        }
    }
    let metrics = d.metrics_addr();
    let pid = d.pid();
    let shared = Shared {
        deadline: Instant::now() + total,
        stop: AtomicBool::new(false),
        errors: Mutex::default(),
        kms_trouble: Mutex::default(),
        counts: Mutex::default(),
        latest_failure_after_trouble: Mutex::default(),
    };
    let samples: Mutex<Vec<(f64, u64, usize)>> = Mutex::default();
    let started = Instant::now();
    let fs_dir = TestDir::new("soak-fs");
    let every = (total / 30, total / 6);
    std::thread::scope(|scope| {
        let s = &shared;
        scope.spawn(|| nbdcopy_worker(s, &d, dir.path()));
        scope.spawn(|| fio_worker(s, &d, dir.path()));
        scope.spawn(|| ext4_worker(s, &d, &fs_dir));
        scope.spawn(|| churn_worker(s, &d));
        scope.spawn(|| lifecycle_worker(s, &d, &keys, every));
        scope.spawn(|| kms_worker(s, &proxy, total));
        scope.spawn(|| {
            while s.running() {
                samples.lock().unwrap_or_else(|p| p.into_inner()).push((
                    started.elapsed().as_secs_f64(),
                    status_kib(pid, "VmRSS:"),
                    open_fds(pid),
                ));
                std::thread::sleep(Duration::from_secs(2));
            }
        });
    });
    proxy.set_down(false);
    proxy.clear();
    let text = http(&metrics, "GET", "/metrics").1;
    let p99 =
        |c: &str| quantile(&text, c, 0.99).map_or("none".into(), |q| format!("{:.2} ms", q * 1e3));
    let p50 =
        |c: &str| quantile(&text, c, 0.5).map_or("none".into(), |q| format!("{:.2} ms", q * 1e3));
    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    // After warm-up: the last three quarters of the run.
    let warm = total.as_secs_f64() / 4.0;
    let after: Vec<&(f64, u64, usize)> = samples.iter().filter(|(t, _, _)| *t >= warm).collect();
    let rss: Vec<(f64, f64)> = after.iter().map(|(t, r, _)| (*t, *r as f64)).collect();
    let rss_slope = slope(&rss);
    let (fd_first, fd_last) = (
        after.first().map_or(0, |x| x.2),
        after.last().map_or(0, |x| x.2),
    );
    let fd_max = after.iter().map(|x| x.2).max().unwrap_or(0);
    let (rss_first, rss_last) = (
        after.first().map_or(0, |x| x.1),
        after.last().map_or(0, |x| x.1),
    );
    let late = *shared
        .latest_failure_after_trouble
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let counts = shared
        .counts
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let errors = shared
        .errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    println!(
        "soak of {total:?}: {counts:?}; RSS after warm-up {rss_first} -> {rss_last} KiB, slope \
         {rss_slope:.1} KiB/min over {} samples; descriptors after warm-up {fd_first} -> \
         {fd_last} (max {fd_max}); latency read p50 {} p99 {}, write p50 {} p99 {}, flush p99 \
         {}; the last refusal {late:.1?} after the KMS was back; {} errors",
        rss.len(),
        p50("read"),
        p99("read"),
        p50("write"),
        p99("write"),
        p99("flush"),
        errors.len()
    );
    assert!(errors.is_empty(), "{} errors: {errors:#?}", errors.len());
    for what in [
        "nbdcopy rounds",
        "fio verified runs",
        "ext4 rounds",
        "attach/detach cycles",
        "snapshots",
        "rekeys",
    ] {
        assert!(
            counts.get(what).copied().unwrap_or(0) > 0,
            "no {what}: {counts:?}"
        );
    }
    assert!(
        fd_last <= fd_first + 4,
        "descriptors grew from {fd_first} to {fd_last} after warm-up"
    );
    assert!(
        rss_last <= rss_first + 64 * 1024,
        "RSS grew from {rss_first} to {rss_last} KiB after warm-up (slope {rss_slope:.1} KiB/min)"
    );
    d.stop();
}
