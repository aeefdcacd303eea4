//! The real daemon, driven by `cryptnbdctl`, serving real NBD clients: nbdinfo, nbdcopy,
//! qemu-img, qemu-io, nbdsh. Data written through NBD is checked on disk with the independent
//! AES-XTS oracle; attachments survive a daemon restart; detach, KMS refusals and access
//! control behave.

use std::path::Path;
use std::process::Command;

use e2e_tests::daemon::{Daemon, hold_connection, nbdcopy, nbdinfo, wait_connections};
use e2e_tests::{Oracle, Segment, TestDir, TestRng, require_tool, run, unwrap_volume_key};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn setup(label: &str) -> (TestDir, Daemon) {
    let dir = TestDir::new(label);
    let daemon = Daemon::start(&dir, "");
    daemon.ctl.create_key("e2e");
    (dir, daemon)
}

#[track_caller]
fn create_and_attach(d: &Daemon, name: &str, size: &str, extra_attach: &[&str]) -> Value {
    d.ctl.create_volume(name, size, "alias/e2e", 4096, &[]);
    let mut args = vec!["--json", "attach", name];
    args.extend_from_slice(extra_attach);
    d.ctl.run(&args).assert_success().json()
}

fn write_random(path: &Path, len: u64, seed: u64) {
    let mut rng = TestRng::new(seed);
    let mut f = std::fs::File::create(path).expect("create");
    let mut done = 0;
    while done < len {
        std::io::Write::write_all(&mut f, &rng.bytes(MIB as usize)).expect("write");
        done += MIB;
    }
}

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

#[test]
fn nbdinfo_sees_size_flags_block_sizes_and_allocation() {
    let (_dir, d) = setup("nbdinfo");
    let attached = create_and_attach(&d, "vol", "64M", &[]);
    let uri = attached["uris"][0].as_str().expect("uri").to_string();
    assert_eq!(uri, d.uri("vol"));
    let info = run(Command::new(nbdinfo()).arg("--json").arg(&uri))
        .assert_success()
        .json();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 64 * MIB);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    let contexts: Vec<&str> = export["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{contexts:?}");
    let list = run(Command::new(nbdinfo())
        .arg("--list")
        .arg("--json")
        .arg(format!("nbd+unix://?socket={}", d.nbd_socket().display())))
    .assert_success()
    .json();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, ["vol"]);
    // A fresh volume is one hole, which this export reads as zeros: HOLE|ZERO (3), all of it.
    let map = run(Command::new(nbdinfo()).arg("--map").arg("--json").arg(&uri))
        .assert_success()
        .json();
    let extents = map.as_array().expect("map");
    assert!(!extents.is_empty());
    assert!(extents.iter().all(|e| e["type"] == 3), "{map}");
    d.stop();
}

#[test]
fn nbdcopy_round_trips_256_mib_with_1_and_4_connections() {
    let (dir, d) = setup("nbdcopy");
    let uri = create_and_attach(&d, "vol", "256M", &[])["uris"][0]
        .as_str()
        .expect("uri")
        .to_string();
    let src = dir.join("src.img");
    write_random(&src, 256 * MIB, 7);
    for (write_conns, read_conns) in [("1", "4"), ("4", "1")] {
        run(Command::new(nbdcopy())
            .arg(format!("--connections={write_conns}"))
            .arg(&src)
            .arg(&uri))
        .assert_success();
        let back = dir.join("back.img");
        run(Command::new(nbdcopy())
            .arg(format!("--connections={read_conns}"))
            .arg(&uri)
            .arg(&back))
        .assert_success();
        assert!(
            same_files(&src, &back),
            "read back differs (write {write_conns} conns, read {read_conns})"
        );
        std::fs::remove_file(&back).expect("rm");
    }
    let status = d
        .ctl
        .run(&["--json", "status", "vol"])
        .assert_success()
        .json();
    let a = &status["attachments"][0];
    assert!(
        a["bytes_written"].as_u64().expect("written") >= 512 * MIB,
        "{status}"
    );
    assert!(
        a["bytes_read"].as_u64().expect("read") >= 512 * MIB,
        "{status}"
    );
    d.stop();
}

#[test]
fn qemu_clients_data_on_disk_and_restart() {
    let (dir, d) = setup("qemu");
    qemu_clients_check(&dir, d, false);
}

/// The same with `[store.file] io = "direct"`: the daemon holds the volume file with
/// `O_DIRECT` (seen in /proc/PID/fdinfo), and unaligned requests (through the volume's
/// read-modify-write and the engine's aligned buffers) land as exactly as aligned ones.
#[test]
fn direct_io_serves_qemu_clients_and_the_disk_holds_exactly_what_they_wrote() {
    let dir = TestDir::new("qemu-direct");
    let d = Daemon::start(&dir, "[store.file]\nio = \"direct\"\n");
    d.ctl.create_key("e2e");
    qemu_clients_check(&dir, d, true);
}

/// Whether process `pid` has `path` open with `O_DIRECT` on some descriptor.
fn open_direct(pid: u32, path: &Path) -> bool {
    const O_DIRECT: u32 = 0o40000;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the daemon's descriptors");
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| target == path)
            && std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().display()))
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                })
                .is_some_and(|flags| flags & O_DIRECT != 0)
    })
}

/// qemu-img and qemu-io against a 64 MiB volume of `d`, a restart, and the bytes on disk
/// checked with the oracle; with `direct`, the volume file must be open with `O_DIRECT`.
fn qemu_clients_check(dir: &TestDir, d: Daemon, direct: bool) {
    let uri = create_and_attach(&d, "vol", "64M", &[])["uris"][0]
        .as_str()
        .expect("uri")
        .to_string();
    let vol_path = d.state_dir.join("volumes/vol.luks");
    assert_eq!(
        open_direct(d.pid(), &vol_path),
        direct,
        "O_DIRECT on {} (the filesystem of the test directory must have it: not tmpfs)",
        vol_path.display()
    );
    let qemu_img = require_tool("qemu-img", "qemu-utils");
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    // qemu-img convert into the export, compare back.
    let src = dir.join("src.img");
    write_random(&src, 64 * MIB, 11);
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri))
    .assert_success();
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri))
    .assert_success();
    // Unaligned patterns: qemu-io verifies what it reads back.
    let writes = [
        (1000u64, 5000u64, 0xabu8),
        (3 * 4096 - 1, 2, 0xcd),
        (8 * MIB + 3, 70_001, 0xef),
    ];
    for (off, len, pat) in writes {
        run(Command::new(&qemu_io).args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -P {pat:#x} {off} {len}"),
        ]))
        .assert_success();
    }
    let verify = |uri: &str| {
        for (off, len, pat) in writes {
            let out = run(Command::new(&qemu_io).args([
                "-f",
                "raw",
                uri,
                "-c",
                &format!("read -P {pat:#x} {off} {len}"),
            ]));
            out.assert_success();
            assert!(
                !out.stdout_text().contains("Pattern verification failed"),
                "{}",
                out.stdout_text()
            );
        }
    };
    verify(&uri);
    // A wrong pattern is noticed, so the check above can fail.
    let out = run(Command::new(&qemu_io).args(["-f", "raw", &uri, "-c", "read -P 0x11 1000 5000"]));
    assert!(
        out.stdout_text().contains("Pattern verification failed"),
        "{}",
        out.stdout_text()
    );

    // The daemon restarts and re-attaches the volume; the data is still there.
    let d = d.restart();
    let status = d.ctl.run(&["--json", "status"]).assert_success().json();
    assert_eq!(status["attachments"][0]["volume"], "vol", "{status}");
    verify(&uri);

    assert_eq!(open_direct(d.pid(), &vol_path), direct, "after the restart");
    // On disk: no plaintext pattern, and the oracle decrypts exactly what qemu wrote.
    d.ctl.run(&["detach", "vol"]).assert_success();
    let raw = std::fs::read(&vol_path).expect("read volume");
    assert!(
        !raw.windows(64).any(|w| w.iter().all(|&b| b == 0xab)),
        "plaintext pattern found on disk"
    );
    let kms = d.ctl.local_kms();
    let key = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt")
        .block_on(unwrap_volume_key(&kms, &vol_path));
    let key_file = dir.write_secret("vol.key", &key);
    let seg = Segment {
        data_offset: 16 * MIB,
        sector_size: 4096,
        iv_tweak: 0,
    };
    let ranges: Vec<(u64, u64)> = writes.iter().map(|&(o, l, _)| (o, l)).collect();
    let plain = Oracle::new().decrypt(&key_file, &vol_path, &seg, &ranges);
    for ((off, len, pat), got) in writes.iter().zip(&plain) {
        assert!(
            got.iter().all(|b| b == pat),
            "oracle: range {off}+{len} is not {pat:#x}"
        );
    }
    // The rest of what qemu-img wrote decrypts to the source image.
    let src_bytes = std::fs::read(&src).expect("src");
    let got = Oracle::new().decrypt(&key_file, &vol_path, &seg, &[(32 * MIB, MIB)]);
    assert!(
        got[0] == src_bytes[32 * MIB as usize..33 * MIB as usize],
        "oracle: qemu-img data differs"
    );
    d.stop();
}

#[test]
fn detach_refuses_connected_clients_unless_forced() {
    let (_dir, d) = setup("detach");
    let uri = create_and_attach(&d, "vol", "16M", &[])["uris"][0]
        .as_str()
        .expect("uri")
        .to_string();
    let mut holder = hold_connection(&uri);
    wait_connections(&d, "vol", 1);
    let out = d.ctl.run(&["detach", "vol"]);
    out.assert_code(4);
    out.assert_stderr_contains(&format!("pid {}", holder.id()));
    out.assert_stderr_contains("--force");
    // Still attached and serving.
    run(Command::new(nbdinfo()).arg(&uri)).assert_success();
    let detached = d
        .ctl
        .run(&["--json", "detach", "vol", "--force"])
        .assert_success()
        .json();
    assert_eq!(
        detached["disconnected"].as_array().map_or(0, Vec::len),
        1,
        "{detached}"
    );
    // The export is gone for new clients; the holder was disconnected.
    assert_ne!(run(Command::new(nbdinfo()).arg(&uri)).code, Some(0));
    let _ = holder.kill();
    let _ = holder.wait();
    // Re-attach works: the volume was closed cleanly.
    d.ctl.run(&["attach", "vol"]).assert_success();
    run(Command::new(nbdinfo()).arg(&uri)).assert_success();
    d.stop();
}

#[test]
fn kms_refusal_and_identity_mismatch_leave_other_volumes_serving() {
    let (_dir, d) = setup("refusals");
    let good = create_and_attach(&d, "good", "16M", &[])["uris"][0]
        .as_str()
        .expect("uri")
        .to_string();
    let other_key = d.ctl.create_key("other");
    d.ctl.create_volume("bad", "16M", "alias/other", 4096, &[]);
    d.ctl
        .run(&["kms", "disable-key", &other_key])
        .assert_success();
    let out = d.ctl.run(&["attach", "bad"]);
    out.assert_code(5);
    out.assert_stderr_contains("disabled");
    let out = d
        .ctl
        .run(&["attach", "good", "--sid", "S-1-5-21-1-2-3-500"]);
    // "good" is attached already: a conflict is reported before anything else.
    out.assert_code(4);
    d.ctl
        .run(&["kms", "enable-key", &other_key])
        .assert_success();
    let out = d.ctl.run(&["attach", "bad", "--sid", "S-1-5-21-1-2-3-500"]);
    out.assert_code(5);
    out.assert_stderr_contains(e2e_tests::TEST_SID);
    run(Command::new(nbdinfo()).arg(&good)).assert_success();
    d.ctl
        .run(&["attach", "bad", "--sid", e2e_tests::TEST_SID])
        .assert_success();
    // The audit trail names both refusals and the successes, with the context.
    let audit = d
        .ctl
        .run(&["--json", "audit", "--volume", "bad"])
        .assert_success()
        .json();
    let records = audit.as_array().expect("records");
    let outcomes: Vec<&str> = records
        .iter()
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    assert!(outcomes.iter().any(|o| o.contains("disabled")), "{audit}");
    assert!(
        records
            .iter()
            .any(|r| r["operation"] == "attach" && r["outcome"] == "ok"),
        "{audit}"
    );
    assert!(
        records.iter().all(|r| r["operation"] != "attach"
            || r["context"][e2e_tests::SID_DIRECTORY_KEY]
                .as_str()
                .is_some_and(|v| v.contains(e2e_tests::TEST_SID))),
        "{audit}"
    );
    d.stop();
}

#[test]
fn delete_refuses_attached_volumes_and_wipes_detached_ones() {
    let (_dir, d) = setup("delete");
    create_and_attach(&d, "vol", "16M", &[]);
    d.ctl.run(&["delete", "vol", "--yes"]).assert_code(4);
    d.ctl.run(&["delete", "vol"]).assert_code(2);
    d.ctl.run(&["detach", "vol"]).assert_success();
    d.ctl.run(&["delete", "vol", "--yes"]).assert_success();
    assert!(!d.state_dir.join("volumes/vol.luks").exists());
    let list = d.ctl.run(&["--json", "list"]).assert_success().json();
    assert_eq!(list.as_array().map_or(1, Vec::len), 0, "{list}");
    d.stop();
}
