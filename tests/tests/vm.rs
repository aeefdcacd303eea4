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
//! Root boots (`root_*`) boot the same kernel the stock way: the initramfs Debian's
//! initramfs-tools built in the rig's cached Debian 12 root (tests/vm/build-root.sh), and
//! systemd 252 on an ext4 image of that root whose test unit reports on a marker disk.
//! - `root_qemu_guest_disk_served_by_the_host_daemon`: the guest's root disk is a volume of
//!   the daemon on the host, which qemu opens over NBD with TLS: the guest needs nothing of
//!   ours. Two boots (write a file, power off; find it again), then the volume's plaintext
//!   is checked with `e2fsck -fn` and the file read back on the host.
//! - `root_boots_on_a_dracut_initramfs_built_in_the_root`: the same root (an image file this
//!   time) through a systemd initrd that dracut built in the Debian root, as the dracut way
//!   of the encrypted root will.
//! - `root_network_root_through_debian_nbd_client_over_tls`: no root disk at all: Debian's
//!   own initramfs-tools nbd script (`nbdroot=`, `root=/dev/nbd0`) connects the guest's
//!   kernel client to the host daemon over TLS (tests/vm/netroot/: a wrapper named by
//!   `NBDCLIENT` adds the certificates), systemd runs on /dev/nbd0 with nbd-client marked
//!   `@` (`-systemd-mark`); two boots, then the plaintext checked on the host.
//! - `root_initramfs_shell_takes_lines_typed_on_the_serial_console`: the console input the
//!   later root tests need (a passphrase prompt, an emergency shell): initramfs-tools stops
//!   at `break=premount`, a line typed at its `(initramfs) ` prompt runs and powers off.
//!
//! Needs root (the host daemon's memory locking, as in the other daemon tests), the release
//! binaries (`cargo build --release -p daemon -p ctl`), apt and dpkg to build the rig, and
//! libnbd-bin + e2fsprogs on the host for scenario b's checks.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::daemon::{Daemon, nbdcopy};
use e2e_tests::pki::Pki;
use e2e_tests::vm::{
    Disk, InitramfsTool, RootBoot, Scenario, Vm, VmRun, debian_root, root_image, root_initramfs,
    run_scenario,
};
use e2e_tests::{TEST_DIRECTORY, TEST_SID, TestDir, require_tool, run};
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
    let pki = Pki::new(&dir, "vm");
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

/// The issue's "qemu guest with its root disk served over NBD by the host's daemon; the guest
/// needs nothing of ours": a Debian 12 root (systemd 252) imported into a volume with
/// `create --from-image`, exported over TLS on TCP, and opened by qemu's own NBD client as
/// the guest's /dev/vda. The first boot writes /root/boot-1 and powers off; the second finds
/// it with the same SHA-256; the volume's plaintext, exported after the detach, is a clean
/// ext4 holding the same file.
#[test]
fn root_qemu_guest_disk_served_by_the_host_daemon() {
    let dir = TestDir::new("vm-root-host-daemon");
    let root = debian_root();
    eprintln!(
        "vm: Debian root {} (tree built in {:.1} s, initramfs in {:.1} s; 0 = from the cache)",
        root.tree.display(),
        root.build_seconds,
        root.initrd_seconds
    );
    let image = root_image(&dir, "root.img", "512M");

    // The daemon on the host: TCP on 127.0.0.1, TLS required, the guest's qemu the only
    // certificate allowed on the export.
    let pki = Pki::new(&dir, "vm-root");
    let qemu_client = pki.client("qemu", "/O=Example/CN=qemu.example.com");
    let (d, port) = root_volume_on_the_host(&dir, &pki, &image, "CN=qemu.example.com,O=Example");
    let disk = Disk::nbd_tcp(port, "root").tls(&qemu_client);

    // First boot: the unit writes /root/boot-1 and powers off. Meanwhile the daemon's status
    // must show qemu's TLS session with its certificate.
    let mut subjects = std::collections::BTreeSet::new();
    let first = Vm::start_root(
        &dir,
        &RootBoot::new("root-host-daemon-1")
            .root("/dev/vda")
            .expect_root_source("/dev/vda")
            .param("step", "write")
            .disk(disk.clone()),
    )
    .wait_observing(|| {
        let out = d.ctl.run_quiet(&["--json", "status", "root"]);
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
    first.assert_pass();
    assert_eq!(
        subjects.into_iter().collect::<Vec<_>>(),
        ["CN=qemu.example.com,O=Example"],
        "the daemon's status did not show qemu's TLS session with its certificate"
    );
    let written = written_sum(&first);
    assert_eq!(
        first.reports("ROOT"),
        ["/dev/vda"],
        "the first boot's root is not the NBD disk"
    );
    let status = d
        .ctl
        .run(&["--json", "status", "root"])
        .assert_success()
        .json();
    let att = &status["attachments"][0];
    assert!(
        att["bytes_written"].as_u64().unwrap_or(0) >= 1 << 20,
        "the guest wrote a 1 MiB file through the daemon, which counted less: {att}"
    );

    // Second boot: the file is there, with the same content.
    let second = Vm::start_root(
        &dir,
        &RootBoot::new("root-host-daemon-2")
            .root("/dev/vda")
            .expect_root_source("/dev/vda")
            .param("step", "check")
            .param("sha256", &written)
            .disk(disk),
    )
    .wait();
    second.assert_pass();
    assert_eq!(
        second.reports("SUM"),
        [format!("{written} /root/boot-1")],
        "the second boot did not find the first boot's file unchanged"
    );
    eprintln!(
        "vm: root boots over NBD+TLS from the host daemon: first {:.1} s, second {:.1} s",
        first.elapsed.as_secs_f64(),
        second.elapsed.as_secs_f64()
    );

    check_root_plaintext(&dir, d, &written);
}

/// A root volume on a daemon of the host, the way the root tests want it: the daemon
/// listens on 127.0.0.1 (TCP) and requires TLS; `image` becomes the volume `root` (`create
/// --from-image`, which must keep its size), attached on TCP, TLS only, for the certificate
/// `allowed` alone (a subject as `certtool -i` prints it). Returns the daemon and its port.
#[track_caller]
fn root_volume_on_the_host(dir: &TestDir, pki: &Pki, image: &Path, allowed: &str) -> (Daemon, u16) {
    let d = Daemon::start(
        dir,
        &format!(
            "[nbd]\ntcp = \"127.0.0.1:0\"\n[nbd.tls]\nmode = \"require\"\ncertificates = \"{}\"\n",
            pki.server.display()
        ),
    );
    d.ctl.create_key("vm");
    let img = image.to_string_lossy();
    let created = d
        .ctl
        .run(&[
            "--json",
            "create",
            "root",
            "--from-image",
            &img,
            "--kms-key",
            "alias/vm",
            "--sid",
            TEST_SID,
            "--directory",
            TEST_DIRECTORY,
        ])
        .assert_success()
        .json();
    let image_len = std::fs::metadata(image).expect("the root image").len();
    assert_eq!(
        created["size"].as_u64(),
        Some(image_len),
        "the volume made from the image does not have its size: {created}"
    );
    let attached = d
        .ctl
        .run(&[
            "--json",
            "attach",
            "root",
            "--tcp",
            "--tls-only",
            "--allow-cert",
            allowed,
        ])
        .assert_success()
        .json();
    let port: u16 = attached["uris"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|u| u.strip_prefix("nbds://127.0.0.1:"))
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("attach --tcp gave no nbds://127.0.0.1 URI: {attached}"));
    (d, port)
}

/// The SHA-256 of /root/boot-1 that a `step=write` boot reported (exactly one SUM line).
#[track_caller]
fn written_sum(boot: &VmRun) -> String {
    let sums = boot.reports("SUM");
    match sums.as_slice() {
        [line] => line
            .strip_suffix(" /root/boot-1")
            .unwrap_or_else(|| panic!("{}: unexpected SUM report {line}", boot.scenario))
            .to_owned(),
        _ => panic!("{}: {} SUM reports: {sums:?}", boot.scenario, sums.len()),
    }
}

/// The host's view after the root boots: detach `root`, export its plaintext, check the
/// filesystem with `e2fsck -fn`, and read /root/boot-1 out of it with debugfs: it must have
/// the SHA-256 `written`. Stops the daemon.
#[track_caller]
fn check_root_plaintext(dir: &TestDir, d: Daemon, written: &str) {
    d.ctl.run(&["detach", "root"]).assert_success();
    let plain = dir.join("root-plain.img");
    let plain_arg = plain.to_string_lossy();
    d.ctl
        .run(&["export", "root", "--to", &plain_arg, "--plaintext"])
        .assert_success();
    let e2fsck = require_tool("e2fsck", "e2fsprogs");
    run(Command::new(e2fsck).arg("-fn").arg(&plain)).assert_success();
    let dumped = dir.join("boot-1");
    let debugfs = require_tool("debugfs", "e2fsprogs");
    run(Command::new(debugfs)
        .arg("-R")
        .arg(format!("dump /root/boot-1 {}", dumped.display()))
        .arg(&plain))
    .assert_success();
    let sha256sum = require_tool("sha256sum", "coreutils");
    let got = run(Command::new(sha256sum).arg(&dumped))
        .assert_success()
        .stdout_text();
    assert_eq!(
        got.split_whitespace().next(),
        Some(written),
        "/root/boot-1 read from the volume's plaintext on the host differs from what the \
         guest wrote"
    );
    d.stop();
}

/// Typing on the serial console (what a passphrase prompt will need): initramfs-tools' shell,
/// asked for with `break=premount`, runs a line typed at its prompt; the line computes what
/// it prints, so the echo of the typed text alone cannot pass, and powers the VM off.
#[test]
fn root_initramfs_shell_takes_lines_typed_on_the_serial_console() {
    let dir = TestDir::new("vm-root-serial");
    let mut vm = Vm::start_root(
        &dir,
        &RootBoot::new("root-serial-input")
            .cmdline("break=premount")
            .serial_input()
            .fail_on(&["Kernel panic"])
            .timeout(Duration::from_secs(120)),
    );
    vm.type_line_after("(initramfs) ", "echo typed-$((6 * 7)); poweroff -f");
    let run = vm.wait();
    assert!(
        run.log.lines().any(|l| l.trim_end() == "typed-42"),
        "the line typed at the (initramfs) prompt did not run; serial log {}:\n{}",
        run.log_path.display(),
        run.log
    );
    assert_eq!(
        run.marker.as_deref(),
        Some(""),
        "the boot stopped in the initramfs, yet the marker disk has a report"
    );
    eprintln!(
        "vm: initramfs shell reached, line typed and run, off in {:.1} s",
        run.elapsed.as_secs_f64()
    );
}

/// dracut in the Debian root (dracut-core beside initramfs-tools) builds a systemd initrd that
/// boots the root: the base of the dracut way of the encrypted root. The image is a plain
/// file here; what is checked is the initrd.
#[test]
fn root_boots_on_a_dracut_initramfs_built_in_the_root() {
    let dir = TestDir::new("vm-root-dracut");
    let image = root_image(&dir, "root.img", "512M");
    let initrd = root_initramfs(
        &dir,
        "initrd.dracut",
        InitramfsTool::Dracut,
        None,
        &["--add-drivers", "virtio_pci virtio_blk ext4 crc32c_generic"],
    );
    let boot = Vm::start_root(
        &dir,
        &RootBoot::new("root-dracut")
            .root("/dev/vda")
            .expect_root_source("/dev/vda")
            .param("step", "write")
            .initrd(&initrd)
            .disk(Disk::raw(&image)),
    )
    .wait();
    boot.assert_pass();
    assert!(
        boot.log.contains("initrd.target"),
        "the boot did not go through a systemd initrd (no initrd.target on the console): {}",
        boot.log_path.display()
    );
    let e2fsck = require_tool("e2fsck", "e2fsprogs");
    run(Command::new(e2fsck).arg("-fn").arg(&image)).assert_success();
    eprintln!(
        "vm: root boot through dracut's initrd: {:.1} s",
        boot.elapsed.as_secs_f64()
    );
}

/// The network root, Debian's way, against our daemon: no disk in the guest but the marker;
/// initramfs-tools' nbd script (nbd-client's own) brings the NIC up by DHCP and connects
/// /dev/nbd0 to the host daemon's TLS export (`nbdroot=10.0.2.2:PORT/root`), through a
/// wrapper, named by `NBDCLIENT`, that adds the client certificate (tests/vm/netroot/); the
/// root mounts from /dev/nbd0 and nbd-client runs marked with '@' for systemd. Two boots
/// (write, then check /root/boot-1), then the volume's plaintext is checked on the host.
#[test]
fn root_network_root_through_debian_nbd_client_over_tls() {
    let dir = TestDir::new("vm-root-netroot");
    let image = root_image(&dir, "root.img", "512M");
    let pki = Pki::new(&dir, "vm-netroot");
    let guest = pki.client("guest", "/O=Example/CN=guest.example.com");
    let (d, port) = root_volume_on_the_host(&dir, &pki, &image, "CN=guest.example.com,O=Example");

    // The initramfs: Debian's, plus the TLS wrapper, its hook and the client certificate.
    let netroot = e2e_tests::workspace_root().join("tests/vm/netroot");
    let files = dir.join("initramfs-files");
    for (from, to, mode) in [
        (
            "hook",
            "etc/initramfs-tools/hooks/cryptnbd-test-nbd-tls",
            0o755,
        ),
        (
            "conf",
            "etc/initramfs-tools/conf.d/cryptnbd-test-nbd-tls",
            0o644,
        ),
        ("nbd-client-tls", "usr/local/sbin/nbd-client-tls", 0o755),
    ] {
        install(&netroot.join(from), &files.join(to), mode);
    }
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        install(&guest.join(f), &files.join("etc/nbd-tls").join(f), 0o600);
    }
    let initrd = root_initramfs(
        &dir,
        "initrd.netroot",
        InitramfsTool::InitramfsTools,
        Some(&files),
        &[],
    );

    let boot = |name: &str, step: &str, sha: Option<&str>| {
        let mut b = RootBoot::new(name)
            .root("/dev/nbd0")
            .expect_root_source("/dev/nbd0")
            .cmdline(&format!("nbdroot=10.0.2.2:{port}/root"))
            .cmdline("ip=dhcp")
            .with_network()
            .initrd(&initrd)
            .param("step", step);
        if let Some(sha) = sha {
            b = b.param("sha256", sha);
        }
        let run = Vm::start_root(&dir, &b).wait();
        run.assert_pass();
        run
    };
    let first = boot("root-netroot-1", "write", None);
    let marked = first.reports("MARKED");
    assert!(
        marked.iter().any(|m| m.contains("nbd-client")),
        "nbd-client (-systemd-mark) was not running marked with '@' on the root: {marked:?}"
    );
    let written = written_sum(&first);
    let second = boot("root-netroot-2", "check", Some(&written));
    assert_eq!(
        second.reports("SUM"),
        [format!("{written} /root/boot-1")],
        "the second boot did not find the first boot's file unchanged"
    );
    eprintln!(
        "vm: network root over nbd-client + TLS: first boot {:.1} s, second {:.1} s",
        first.elapsed.as_secs_f64(),
        second.elapsed.as_secs_f64()
    );

    check_root_plaintext(&dir, d, &written);
}

/// Copies `from` to `to` (creating its directory) with `mode`.
#[track_caller]
fn install(from: &Path, to: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let parent = to.parent().expect("a file in a directory");
    std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", to.display()));
}
