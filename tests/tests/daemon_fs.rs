//! A real kernel filesystem on a cryptnbd export (nbdfuse + loop + ext4 + mount), and fio's
//! NBD engine with verification. Needs root (losetup, mount), libnbd-bin (nbdfuse), fio,
//! e2fsprogs.

use std::path::Path;
use std::process::Command;

use e2e_tests::daemon::Daemon;
use e2e_tests::mount::Mounted;
use e2e_tests::{TestDir, require_tool, run};

fn files(mnt: &Path) -> Vec<(String, Vec<u8>)> {
    (0..20)
        .map(|i| {
            let name = format!("file-{i}.bin");
            let mut rng = e2e_tests::TestRng::new(100 + i);
            let _ = mnt;
            (name, rng.bytes(1000 + i as usize * 37_001))
        })
        .collect()
}

#[test]
fn ext4_on_the_export_survives_detach_and_daemon_restart() {
    let dir = TestDir::new("fs");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("home", "256M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "home"]).assert_success();
    let m = Mounted::new(&dir, &d.nbd_socket(), "home", true);
    let expected = files(&m.mnt);
    for (name, data) in &expected {
        std::fs::write(m.mnt.join(name), data).expect("write file");
    }
    run(&mut Command::new("sync")).assert_success();
    m.unmount();
    // Detach and re-attach; then restart the daemon (it re-attaches by itself).
    d.ctl.run(&["detach", "home"]).assert_success();
    d.ctl.run(&["attach", "home"]).assert_success();
    let d = d.restart();
    let m = Mounted::new(&dir, &d.nbd_socket(), "home", false);
    for (name, data) in &expected {
        let got = std::fs::read(m.mnt.join(name)).expect("read file");
        assert!(&got == data, "{name} changed");
    }
    m.fsck_and_unmount();
    d.stop();
}

#[test]
fn fio_random_4k_with_crc32c_verification() {
    let fio = require_tool("fio", "fio");
    let dir = TestDir::new("fio");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "256M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "vol"]).assert_success();
    let uri = d.uri("vol");
    // 4 jobs on disjoint 64 MiB ranges: random 4K writes, each block then read back and
    // checked (crc32c headers). Then the volume is detached and re-attached and a second pass
    // only reads and verifies everything the first one wrote.
    let fio_run = |verify_only: bool| {
        let mut cmd = Command::new(&fio);
        // fio may write `local-e2e-N-verify.state` files into its working directory.
        cmd.current_dir(dir.path());
        cmd.args([
            "--name=e2e",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=4",
            "--size=64M",
            "--offset_increment=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting",
            "--output-format=json",
        ]);
        let json = dir.join(if verify_only {
            "fio-verify.json"
        } else {
            "fio-write.json"
        });
        cmd.arg(format!("--output={}", json.display()));
        if verify_only {
            cmd.arg("--verify_only=1");
        }
        let out = run(&mut cmd);
        assert_eq!(
            out.code,
            Some(0),
            "fio (verify_only={verify_only}) failed:\n{}\n{}",
            out.stdout_text(),
            out.stderr
        );
        let text = std::fs::read_to_string(&json).expect("fio output");
        // fio may print notes before the JSON document.
        let report: serde_json::Value =
            serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).expect("fio json");
        assert_eq!(report["jobs"][0]["error"], 0, "fio reported an error");
        report
    };
    let first = fio_run(false);
    assert!(
        first["jobs"][0]["write"]["total_ios"].as_u64().unwrap_or(0) >= 4 * 16384,
        "{first}"
    );
    d.ctl.run(&["detach", "vol"]).assert_success();
    d.ctl.run(&["attach", "vol"]).assert_success();
    let second = fio_run(true);
    assert!(
        second["jobs"][0]["read"]["total_ios"].as_u64().unwrap_or(0) >= 4 * 16384,
        "{second}"
    );
    d.stop();
}
