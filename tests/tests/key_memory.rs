//! Where a volume's key lives in the real daemon's memory, and where it must not
//! (docs/threat-model.md). Every readable mapping of the daemon (`/proc/PID/maps`,
//! `/proc/PID/mem`, which root may read of a process that is not dumpable) is scanned for
//! either 32-byte half of the 64-byte XTS key. AES keeps a raw key at the start of its key
//! schedule, so a live cipher is found too.
//!
//! - While the volume is attached, both halves are there: the scan sees keys (the control).
//! - After create (the KMS made the key in this process), detach, a rekey and detach, and an
//!   attach the KMS refused, neither half is anywhere.
//! - The daemon's log and audit trail never hold the key, in hex or base64.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use base64::Engine as _;
use e2e_tests::daemon::Daemon;
use e2e_tests::{TestDir, unwrap_volume_key};

/// Readable bytes of the process scanned at a time (consecutive reads overlap by a key half).
const CHUNK: usize = 4 << 20;
const HALF: usize = 32;

/// Where the halves of `key` are in process `pid`'s memory: (mapping, offset) of each find.
fn find_key(pid: u32, key: &[u8]) -> (Vec<String>, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem (needs root)");
    let halves = [&key[..HALF], &key[HALF..]];
    let mut found = Vec::new();
    let mut scanned = 0u64;
    let mut buf = vec![0u8; CHUNK + HALF];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("[anonymous]");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut at = start;
        while at < end {
            let len = ((end - at) as usize).min(buf.len());
            // A mapping that cannot be read (a guard page, a device) is skipped.
            let Ok(n) = mem.read_at(&mut buf[..len], at) else {
                break;
            };
            if n == 0 {
                break;
            }
            scanned += n as u64;
            for (h, half) in halves.iter().enumerate() {
                let window = &buf[..n];
                let mut i = 0;
                while i + HALF <= window.len() {
                    match window[i..window.len() - HALF + 1]
                        .iter()
                        .position(|&b| b == half[0])
                    {
                        None => break,
                        Some(p) => {
                            let j = i + p;
                            if &window[j..j + HALF] == *half {
                                found.push(format!("half {h} at {:#x} in {name}", at + j as u64));
                            }
                            i = j + 1;
                        }
                    }
                }
            }
            if n < len || at + n as u64 >= end {
                break;
            }
            // Overlap so a half across two reads is seen.
            at += (n - HALF) as u64;
        }
    }
    found.sort();
    found.dedup();
    (found, scanned)
}

fn key_of(d: &Daemon, volume: &str) -> zeroize::Zeroizing<Vec<u8>> {
    let path = d.state_dir.join("volumes").join(format!("{volume}.luks"));
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(unwrap_volume_key(&d.ctl.local_kms(), &path))
}

#[track_caller]
fn assert_absent(d: &Daemon, key: &[u8], when: &str) {
    let (found, scanned) = find_key(d.pid(), key);
    assert!(
        scanned > 1 << 20,
        "only {scanned} bytes of the daemon could be read"
    );
    assert!(
        found.is_empty(),
        "{when}: the volume key is still in the daemon's memory ({} of {scanned} bytes): {found:?}",
        found.len()
    );
    println!("{when}: no key byte run in {scanned} bytes of the daemon");
}

#[track_caller]
fn assert_text_free_of(path: &Path, key: &[u8]) {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text).to_lowercase();
    for half in [&key[..HALF], &key[HALF..]] {
        let hex: String = half.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(half);
        assert!(
            !text.contains(&hex),
            "{} holds the key in hex",
            path.display()
        );
        assert!(
            !text.contains(&b64.to_lowercase()[..40]),
            "{} holds the key in base64",
            path.display()
        );
    }
}

#[test]
fn the_key_is_in_memory_only_while_attached_and_never_in_the_log() {
    let dir = TestDir::new("key-memory");
    let d = Daemon::start(&dir, "");
    let keys = [d.ctl.create_key("mem-a"), d.ctl.create_key("mem-b")];
    d.ctl.create_volume("v", "16M", &keys[0], 4096, &[]);
    let key = key_of(&d, "v");
    assert_eq!(key.len(), 64);
    // The daemon asked the KMS for this key and wrote its header: nothing of it is left.
    assert_absent(&d, &key, "after create");

    d.ctl.run(&["attach", "v"]).assert_success();
    let (found, scanned) = find_key(d.pid(), &key);
    assert!(
        found.iter().any(|f| f.starts_with("half 0"))
            && found.iter().any(|f| f.starts_with("half 1")),
        "attached, yet the scan of {scanned} bytes did not find both key halves: {found:?}"
    );
    println!(
        "attached: {} finds in {scanned} bytes ({found:?})",
        found.len()
    );

    d.ctl.run(&["detach", "v"]).assert_success();
    assert_absent(&d, &key, "after detach");

    // A rekey re-wraps the same key (the KMS unwraps and wraps it again, here in this
    // process): attached, rekeyed, detached.
    d.ctl.run(&["attach", "v"]).assert_success();
    d.ctl
        .run(&["rekey", "v", "--kms-key", &keys[1]])
        .assert_success();
    d.ctl.run(&["detach", "v"]).assert_success();
    assert_absent(&d, &key, "after a rekey and detach");
    // Detached, rekeyed back.
    d.ctl
        .run(&["rekey", "v", "--kms-key", &keys[0]])
        .assert_success();
    assert_absent(&d, &key, "after a rekey of a detached volume");

    // An attach the KMS refuses (the key disabled).
    d.ctl
        .run(&["kms", "disable-key", &keys[0]])
        .assert_success();
    let refused = d.ctl.run(&["attach", "v"]);
    assert_ne!(refused.code, Some(0), "attached under a disabled key");
    assert_absent(&d, &key, "after a refused attach");
    d.ctl.run(&["kms", "enable-key", &keys[0]]).assert_success();

    let log = d.stop();
    let log_path = dir.join("cryptnbd.log");
    assert!(!log.is_empty());
    assert_text_free_of(&log_path, &key);
    assert_text_free_of(&dir.state_dir().join("audit").join("audit.jsonl"), &key);
}
