//! `attach --device` on the host that runs the tests. The kernel NBD round trip itself (mkfs,
//! mount, restarts) is proven in the VM (`tests/tests/vm.rs`); here: argument checks, and what
//! the daemon does with the kernel this machine has. Without the `nbd` module (as on the CI
//! machines, see TESTING.md) binding must fail with the `modprobe` advice *before* any KMS
//! call, leaving nothing attached; with it, the device must be bound, shown and let go.

use e2e_tests::TestDir;
use e2e_tests::daemon::Daemon;

const USAGE: i32 = 2;
const CONFLICT: i32 = 4;

#[test]
fn attach_device_checks_arguments_and_the_kernel_before_the_kms() {
    let dir = TestDir::new("kdev-host");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "16M", "alias/e2e", 4096, &[]);

    for (args, needle) in [
        (
            &["attach", "vol", "--device", "/dev/sda"][..],
            "\"/dev/sda\" is not an NBD device",
        ),
        (
            &["attach", "vol", "--device", "nbd0", "--connections", "17"][..],
            "--connections is 1 to 16",
        ),
        (
            &["attach", "vol", "--device", "nbd0", "--connections", "0"][..],
            "--connections is 1 to 16",
        ),
        (&["attach", "vol", "--io-timeout", "5"][..], "--device"),
    ] {
        d.ctl
            .run(args)
            .assert_code(USAGE)
            .assert_stderr_contains(needle);
    }

    let audit_before = d.ctl.run(&["audit", "--json"]).json();
    let attaches = |v: &serde_json::Value| {
        v.as_array()
            .expect("audit records")
            .iter()
            .filter(|r| r["operation"] == "attach")
            .count()
    };
    let nbd_loaded = std::path::Path::new("/sys/module/nbd").exists();
    let out = d.ctl.run(&["attach", "vol", "--device", "auto", "--json"]);
    if nbd_loaded {
        out.assert_success();
        let status = d.ctl.run(&["status", "vol", "--json"]).json();
        let path = status["attachments"][0]["device"]["path"]
            .as_str()
            .expect("status names the device")
            .to_owned();
        assert!(path.starts_with("/dev/nbd"), "{status}");
        assert_eq!(
            status["attachments"][0]["device"]["block_size"], 4096,
            "{status}"
        );
        d.ctl.run(&["detach", "vol"]).assert_success();
        let size = std::fs::read_to_string(format!(
            "/sys/block/{}/size",
            path.trim_start_matches("/dev/")
        ))
        .expect("sysfs size");
        assert_eq!(size.trim(), "0", "{path} still configured after detach");
    } else {
        out.assert_code(CONFLICT)
            .assert_stderr_contains("no NBD driver loaded")
            .assert_stderr_contains("modprobe nbd");
        // Nothing attached, and the key was never unwrapped for it.
        let status = d.ctl.run(&["status", "--json"]).json();
        assert_eq!(status["attachments"], serde_json::json!([]), "{status}");
        let audit_after = d.ctl.run(&["audit", "--json"]).json();
        assert_eq!(
            attaches(&audit_after),
            attaches(&audit_before),
            "an attach (KMS unwrap) was audited: {audit_after}"
        );
        // The volume still attaches without a device.
        d.ctl.run(&["attach", "vol"]).assert_success();
    }
}
