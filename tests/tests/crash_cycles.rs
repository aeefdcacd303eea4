//! Crash cycles: the real daemon is killed with SIGKILL at a random moment while real NBD
//! clients write to its volume, restarted, and every write it acknowledged is read back.
//!
//! Each cycle:
//! - two libnbd clients (nbdsh, `tests/scripts/acked_writes.py`), one per half of the volume,
//!   write random 4 KiB blocks 16 at a time, every 8th with FUA and a FLUSH after every 16,
//!   and record exactly which writes the daemon acknowledged and which were in flight when
//!   their connection died. (fio's own verify state cannot be used for this: after a kill it
//!   counts the writes that failed in flight as written, and reported up to 15 "lost" blocks
//!   against nbdkit's file plugin, which loses nothing; docs/reliability.md);
//! - in some cycles a lifecycle operation runs into the kill: a snapshot, a rekey (between two
//!   master keys), or a rebuild from a snapshot (then the volume must hold either its old
//!   content or the snapshot's, whole);
//! - the daemon is killed, started again, and the volume attached (the daemon re-attaches its
//!   saved attachments itself; only a rebuild, which detaches first, may leave it detached).
//!
//! A killed daemon leaves the kernel's page cache behind, so this tests the daemon's own
//! consistency (everything it acknowledged was handed to the kernel, headers and journals
//! survive any moment), not durability against power loss (tests/vm's power cuts do that).
//!
//! `CRYPTNBD_CRASH_CYCLES` (20 by default, in CI) and `CRYPTNBD_CRASH_SEED` (random by
//! default, printed) make the campaign: `CRYPTNBD_CRASH_CYCLES=200 cargo test -p e2e-tests
//! --test crash_cycles -- --nocapture` (docs/reliability.md). Needs libnbd-bin and
//! python3-libnbd.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::daemon::{Daemon, nbdsh};
use e2e_tests::{Outcome, TestDir, require_tool};

const VOLUME: &str = "v";
const HALF: u64 = 32 << 20;
const SCRIPT: &str = include_str!("../scripts/acked_writes.py");

/// xorshift64*: the moments and the operations of a campaign, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A duration between `lo` and `hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// What a cycle runs into the kill besides the writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    None,
    Snapshot,
    Rekey,
    Rebuild,
}

impl Operation {
    fn of_cycle(cycle: u64) -> Self {
        match cycle % 6 {
            1 => Self::Snapshot,
            3 => Self::Rekey,
            5 => Self::Rebuild,
            _ => Self::None,
        }
    }
}

/// The acknowledged-writes client on half `half` of the volume (`mode`: write or check).
fn acked_writes(uri: &str, dir: &Path, cycle: u64, half: u64, mode: &str) -> Command {
    let mut cmd = nbdsh();
    cmd.args(["-c", SCRIPT])
        .env("URI", uri)
        .env("MODE", mode)
        .env("START", (half * HALF).to_string())
        .env("SIZE", HALF.to_string())
        .env("CYCLE", cycle.to_string())
        .env("STATE", dir.join(format!("acked-{half}.json")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Whether the daemon serves `VOLUME` now.
fn attached(d: &Daemon) -> bool {
    let out = d.ctl.run_quiet(&["status", "--json"]);
    out.code == Some(0)
        && out.json()["attachments"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["volume"] == VOLUME))
}

/// The master key that wraps `VOLUME` now.
fn wrapping_key(d: &Daemon) -> String {
    let out = d.ctl.run(&["status", "--json"]);
    out.assert_success();
    out.json()["attachments"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["volume"] == VOLUME))
        .and_then(|x| x["kms_key"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn output_of(child: Child) -> Outcome {
    let command = "the cycle's client".to_owned();
    let out = child.wait_with_output().expect("wait for a client");
    Outcome {
        command,
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn the_daemon_killed_at_random_moments_loses_no_acknowledged_write() {
    require_tool("nbdsh", "libnbd-bin");
    let cycles: u64 = std::env::var("CRYPTNBD_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CRYPTNBD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("crash cycles: {cycles}, CRYPTNBD_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = TestDir::new("crash-cycles");
    let mut d = Daemon::start(&dir, "");
    let keys = [d.ctl.create_key("crash-a"), d.ctl.create_key("crash-b")];
    d.ctl.create_volume(VOLUME, "64M", &keys[0], 4096, &[]);
    d.ctl.run(&["attach", VOLUME]).assert_success();
    let scratch = dir.join("scratch");
    let started = Instant::now();
    // Acknowledged writes read back, of them covered by a FLUSH or FUA, blocks checked.
    let (mut acked, mut durable, mut blocks, mut by_hand) = (0u64, 0u64, 0u64, 0u64);
    let mut killed_during = std::collections::BTreeMap::<String, u64>::new();
    for cycle in 0..cycles {
        let op = Operation::of_cycle(cycle);
        let here = dir.join(&format!("cycle-{cycle}"));
        std::fs::create_dir_all(&here).expect("cycle dir");
        let uri = d.uri(VOLUME);
        let fail = |d: &Daemon, what: String| -> ! {
            panic!(
                "cycle {cycle} ({op:?}) of CRYPTNBD_CRASH_SEED={seed}: {what}\nthe daemon's log ends:\n{}",
                d.log_text()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        };

        // A rebuild: from a snapshot taken now, after a write that makes the volume differ
        // from it; killed while it runs, the volume holds one or the other.
        let mut rebuild_hashes = None;
        if op == Operation::Rebuild {
            let snap = format!("base-{cycle}");
            d.ctl.run(&["snapshot", VOLUME, &snap]).assert_success();
            let snapshot_hash = d.read_export(VOLUME, &scratch);
            let marker = vec![u8::try_from(cycle % 251).unwrap_or(0) ^ 0xa5; 1 << 20];
            d.write_export(VOLUME, &marker, &scratch);
            let before = d.read_export(VOLUME, &scratch);
            rebuild_hashes = Some((before, snapshot_hash));
            let child = d
                .ctl
                .command(&["rebuild", VOLUME, "--from-snapshot", &snap, "--force"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start cryptnbdctl rebuild");
            std::thread::sleep(rng.millis(0, 350));
            d.kill();
            let how = if output_of(child).code == Some(0) {
                "finished before"
            } else {
                "killed during"
            };
            *killed_during.entry(format!("rebuild ({how})")).or_default() += 1;
            d = Daemon::start(&dir, "");
        } else {
            let writers: Vec<Child> = (0..2)
                .map(|half| {
                    acked_writes(&uri, &here, cycle, half, "write")
                        .spawn()
                        .expect("start nbdsh")
                })
                .collect();
            let lifecycle = match op {
                Operation::Snapshot => Some(vec!["snapshot".to_owned(), VOLUME.to_owned()]),
                Operation::Rekey => {
                    // To the key that does not wrap it now (an earlier rekey may have been
                    // killed before or after its commit).
                    let now = wrapping_key(&d);
                    let to = keys.iter().find(|k| **k != now).expect("two keys");
                    Some(vec![
                        "rekey".to_owned(),
                        VOLUME.to_owned(),
                        "--kms-key".to_owned(),
                        to.clone(),
                    ])
                }
                _ => None,
            };
            // The kill comes after the writers ran for `wait`; a lifecycle operation starts
            // shortly before it (a rekey takes some milliseconds, a snapshot a little more).
            let wait = rng.millis(50, 1000);
            let lead = match op {
                Operation::Rekey => rng.millis(0, 40),
                _ => rng.millis(0, 250),
            }
            .min(wait);
            std::thread::sleep(if lifecycle.is_some() {
                wait - lead
            } else {
                wait
            });
            let lifecycle = lifecycle.map(|args| {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let child = d
                    .ctl
                    .command(&args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start the lifecycle operation");
                std::thread::sleep(lead);
                child
            });
            d.kill();
            let writers: Vec<Outcome> = writers.into_iter().map(output_of).collect();
            if let Some(child) = lifecycle {
                let out = output_of(child);
                let how = if out.code == Some(0) {
                    "finished before"
                } else {
                    "killed during"
                };
                *killed_during
                    .entry(format!("{op:?} ({how})").to_lowercase())
                    .or_default() += 1;
            }
            d = Daemon::start(&dir, "");
            if let Some(out) = writers.iter().find(|o| o.code != Some(0)) {
                fail(&d, format!("a writer failed: {}", out.stderr));
            }
        }

        // Back: attached by the daemon itself, or by hand after a rebuild.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !attached(&d) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !attached(&d) {
            if op != Operation::Rebuild {
                fail(
                    &d,
                    "the daemon did not re-attach its saved attachment".into(),
                );
            }
            let out = d.ctl.run_quiet(&["attach", VOLUME]);
            if out.code != Some(0) {
                fail(&d, format!("the volume does not attach: {}", out.stderr));
            }
            by_hand += 1;
        }
        let uri = d.uri(VOLUME);
        // What a kill may have interrupted is readable: the snapshots, the audit trail.
        for args in [
            &["snapshots", VOLUME, "--json"][..],
            &["audit", "--volume", VOLUME, "--limit", "5", "--json"],
        ] {
            let out = d.ctl.run_quiet(args);
            if out.code != Some(0) {
                fail(
                    &d,
                    format!("`cryptnbdctl {}` failed: {}", args.join(" "), out.stderr),
                );
            }
        }

        let key = wrapping_key(&d);
        if !keys.contains(&key) {
            fail(
                &d,
                format!("the volume is wrapped by {key:?}, neither of the two keys"),
            );
        }

        if let Some((before, snapshot)) = rebuild_hashes {
            let now = d.read_export(VOLUME, &scratch);
            if now != before && now != snapshot {
                fail(
                    &d,
                    "after a rebuild killed mid-way the volume holds neither its old content nor the snapshot's".into(),
                );
            }
            continue;
        }

        // Every acknowledged write, read back.
        for half in 0..2 {
            let check = output_of(
                acked_writes(&uri, &here, cycle, half, "check")
                    .spawn()
                    .expect("start nbdsh"),
            );
            if check.code != Some(0) {
                fail(&d, format!("{}{}", check.stdout_text(), check.stderr));
            }
            let figures: serde_json::Value =
                serde_json::from_str(check.stdout_text().trim()).unwrap_or_default();
            acked += figures["acked_writes"].as_u64().unwrap_or(0);
            durable += figures["durable"].as_u64().unwrap_or(0);
            blocks += figures["blocks"].as_u64().unwrap_or(0);
        }
        if cycle % 10 == 9 || cycle + 1 == cycles {
            println!(
                "{} cycles in {:.0?}: {acked} acknowledged writes ({durable} flushed or FUA), {blocks} blocks read back",
                cycle + 1,
                started.elapsed()
            );
        }
        std::fs::remove_dir_all(&here).ok();
    }
    println!(
        "crash cycles done: {cycles} in {:.1?} (seed {seed}); {acked} acknowledged writes ({durable} flushed or FUA) in {blocks} blocks read back, none lost; lifecycle operations: {killed_during:?}; attached by hand after a rebuild: {by_hand}",
        started.elapsed()
    );
    // The campaign did something: writes were acknowledged and checked.
    assert!(acked > 0 && durable > 0 && blocks > 0);
    d.stop();
}
