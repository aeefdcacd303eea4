//! Volume lifecycle through the running daemon: import (raw and qcow2), rebuild from the
//! base image and from a snapshot, snapshots, rekey, re-encryption, plaintext export, header
//! backup and restore, recovery keyslots, busy volumes and cancellation, and kill -9 at
//! injected crash points. Content is always checked through a real NBD client (nbdcopy).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::daemon::Daemon;
use e2e_tests::{
    TestDir, TestRng, cryptsetup, cryptsetup_test_passphrase, require_tool, run, unwrap_volume_key,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SID: &str = "S-1-5-21-277731876-1789304096-451871588-1107";
const DIRECTORY: &str = "d-1234abcd01";

fn write_random(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut rng = TestRng::new(seed);
    let mut data = rng.bytes(len as usize);
    data.truncate(len as usize);
    std::fs::write(path, &data).expect("write image");
    data
}

fn padded(data: &[u8], to: usize) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(to, 0);
    v
}

#[track_caller]
fn import(d: &Daemon, name: &str, image: &Path, extra: &[&str]) -> Value {
    let img = image.to_string_lossy();
    let mut args = vec![
        "--json",
        "create",
        name,
        "--from-image",
        &img,
        "--kms-key",
        "alias/e2e",
        "--sid",
        SID,
        "--directory",
        DIRECTORY,
    ];
    args.extend_from_slice(extra);
    d.ctl.run(&args).assert_success().json()
}

fn list_entry(d: &Daemon, name: &str) -> Value {
    let list = d.ctl.run(&["--json", "list"]).assert_success().json();
    list.as_array()
        .or_else(|| list["volumes"].as_array())
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {list}"))
}

/// SHA-256 of `data`, hex, by the coreutils tool (independent of the daemon's code).
fn sha256_hex(data: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("x");
    std::fs::write(&p, data).expect("write");
    let out = run(Command::new("sha256sum").arg(&p))
        .assert_success()
        .stdout_text();
    out.split_whitespace().next().expect("sum").to_owned()
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in [dir.join("volumes"), dir.join("snapshots")] {
        let Ok(rd) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(leftovers_in(&p));
            } else if e.file_name().to_string_lossy().starts_with('.') {
                out.push(p);
            }
        }
    }
    out
}

fn leftovers_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect()
}

#[test]
fn import_snapshot_rebuild_from_base_and_snapshot_then_delete() {
    let dir = TestDir::new("lc-import");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");
    // Not a multiple of the sector size: the tail is padded with zeros.
    let image = dir.join("base.img");
    let base = write_random(&image, 12 * MIB + 1000, 1);
    let created = import(&d, "v", &image, &["--record-base"]);
    let size = created["size"].as_u64().expect("size");
    assert_eq!(size, (12 * MIB + 1000).div_ceil(4096) * 4096, "{created}");
    let entry = list_entry(&d, "v");
    assert_eq!(entry["base_image"]["sha256"], sha256_hex(&base), "{entry}");
    assert_eq!(entry["base_image"]["size"], 12 * MIB + 1000);

    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch) == padded(&base, size as usize));

    // Content C, snapshot s1, then content B.
    let c = TestRng::new(2).bytes(size as usize);
    d.write_export("v", &c, &scratch);
    let snap = d
        .ctl
        .run(&["--json", "snapshot", "v", "s1"])
        .assert_success()
        .json();
    assert!(
        snap["method"] == "copy" || snap["method"] == "reflink",
        "{snap}"
    );
    let snap_file = PathBuf::from(snap["path"].as_str().expect("path"));
    // A snapshot is a LUKS2 file cryptsetup reads.
    run(Command::new(cryptsetup()).arg("luksDump").arg(&snap_file)).assert_success();
    d.ctl
        .run(&["snapshot", "v", "s1"])
        .assert_code(4)
        .assert_stderr_contains("already has a snapshot s1");
    let b = TestRng::new(3).bytes(size as usize);
    d.write_export("v", &b, &scratch);
    let listed = d
        .ctl
        .run(&["--json", "snapshots", "v"])
        .assert_success()
        .json();
    assert_eq!(listed["snapshots"][0]["name"], "s1", "{listed}");

    // Attached: refused without --force, nothing changed.
    d.ctl
        .run(&["rebuild", "v"])
        .assert_code(4)
        .assert_stderr_contains("--force");
    assert!(d.read_export("v", &scratch) == b);
    // From the recorded base image.
    let r = d
        .ctl
        .run(&["--json", "rebuild", "v", "--force"])
        .assert_success()
        .json();
    assert_eq!(r["reattached"], true, "{r}");
    assert!(d.read_export("v", &scratch) == padded(&base, size as usize));
    // From the snapshot.
    d.ctl
        .run(&["rebuild", "v", "--from-snapshot", "s1", "--force"])
        .assert_success();
    assert!(d.read_export("v", &scratch) == c);

    // Delete: refused while attached, then while snapshots exist.
    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl
        .run(&["delete", "v", "--yes"])
        .assert_code(4)
        .assert_stderr_contains("snapshot");
    d.ctl
        .run(&["delete", "v", "--yes", "--with-snapshots"])
        .assert_success();
    assert!(!snap_file.exists());
    assert!(
        leftovers(&d.state_dir).is_empty(),
        "{:?}",
        leftovers(&d.state_dir)
    );
    let audit = d
        .ctl
        .run(&["--json", "audit", "--volume", "v"])
        .assert_success()
        .json();
    let ops: Vec<&str> = audit
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["operation"].as_str())
        .collect();
    for op in [
        "create-from-image",
        "snapshot",
        "rebuild",
        "delete-snapshot",
        "delete",
    ] {
        assert!(ops.contains(&op), "{op} not in {ops:?}");
    }
}

#[test]
fn qcow2_image_is_imported_through_qemu() {
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-nbd", "qemu-utils");
    let dir = TestDir::new("lc-qcow2");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let raw = dir.join("src.raw");
    let data = write_random(&raw, 8 * MIB, 4);
    let qcow = dir.join("src.qcow2");
    run(Command::new(&qemu_img)
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow))
    .assert_success();
    let created = import(&d, "q", &qcow, &["--record-base"]);
    assert_eq!(created["size"], 8 * MIB, "{created}");
    assert_eq!(list_entry(&d, "q")["base_image"]["format"], "qcow2");
    d.ctl.run(&["attach", "q"]).assert_success();
    assert!(d.read_export("q", &dir.join("scratch")) == data);
}

#[test]
fn rekey_rewraps_and_key_states_gate_rebuild() {
    let dir = TestDir::new("lc-rekey");
    let d = Daemon::start(&dir, "");
    let key1 = d.ctl.create_key("e2e");
    let key2 = d.ctl.create_key("second");
    let scratch = dir.join("scratch.bin");
    let image = dir.join("base.img");
    let base = write_random(&image, 4 * MIB, 5);
    import(&d, "v", &image, &["--record-base"]);
    let vol = d.state_dir.join("volumes/v.luks");
    let kms = d.ctl.local_kms();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let key_before = rt.block_on(unwrap_volume_key(&kms, &vol));

    // A snapshot under key 1, then a rekey (attached) to key 2 with a new extra pair.
    d.ctl.run(&["attach", "v"]).assert_success();
    d.ctl.run(&["snapshot", "v", "before"]).assert_success();
    let r = d
        .ctl
        .run(&[
            "--json",
            "rekey",
            "v",
            "--kms-key",
            "alias/second",
            "--context",
            "team=blue",
        ])
        .assert_success()
        .json();
    assert_eq!(r["old_key_id"], key1.as_str(), "{r}");
    assert_eq!(r["key_id"], key2.as_str(), "{r}");
    assert_eq!(r["context"]["team"], "blue", "{r}");
    let info = d.ctl.inspect_json(&vol);
    assert_eq!(info["token"]["key_id"], key2.as_str(), "{info}");
    // Same data key, no data rewritten.
    let kms = d.ctl.local_kms();
    assert!(rt.block_on(unwrap_volume_key(&kms, &vol)) == key_before);
    assert!(d.read_export("v", &scratch) == base);

    // Key 1 disabled: the volume (now under key 2) still attaches.
    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl
        .run(&["kms", "disable-key", "alias/e2e"])
        .assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    d.ctl
        .run(&["kms", "enable-key", "alias/e2e"])
        .assert_success();

    // A snapshot restore re-wraps under the current key: it never undoes the rekey.
    d.ctl
        .run(&["rebuild", "v", "--from-snapshot", "before", "--force"])
        .assert_success();
    assert_eq!(d.ctl.inspect_json(&vol)["token"]["key_id"], key2.as_str());
    assert!(d.read_export("v", &scratch) == base);

    // Rebuild is refused while key 2 is disabled or pending deletion, volume untouched.
    let other = TestRng::new(6).bytes(4 * MIB as usize);
    d.write_export("v", &other, &scratch);
    d.ctl
        .run(&["kms", "disable-key", "alias/second"])
        .assert_success();
    d.ctl
        .run(&["rebuild", "v", "--force"])
        .assert_code(5)
        .assert_stderr_contains("disabled");
    assert!(d.read_export("v", &scratch) == other);
    d.ctl
        .run(&["kms", "enable-key", "alias/second"])
        .assert_success();
    d.ctl
        .run(&[
            "kms",
            "schedule-key-deletion",
            "alias/second",
            "--days",
            "7",
        ])
        .assert_success();
    d.ctl.run(&["rebuild", "v", "--force"]).assert_code(5);
    assert!(d.read_export("v", &scratch) == other);
    d.ctl
        .run(&["kms", "cancel-key-deletion", "alias/second"])
        .assert_success();
    d.ctl
        .run(&["kms", "enable-key", "alias/second"])
        .assert_success();
    d.ctl.run(&["rebuild", "v", "--force"]).assert_success();
    assert!(d.read_export("v", &scratch) == base);

    // A changed context: the token's context no longer matches what the key was wrapped
    // under. The rebuild is refused and the volume untouched; with the context put back it
    // is accepted.
    d.write_export("v", &other, &scratch);
    d.ctl.run(&["detach", "v"]).assert_success();
    let token = e2e_tests::kms_token(&e2e_tests::read_primary_metadata(&vol));
    assert_eq!(token["context"]["team"], "blue");
    let set_team = |team: &str| e2e_tests::set_context_pair(&vol, "team", team);
    set_team("red");
    d.ctl
        .run(&["rebuild", "v"])
        .assert_code(5)
        .assert_stderr_contains("context");
    set_team("blue");
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch) == other);
    d.ctl.run(&["rebuild", "v", "--force"]).assert_success();
    assert!(d.read_export("v", &scratch) == base);
}

#[test]
fn reencrypt_export_and_header_backup_restore() {
    let dir = TestDir::new("lc-reenc");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");
    let image = dir.join("base.img");
    let data = write_random(&image, 6 * MIB, 7);
    import(&d, "v", &image, &[]);
    let vol = d.state_dir.join("volumes/v.luks");

    // Export: the plaintext flag is required; the output equals the content.
    let out = dir.join("export.raw");
    let o = out.to_string_lossy().into_owned();
    d.ctl.run(&["export", "v", "--to", &o]).assert_code(2);
    assert!(!out.exists());
    let e = d
        .ctl
        .run(&["--json", "export", "v", "--to", &o, "--plaintext"])
        .assert_success()
        .json();
    assert!(std::fs::read(&out).expect("export") == data);
    assert_eq!(e["sha256"], sha256_hex(&data), "{e}");
    d.ctl
        .run(&["export", "v", "--to", &o, "--plaintext"])
        .assert_code(4);

    // Re-encrypt: a new data key, the same content.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let old_key = rt.block_on(unwrap_volume_key(&d.ctl.local_kms(), &vol));
    d.ctl.run(&["attach", "v"]).assert_success();
    d.ctl.run(&["reencrypt", "v"]).assert_code(4);
    let r = d
        .ctl
        .run(&["--json", "reencrypt", "v", "--force"])
        .assert_success()
        .json();
    assert_eq!(r["reattached"], true, "{r}");
    let new_key = rt.block_on(unwrap_volume_key(&d.ctl.local_kms(), &vol));
    assert!(old_key != new_key, "the data key did not change");
    assert!(d.read_export("v", &scratch) == data);

    // Header backup, both copies destroyed, restore.
    let backup = dir.join("v.hdr");
    let bk = backup.to_string_lossy().into_owned();
    d.ctl
        .run(&["header", "backup", "v", "--to", &bk])
        .assert_success();
    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl
        .run(&["header", "restore", "v", "--from", &bk])
        .assert_success();
    e2e_tests::patch_file(&vol, 0, &[0u8; 4096]);
    e2e_tests::patch_file(&vol, 0x4000, &[0u8; 4096]);
    d.ctl.run(&["attach", "v"]).assert_code(7);
    // cryptsetup reads our backup file too.
    run(Command::new(cryptsetup()).arg("luksDump").arg(&backup)).assert_success();
    d.ctl
        .run(&["header", "restore", "v", "--from", &bk])
        .assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch) == data);
    // A backup of another volume is refused without --force.
    import(&d, "w", &image, &[]);
    d.ctl.run(&["detach", "v"]).assert_success();
    let bw = dir.join("w.hdr");
    let bws = bw.to_string_lossy().into_owned();
    d.ctl
        .run(&["header", "backup", "w", "--to", &bws])
        .assert_success();
    d.ctl
        .run(&["header", "restore", "v", "--from", &bws])
        .assert_code(2)
        .assert_stderr_contains("another volume");
}

#[test]
fn recovery_passphrase_opens_in_cryptsetup() {
    let dir = TestDir::new("lc-recovery");
    let d = Daemon::start(
        &dir,
        "[recovery]\nargon2_memory_kib = 65536\nargon2_time = 4\nargon2_parallel = 1\n",
    );
    d.ctl.create_key("e2e");
    d.ctl.create_volume("v", "16M", "alias/e2e", 4096, &[]);
    let vol = d.state_dir.join("volumes/v.luks");
    let pass = dir.write_secret("pass", b"correct horse battery staple\n");
    let p = pass.to_string_lossy().into_owned();
    let added = d
        .ctl
        .run(&["--json", "recovery", "add", "v", "--passphrase-file", &p])
        .assert_success()
        .json();
    let slot = added["keyslot"].as_u64().expect("keyslot");
    let key_file = dir.write_secret("key", b"correct horse battery staple");
    cryptsetup_test_passphrase(&key_file, &vol).assert_success();
    assert_eq!(d.ctl.inspect_json(&vol)["keyslots"], 1);
    // The volume still attaches through the KMS.
    d.ctl.run(&["attach", "v"]).assert_success();
    d.ctl.run(&["detach", "v"]).assert_success();
    let s = slot.to_string();
    d.ctl
        .run(&["recovery", "remove", "v", "--keyslot", &s])
        .assert_success();
    let out = cryptsetup_test_passphrase(&key_file, &vol);
    assert_ne!(
        out.code,
        Some(0),
        "the removed passphrase still opens the volume"
    );
    let audit = d
        .ctl
        .run(&["--json", "audit", "--volume", "v"])
        .assert_success()
        .json();
    let ops: Vec<&str> = audit
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["operation"].as_str())
        .collect();
    assert!(
        ops.contains(&"recovery-add") && ops.contains(&"recovery-remove"),
        "{ops:?}"
    );
}

#[test]
fn busy_volume_is_refused_and_operations_cancel_cleanly() {
    let dir = TestDir::new("lc-busy");
    // Each MiB the rebuild writes takes 20 ms more: the rebuild of 3 GiB takes a minute, so
    // the cancels below find it running however fast the machine copies.
    let d = Daemon::start_env(&dir, "", &[("CRYPTNBD_SLOW_AT", "fill-step:20")]);
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");
    let small = dir.join("small.img");
    let data = write_random(&small, MIB, 8);
    import(&d, "v", &small, &[]);
    // A large sparse image: rebuilding from it takes long enough to be caught running.
    let big = dir.join("big.img");
    e2e_tests::sparse_file(&big, 3 << 30);
    let bigs = big.to_string_lossy().into_owned();
    // The volume must be large enough for the image.
    d.ctl.run(&["delete", "v", "--yes"]).assert_success();
    d.ctl.create_volume("v", "3G", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    d.write_export("v", &data, &scratch);
    d.ctl.run(&["detach", "v"]).assert_success();

    for how in ["cancel", "ctrl-c"] {
        let mut child =
            with_default_sigint(&d.ctl.command(&["rebuild", "v", "--from-image", &bigs]))
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn rebuild");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ops = d.ctl.run(&["--json", "operations"]).assert_success().json();
            if ops["operations"][0]["operation"] == "rebuild" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the rebuild never showed up: {ops}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d.ctl
            .run(&["snapshot", "v"])
            .assert_code(4)
            .assert_stderr_contains("busy: rebuild");
        d.ctl.run(&["attach", "v"]).assert_code(4);
        match how {
            "cancel" => {
                d.ctl.run(&["cancel", "v"]).assert_success();
                let out = child.wait_with_output().expect("wait");
                assert_eq!(
                    out.status.code(),
                    Some(130),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            _ => {
                run(Command::new("kill").arg("-INT").arg(child.id().to_string())).assert_success();
                let _ = child.wait();
            }
        }
        // The operation ends, cleans up, and the volume is unchanged.
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.ctl.run(&["--json", "operations"]).json()["operations"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            assert!(Instant::now() < deadline, "the operation did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            leftovers(&d.state_dir).is_empty(),
            "{:?}",
            leftovers(&d.state_dir)
        );
        d.ctl.run(&["attach", "v"]).assert_success();
        let head = d.read_export("v", &scratch);
        assert!(
            head[..data.len()] == data[..],
            "content changed after a cancelled rebuild"
        );
        d.ctl.run(&["detach", "v"]).assert_success();
    }
}

/// `cmd` run through `env --default-signal=INT`, so that SIGINT has its default action (ends
/// the process) as at a terminal: a test started from a shell's background job inherits
/// SIGINT ignored, and `kill -INT` would then do nothing (seen: a fresh-machine run of
/// `.ci/run` from `nohup … &`).
fn with_default_sigint(cmd: &Command) -> Command {
    let mut env = Command::new("env");
    env.arg("--default-signal=INT");
    e2e_tests::wrapped(env, cmd)
}

/// Kill -9 at each durable step of rekey, rebuild and reencrypt (crash points compiled into
/// the test build), then start again: the volume opens and holds exactly the old or the new
/// content, wrapped by the old or the new key.
#[test]
fn kill_9_at_crash_points_leaves_old_or_new() {
    let dir = TestDir::new("lc-crash");
    let scratch = dir.join("scratch.bin");
    let image = dir.join("new.img");
    let new_data = write_random(&image, 4 * MIB, 9);
    let old_data = TestRng::new(10).bytes(4 * MIB as usize);
    let imgs = image.to_string_lossy().into_owned();
    let vol = dir.state_dir().join("volumes/v.luks");
    {
        let d = Daemon::start(&dir, "");
        d.ctl.create_key("e2e");
        d.ctl.create_key("second");
        d.ctl.create_volume("v", "4M", "alias/e2e", 4096, &[]);
    }
    let reset = |d: &Daemon| {
        d.ctl.run(&["attach", "v"]).assert_success();
        d.write_export("v", &old_data, &scratch);
        d.ctl.run(&["detach", "v"]).assert_success();
    };
    let mut cases: Vec<(&str, Vec<&str>)> = Vec::new();
    for p in [
        "token-before-header-write",
        "header-primary-written",
        "token-after-header-write",
    ] {
        cases.push((p, vec!["rekey", "v", "--kms-key", "alias/second"]));
    }
    let rebuild = vec!["rebuild", "v", "--from-image", imgs.as_str()];
    for p in [
        "fill-step:1",
        "fill-step:2",
        "fill-step:3",
        "fill-step:4",
        "token-before-header-write",
        "header-primary-written",
        "token-after-header-write",
        "replace-before-rename",
        "replace-after-rename",
    ] {
        cases.push((p, rebuild.clone()));
    }
    for p in [
        "reencrypt-step:1",
        "reencrypt-step:2",
        "reencrypt-step:3",
        "reencrypt-step:4",
        "token-before-header-write",
        "header-primary-written",
        "token-after-header-write",
        "replace-before-rename",
        "replace-after-rename",
    ] {
        cases.push((p, vec!["reencrypt", "v"]));
    }
    let mut seen_new = 0;
    for (point, args) in &cases {
        {
            let d = Daemon::start(&dir, "");
            reset(&d);
            let before = d.ctl.inspect_json(&vol)["token"]["key_id"].clone();
            // Start from the first key each time.
            if before
                != d.ctl
                    .run(&["--json", "kms", "describe-key", "alias/e2e"])
                    .json()["key_id"]
            {
                d.ctl
                    .run(&["rekey", "v", "--kms-key", "alias/e2e"])
                    .assert_success();
            }
            d.stop();
        }
        let d = Daemon::start_env(&dir, "", &[("CRYPTNBD_CRASH_AT", point)]);
        let out = d.ctl.run_quiet(args);
        assert_ne!(
            out.code,
            Some(0),
            "{point}: {args:?} succeeded: the crash point was not reached"
        );
        assert!(
            d.wait_killed(),
            "{point}: the daemon did not die of SIGKILL"
        );
        let d = Daemon::start(&dir, "");
        d.ctl.run(&["attach", "v"]).assert_success();
        let content = d.read_export("v", &scratch);
        let is_old = content == old_data;
        let is_new = content == new_data;
        if args[0] == "rebuild" {
            assert!(is_old || is_new, "{point}: content is neither old nor new");
            seen_new += usize::from(is_new);
        } else {
            assert!(is_old, "{point}: {} changed the content", args[0]);
        }
        d.ctl.run(&["detach", "v"]).assert_success();
        assert!(
            leftovers(&d.state_dir).is_empty(),
            "{point}: {:?}",
            leftovers(&d.state_dir)
        );
        d.stop();
    }
    assert!(cases.len() >= 20, "{} crash points", cases.len());
    assert!(seen_new >= 1, "no rebuild crash left the new content");

    // Random kills of a longer rebuild (64 MiB), at random moments.
    let big = dir.join("big.img");
    let big_data = write_random(&big, 64 * MIB, 11);
    let bigs = big.to_string_lossy().into_owned();
    {
        let d = Daemon::start(&dir, "");
        d.ctl.run(&["delete", "v", "--yes"]).assert_success();
        d.ctl.create_volume("v", "64M", "alias/e2e", 4096, &[]);
        d.stop();
    }
    let mut rng = TestRng::new(12);
    let old_big = rng.bytes(64 * MIB as usize);
    for round in 0..4 {
        let d = Daemon::start(&dir, "");
        d.ctl.run(&["attach", "v"]).assert_success();
        d.write_export("v", &old_big, &scratch);
        d.ctl.run(&["detach", "v"]).assert_success();
        let mut child = d
            .ctl
            .command(&["rebuild", "v", "--from-image", &bigs])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(50 + rng.next_u64() % 700));
        d.kill();
        let _ = child.wait();
        let d = Daemon::start(&dir, "");
        d.ctl.run(&["attach", "v"]).assert_success();
        let content = d.read_export("v", &scratch);
        assert!(
            content == old_big || content == big_data,
            "round {round}: content is neither old nor new"
        );
        d.ctl.run(&["detach", "v"]).assert_success();
        assert!(leftovers(&d.state_dir).is_empty(), "round {round}");
        d.stop();
    }
}
