//! cryptnbd under a real kernel NBD client and real dm-crypt, in a VM (tests/src/vm.rs): the
//! stock Debian 12 kernel booted under qemu's emulation, our release binaries in its
//! initramfs, one guest script per scenario in tests/vm/guest/.
//!
//! - `rig`: the VM itself works (nbd.ko, loop, dm-crypt, ext4, our binaries start).
//! - a, `home`: /home on a cryptnbd volume, step by step as a user does it
//!   (`attach --device`), with the daemon in the guest.
//! - b, `host-tcp`: the daemon on the host, the guest's kernel client over TCP; the host
//!   checks what it saw and reads the guest's files back through its own path.
//! - c, `dm-crypt`: the same volume through cryptnbd and through the kernel's dm-crypt
//!   (`cryptnbdctl open`), each reading what the other wrote.
//! - d, `crash`: the daemon killed (-9) under a writer, with and without a restart within
//!   `--dead-conn-timeout`.
//! - e, `hung-store`: the volume file's filesystem frozen under a writer: `detach --force`
//!   still frees the device at once, and the key is wiped when the stuck requests return.
//! - f, `host-tls`: the daemon on the host requiring TLS, the guest's kernel client
//!   (`nbd-client -A/-F/-K`) on an export with a certificate allow-list; ext4 written, read
//!   back and checked; a certificate not on the list refused by policy.
//!
//! Needs root (the host daemon's memory locking, as in the other daemon tests), the release
//! binaries (`cargo build --release -p daemon -p ctl`), apt and dpkg to build the rig, and
//! libnbd-bin + e2fsprogs on the host for scenario b's checks.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::daemon::{Daemon, nbdcopy};
use e2e_tests::vm::{Scenario, Vm, run_scenario};
use e2e_tests::{TestDir, require_tool, run};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// What the guest scenarios write: 32 MiB of files.
const WRITTEN: u64 = 32 * MIB;

#[test]
fn rig_boots_with_nbd_dm_crypt_and_our_binaries() {
    let dir = TestDir::new("vm-rig");
    run_scenario(
        &dir,
        &Scenario::new("rig").timeout(Duration::from_secs(180)),
    );
}

#[test]
fn a_home_on_a_kernel_nbd_device_step_by_step() {
    let dir = TestDir::new("vm-home");
    run_scenario(
        &dir,
        &Scenario::new("home").timeout(Duration::from_secs(300)),
    );
}

/// The host's view of one NBD connection while the guest ran.
#[derive(Debug, Default)]
struct SeenConnection {
    peer: String,
    bytes_written: u64,
    bytes_read: u64,
}

#[test]
fn b_guest_kernel_client_over_tcp_to_the_daemon_on_the_host() {
    let dir = TestDir::new("vm-host-tcp");
    let d = Daemon::start(&dir, "[nbd]\ntcp = \"127.0.0.1:0\"\n");
    d.ctl.create_key("vm");
    let created = d.ctl.create_volume("home", "256M", "alias/vm", 4096, &[]);
    let size = created["size"]
        .as_u64()
        .expect("create --json has the size");
    let sector_size = created["sector_size"]
        .as_u64()
        .expect("create --json has the sector size");
    let attached = d
        .ctl
        .run(&["--json", "attach", "home", "--tcp"])
        .assert_success()
        .json();
    let tcp_uri = attached["uris"]
        .as_array()
        .and_then(|uris| {
            uris.iter()
                .filter_map(Value::as_str)
                .find(|u| u.starts_with("nbd://127.0.0.1:"))
        })
        .unwrap_or_else(|| panic!("attach --tcp gave no nbd://127.0.0.1 URI: {attached}"))
        .to_owned();
    let port: u16 = tcp_uri["nbd://127.0.0.1:".len()..]
        .split('/')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {tcp_uri}"));

    let scenario = Scenario::new("host-tcp")
        .with_network()
        .param("port", port)
        .param("export", "home")
        .param("blocksize", sector_size)
        .param("size", size)
        .timeout(Duration::from_secs(300));
    // While the guest works, watch the daemon's status: the guest's connections must show.
    let mut seen: BTreeMap<u64, SeenConnection> = BTreeMap::new();
    let vm = Vm::start(&dir, &scenario);
    let finished = vm.wait_observing(|| {
        let out = d.ctl.run_quiet(&["--json", "status", "home"]);
        if out.code != Some(0) {
            return;
        }
        let status = out.json();
        for c in status["attachments"][0]["connections"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(id) = c["id"].as_u64() else { continue };
            let entry = seen.entry(id).or_default();
            entry.peer = c["peer"].as_str().unwrap_or_default().to_owned();
            entry.bytes_written = entry
                .bytes_written
                .max(c["bytes_written"].as_u64().unwrap_or(0));
            entry.bytes_read = entry.bytes_read.max(c["bytes_read"].as_u64().unwrap_or(0));
        }
    });
    finished.assert_pass();

    // The daemon saw the guest: two connections (write, then verify), both over TCP from
    // qemu's user networking (the host's loopback), and the bytes the guest moved.
    assert!(
        seen.len() >= 2,
        "the daemon's status showed {} connection(s) while the guest connected twice: {seen:?}",
        seen.len()
    );
    for (id, c) in &seen {
        assert!(
            c.peer.starts_with("tcp 127.0.0.1:"),
            "connection {id} is not the guest's TCP connection: {c:?}"
        );
    }
    // Polled every 200 ms or so: the last writes of a connection may fall between two
    // looks, so three quarters of what the guest wrote must have been seen on one of them.
    let most_written = seen.values().map(|c| c.bytes_written).max().unwrap_or(0);
    assert!(
        most_written >= WRITTEN * 3 / 4,
        "no connection was seen writing the guest's {WRITTEN} bytes: {seen:?}"
    );
    let status = d
        .ctl
        .run(&["--json", "status", "home"])
        .assert_success()
        .json();
    let att = &status["attachments"][0];
    let written = att["bytes_written"].as_u64().unwrap_or(0);
    let read = att["bytes_read"].as_u64().unwrap_or(0);
    assert!(
        written >= WRITTEN && read >= WRITTEN,
        "the attachment counted {written} bytes written and {read} read; the guest wrote and \
         read back at least {WRITTEN}: {att}"
    );
    assert_eq!(
        att["connections"].as_array().map_or(usize::MAX, Vec::len),
        0,
        "the guest disconnected (nbd-client -d), yet connections remain: {att}"
    );

    // Read the guest's files back on the host through another path: the unix socket,
    // nbdcopy into a plaintext image, the host's e2fsprogs.
    let sums = finished.reports("SUM");
    assert_eq!(
        sums.len(),
        13,
        "the guest reported {} file checksums, it writes 13 (write_set in tests/vm/guest/lib.sh): {sums:?}",
        sums.len()
    );
    let image = dir.join("plain.img");
    run(Command::new(nbdcopy()).arg(d.uri("home")).arg(&image)).assert_success();
    let e2fsck = require_tool("e2fsck", "e2fsprogs");
    run(Command::new(e2fsck).arg("-fn").arg(&image)).assert_success();
    check_files_on_image(&dir, &image, &sums);
    d.stop();
}

/// Dumps each `SHA256 NAME` file from the ext4 image with debugfs and compares checksums.
#[track_caller]
fn check_files_on_image(dir: &TestDir, image: &Path, sums: &[String]) {
    let debugfs = require_tool("debugfs", "e2fsprogs");
    let sha256sum = require_tool("sha256sum", "coreutils");
    let out_dir = dir.join("dumped");
    std::fs::create_dir_all(&out_dir).expect("mkdir dumped");
    for line in sums {
        let (want, name) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad SUM report {line:?}"));
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "unexpected file name in {line:?}"
        );
        let dumped = out_dir.join(name);
        run(Command::new(&debugfs)
            .arg("-R")
            .arg(format!("dump /{name} {}", dumped.display()))
            .arg(image))
        .assert_success();
        assert!(
            dumped.exists(),
            "debugfs found no /{name} in the filesystem the guest wrote"
        );
        let got = run(Command::new(&sha256sum).arg(&dumped))
            .assert_success()
            .stdout_text();
        let got = got.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            got, want,
            "/{name} read on the host differs from what the guest wrote"
        );
    }
}

#[test]
fn c_dm_crypt_and_cryptnbd_read_each_others_writes() {
    let dir = TestDir::new("vm-dm-crypt");
    run_scenario(
        &dir,
        &Scenario::new("dm-crypt").timeout(Duration::from_secs(420)),
    );
}

#[test]
fn d_daemon_killed_under_a_writer_with_and_without_restart() {
    let dir = TestDir::new("vm-crash");
    run_scenario(
        &dir,
        &Scenario::new("crash").timeout(Duration::from_secs(420)),
    );
}

#[test]
fn e_detach_force_frees_the_device_while_the_backing_store_hangs() {
    let dir = TestDir::new("vm-hung-store");
    run_scenario(
        &dir,
        &Scenario::new("hung-store").timeout(Duration::from_secs(240)),
    );
}

#[test]
fn f_guest_kernel_client_over_tls_with_a_certificate_allow_list() {
    let dir = TestDir::new("vm-host-tls");
    let pki = e2e_tests::pki::Pki::new(&dir, "vm");
    let guest = pki.client("guest", "/O=Example/CN=guest.example.com");
    let other = pki.client("other", "/O=Example/CN=other.example.com");
    let d = Daemon::start(
        &dir,
        &format!(
            "[nbd]\ntcp = \"127.0.0.1:0\"\n[nbd.tls]\nmode = \"require\"\ncertificates = \"{}\"\n",
            pki.server.display()
        ),
    );
    d.ctl.create_key("vm");
    let created = d.ctl.create_volume("home", "256M", "alias/vm", 4096, &[]);
    let attached = d
        .ctl
        .run(&[
            "--json",
            "attach",
            "home",
            "--tcp",
            "--allow-cert",
            "CN=guest.example.com,O=Example",
        ])
        .assert_success()
        .json();
    let uri = attached["uris"][1].as_str().expect("a TCP URI").to_owned();
    let port: u16 = uri
        .strip_prefix("nbds://127.0.0.1:")
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no nbds://127.0.0.1 URI: {attached}"));
    let scenario = Scenario::new("host-tls")
        .with_network()
        .param("port", port)
        .param("export", "home")
        .param(
            "blocksize",
            created["sector_size"].as_u64().expect("sector size"),
        )
        .param("size", created["size"].as_u64().expect("size"))
        .file("ca-cert.pem", &guest.join("ca-cert.pem"))
        .file("guest-cert.pem", &guest.join("client-cert.pem"))
        .file("guest-key.pem", &guest.join("client-key.pem"))
        .file("other-cert.pem", &other.join("client-cert.pem"))
        .file("other-key.pem", &other.join("client-key.pem"))
        .timeout(Duration::from_secs(300));
    let mut subjects = std::collections::BTreeSet::new();
    let finished = Vm::start(&dir, &scenario).wait_observing(|| {
        let out = d.ctl.run_quiet(&["--json", "status", "home"]);
        if out.code == Some(0) {
            for c in out.json()["attachments"][0]["connections"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(dn) = c["certificate"].as_str() {
                    subjects.insert(dn.to_owned());
                }
            }
        }
    });
    finished.assert_pass();
    assert_eq!(
        subjects.into_iter().collect::<Vec<_>>(),
        ["CN=guest.example.com,O=Example"],
        "the daemon's status did not show the guest's TLS sessions with its certificate"
    );
    let refusal = finished.reports("REFUSAL").join(" ");
    assert!(
        refusal.to_lowercase().contains("policy"),
        "nbd-client did not report a refusal by policy: {refusal}"
    );
    let status = d
        .ctl
        .run(&["--json", "status", "home"])
        .assert_success()
        .json();
    let written = status["attachments"][0]["bytes_written"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        written >= WRITTEN,
        "the guest wrote {written} bytes over TLS, expected {WRITTEN}"
    );
    let audit =
        std::fs::read_to_string(d.state_dir.join("audit").join("audit.jsonl")).expect("audit");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"nbd-open\"") && l.contains("CN=other.example.com")),
        "the refusal of the other certificate is not in the audit trail"
    );
    d.stop();
}
