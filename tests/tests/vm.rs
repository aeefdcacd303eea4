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
//! - g, `power-cut-write` then `power-cut-check`: the daemon and its state on a virtio disk
//!   of the guest (`cache=none`); qemu SIGKILLed under a writer of numbered records, every
//!   record acknowledged after FUA or a FLUSH read back on the next boot.
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
//!   kernel client to the host daemon over TLS (boot/initramfs-tools/network-root/: a
//!   wrapper named by `NBDCLIENT` adds the certificates), systemd runs on /dev/nbd0 with nbd-client marked
//!   `@` (`-systemd-mark`); two boots, then the plaintext checked on the host.
//! - `root_initramfs_shell_takes_lines_typed_on_the_serial_console`: the console input the
//!   later root tests need (a passphrase prompt, an emergency shell): initramfs-tools stops
//!   at `break=premount`, a line typed at its `(initramfs) ` prompt runs and powers off.
//!
//! The encrypted root itself (issue 16), with cryptnbd's initramfs integration (`boot/`) and
//! our release binaries installed in the Debian root before its initramfs is built
//! (tests/src/cryptroot.rs), the root volume the guest's raw /dev/vda:
//! - `root_dm_crypt_initramfs_tools_aws_kms`, `root_dm_crypt_dracut_aws_kms`: the dm-crypt
//!   way with AWS KMS (moto on the host, reached at 10.0.2.2 with `ip=dhcp`), the image
//!   built by `update-initramfs` or by `dracut -a cryptnbd`; systemd runs on
//!   /dev/mapper/cryptnbd-root; two boots, the root daemon's `open-dm-crypt` audited, then
//!   the plaintext checked on the host.
//! - `root_fails_with_the_key_disabled`, `root_fails_with_the_context_changed`,
//!   `root_fails_with_the_kms_unreachable`: initramfs-tools stops in its emergency shell with
//!   one sentence naming the volume, the device, the key and the reason; no daemon is left,
//!   the volume's bytes are unchanged.
//! - `root_nbd_way_local_kms_sealed_keystore`: `cryptnbd.mode=nbd`, the local keystore sealed,
//!   its passphrase typed at the prompt on the serial console; the root daemon (`@cryptnbd`)
//!   serves /dev/nbd0 under systemd; two boots, then the plaintext checked on the host.
//!   `root_nbd_way_fails_after_three_wrong_passphrases`: the boot stops after the third.
//!
//! Needs root (the host daemon's memory locking, as in the other daemon tests), the release
//! binaries (`cargo build --release -p daemon -p ctl`), apt and dpkg to build the rig, and
//! libnbd-bin + e2fsprogs on the host for scenario b's checks.

use std::collections::BTreeMap;
use std::fs::File;
use std::hash::{BuildHasher as _, RandomState};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::cryptroot::{
    Content, DM_DEVICE, HostKms, ROOT_TRAIL, ROOT_VOLUME, RootFiles, RootVolume, create_root,
    guest_aws_config, install, system_daemon_overlay,
};
use e2e_tests::daemon::{Daemon, nbdcopy};
use e2e_tests::moto::bare;
use e2e_tests::pki::Pki;
use e2e_tests::vm::{
    Disk, DiskCache, InitramfsTool, RootBoot, Scenario, Verdict, Vm, VmRun, debian_root, markers,
    root_image, root_image_with, root_initramfs, run_scenario, verdict,
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

/// Scenario g's ACK lines the host waits for on the first boot's console before the power
/// cut (each acknowledges 4 or 8 records).
const POWER_CUT_MIN_ACKS: usize = 20;
/// The most the host waits after that (ms), chosen at random per cycle, so that the cut
/// falls anywhere in a round.
const POWER_CUT_MAX_EXTRA_DELAY_MS: u64 = 5000;
/// The disk image under the daemon's state in the guest (ext4; the volume is 64 MiB).
const POWER_CUT_DISK: u64 = 256 * MIB;

/// g, power cut: writes acknowledged after FUA or FLUSH survive a power cut, not only a
/// killed daemon (which leaves the guest's page cache behind, so a kill test passes whether
/// or not FUA and FLUSH are honoured). The daemon and its whole state (keystore, volume
/// file) run inside the guest, on ext4 on a virtio disk that qemu opens with `cache=none`.
/// Boot 1 (`scenario-power-cut-write.sh`) writes numbered 4 KiB records to /dev/nbd0 in
/// rounds that end with FUA writes or with a FLUSH, printing `ACK N` after each; the host
/// SIGKILLs qemu once it has seen enough ACKs and a random extra delay has passed. Boot 2
/// (`scenario-power-cut-check.sh`) on the same disk image starts the daemon on what is left,
/// attaches the volume and reads every record up to the highest ACK back.
///
/// `CRYPTNBD_POWER_CUT_CYCLES=N` runs N cycles (a fresh disk each) instead of three (CI's
/// few; docs/reliability.md has the campaign of 50); each cycle's figures go to stderr.
#[test]
fn g_power_cut_keeps_every_write_acknowledged_after_fua_or_flush() {
    let cycles =
        match std::env::var("CRYPTNBD_POWER_CUT_CYCLES") {
            Ok(v) => v.parse::<u32>().ok().filter(|&n| n > 0).unwrap_or_else(|| {
                panic!("CRYPTNBD_POWER_CUT_CYCLES={v:?} is not a positive count")
            }),
            Err(_) => 3,
        };
    // Busybox's dd has no oflag=dsync: the guest gets the host's (it needs only libc, which
    // the rig's initramfs has from the same host).
    let dd = require_tool("dd", "coreutils");
    let mut all = Vec::new();
    for cycle in 1..=cycles {
        let f = power_cut_cycle(cycle, cycles, &dd);
        eprintln!("power cut {cycle}/{cycles}: {f}");
        all.push(f);
    }
    if cycles > 1 {
        let range = |get: fn(&PowerCutFigures) -> f64| {
            let lo = all.iter().map(get).fold(f64::INFINITY, f64::min);
            let hi = all.iter().map(get).fold(f64::NEG_INFINITY, f64::max);
            format!("{lo:.0}-{hi:.0}")
        };
        eprintln!(
            "power cut: {cycles} cycles, none lost an acknowledged record; ACK lines {}, \
             records checked {}, records beyond the last ACK {}, cycle {} s",
            range(|f| f.acks as f64),
            range(|f| f.checked as f64),
            range(|f| f.beyond as f64),
            range(|f| f.cycle.as_secs_f64()),
        );
    }
}

/// One `ACK N KIND UPTIME NBD0_FLUSHES VDA_FLUSHES` line of the write boot.
#[derive(Debug, Clone)]
struct Ack {
    /// Records 0..=this are durable.
    record: u64,
    /// How the round ended: `fua`, `flush` or `direct+flush`.
    kind: String,
    /// The guest's uptime, as printed.
    uptime: String,
    /// The flush requests /dev/nbd0 and /dev/vda had completed.
    nbd0_flushes: u64,
    vda_flushes: u64,
}

impl Ack {
    fn parse(line: &str) -> Option<Self> {
        let mut w = line.split(' ');
        let ack = Self {
            record: w.next()?.parse().ok()?,
            kind: w.next()?.to_owned(),
            uptime: w.next()?.to_owned(),
            nbd0_flushes: w.next()?.parse().ok()?,
            vda_flushes: w.next()?.parse().ok()?,
        };
        w.next().is_none().then_some(ack)
    }
}

/// One power cut's figures, for the report on stderr.
#[derive(Debug)]
struct PowerCutFigures {
    /// ACK lines on boot 1's console at the cut.
    acks: usize,
    /// ACK lines per kind of round (fua, flush, direct+flush).
    kinds: BTreeMap<String, usize>,
    /// Boot 1's guest uptime at its first and last ACK.
    first_ack: String,
    last_ack: String,
    /// FLUSH requests /dev/nbd0 (to the daemon) and /dev/vda (the daemon's fdatasync, to
    /// qemu) completed from the first ACK to the last.
    nbd0_flushes: u64,
    vda_flushes: u64,
    /// The random wait between the host seeing enough ACKs and the cut.
    extra_delay: Duration,
    /// Records boot 2 compared (0..=the highest ACK), and those after it that survived.
    checked: u64,
    beyond: u64,
    /// How boot 2 got the volume on /dev/nbd0: `restored` by the daemon, or `by-hand`.
    attach: String,
    boot1_init: String,
    boot2_init: String,
    boot1: Duration,
    boot2: Duration,
    cycle: Duration,
}

impl std::fmt::Display for PowerCutFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "boot 1 (init at {} s) {:.1} s: {} ACK lines {:?} from uptime {} s to {} s with {} \
             FLUSHes to the daemon and {} to the disk between them, cut {} ms after the \
             {POWER_CUT_MIN_ACKS}th was seen; boot 2 (init at {} s) {:.1} s: volume \
             attached ({}), {} acknowledged records checked, none lost, {} more past the last \
             ACK; cycle {:.1} s",
            self.boot1_init,
            self.boot1.as_secs_f64(),
            self.acks,
            self.kinds,
            self.first_ack,
            self.last_ack,
            self.nbd0_flushes,
            self.vda_flushes,
            self.extra_delay.as_millis(),
            self.boot2_init,
            self.boot2.as_secs_f64(),
            self.attach,
            self.checked,
            self.beyond,
            self.cycle.as_secs_f64(),
        )
    }
}

/// One cycle of scenario g on a fresh disk image: the write boot, the power cut, the check
/// boot. Fails the test when anything acknowledged is lost.
fn power_cut_cycle(cycle: u32, cycles: u32, dd: &Path) -> PowerCutFigures {
    let started = Instant::now();
    let dir = TestDir::new("vm-power-cut");
    let image = dir.join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(POWER_CUT_DISK))
        .unwrap_or_else(|e| panic!("cannot make the disk image {}: {e}", image.display()));
    let disk = Disk::raw(&image).cache(DiskCache::None);
    let cycle_name = format!("power cut {cycle}/{cycles}");

    let write = Scenario::new("power-cut-write")
        .disk(disk.clone())
        .file("dd", dd)
        .timeout(Duration::from_secs(240));
    let mut vm = Vm::start(&dir, &write);
    vm.wait_for_log(&format!("{POWER_CUT_MIN_ACKS} ACK lines"), |log| {
        markers(log).filter(|m| m.starts_with("ACK ")).count() >= POWER_CUT_MIN_ACKS
    });
    let extra_delay =
        Duration::from_millis(RandomState::new().hash_one(cycle) % POWER_CUT_MAX_EXTRA_DELAY_MS);
    std::thread::sleep(extra_delay);
    let cut = vm.power_cut();
    assert_eq!(
        verdict(&cut.log, &cut.scenario),
        Verdict::Missing,
        "{cycle_name}: the write boot ended by itself before the power cut (see {})",
        cut.log_path.display()
    );
    // Only whole lines: the cut may have fallen in the middle of one ("ACK 27" of "ACK 271").
    let whole = &cut.log[..cut.log.rfind('\n').map_or(0, |i| i + 1)];
    let acks: Vec<Ack> = markers(whole)
        .filter_map(|m| m.strip_prefix("ACK "))
        .map(|line| {
            Ack::parse(line)
                .unwrap_or_else(|| panic!("{cycle_name}: a malformed ACK line {line:?}"))
        })
        .collect();
    assert!(
        acks.windows(2).all(|w| w[0].record < w[1].record),
        "{cycle_name}: the ACKs do not increase: {acks:?}"
    );
    let (Some(first), Some(last)) = (acks.first(), acks.last()) else {
        panic!("{cycle_name}: no whole ACK line on the console (the wait saw them)")
    };
    let acked = last.record;
    let boot_id = markers(whole)
        .find_map(|m| m.strip_prefix("BOOT-ID "))
        .unwrap_or_else(|| panic!("{cycle_name}: the write boot printed no BOOT-ID"))
        .to_owned();
    let mut kinds = BTreeMap::new();
    for ack in &acks {
        *kinds.entry(ack.kind.clone()).or_insert(0) += 1;
    }
    eprintln!(
        "{cycle_name}: the power went off {} ms after the {POWER_CUT_MIN_ACKS}th ACK line; {} \
         whole ACK lines, records 0..={acked} of boot {boot_id} acknowledged",
        extra_delay.as_millis(),
        acks.len()
    );

    let check = Scenario::new("power-cut-check")
        .disk(disk)
        .param("acked", acked)
        .param("boot", &boot_id)
        .timeout(Duration::from_secs(240));
    let checked_run = Vm::start(&dir, &check).wait();
    checked_run.assert_pass();
    let one = |kind: &str| {
        checked_run
            .reports(kind)
            .first()
            .cloned()
            .unwrap_or_else(|| panic!("{cycle_name}: the check boot printed no {kind} line"))
    };
    let count = |kind: &str| -> u64 {
        let line = one(kind);
        line.split(' ')
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("{cycle_name}: {kind} {line:?} is not a count"))
    };
    let checked = count("CHECKED");
    let lost = count("LOST");
    assert_eq!(
        lost,
        0,
        "{cycle_name}: acknowledged records lost: {}",
        one("LOST")
    );
    assert_eq!(
        checked,
        acked + 1,
        "{cycle_name}: the check boot compared {checked} records, the write boot acknowledged \
         records 0..={acked}"
    );
    assert!(
        checked >= POWER_CUT_MIN_ACKS as u64,
        "{cycle_name}: only {checked} acknowledged records were checked"
    );
    // Every round ends with at least one FLUSH from /dev/nbd0 to the daemon (blkdev_fsync,
    // also after O_DSYNC writes), and the daemon's fdatasync of the volume file then sends at
    // least one to /dev/vda (ext4 flushes the disk in every fsync, or commits its journal
    // with a flush). A daemon that answered a FLUSH without syncing would show here even
    // when the power cut happened to lose nothing.
    for w in acks.windows(2) {
        assert!(
            w[1].nbd0_flushes > w[0].nbd0_flushes,
            "{cycle_name}: the round up to record {} ({}) sent no FLUSH to the daemon: {w:?}",
            w[1].record,
            w[1].kind
        );
        assert!(
            w[1].vda_flushes > w[0].vda_flushes,
            "{cycle_name}: the round up to record {} ({}) sent no FLUSH to the guest's disk: \
             the daemon did not fdatasync the volume: {w:?}",
            w[1].record,
            w[1].kind
        );
    }
    // docs/kernel-devices.md: at start the daemon re-attaches the saved attachments; its
    // attachments.json was made durable at the attach, long before the cut.
    assert_eq!(
        one("ATTACH"),
        "restored",
        "{cycle_name}: the daemon did not re-attach the volume at its start after the power \
         cut (the check boot attached it by hand; see {})",
        checked_run.log_path.display()
    );
    PowerCutFigures {
        acks: acks.len(),
        kinds,
        first_ack: first.uptime.clone(),
        last_ack: last.uptime.clone(),
        nbd0_flushes: last.nbd0_flushes - first.nbd0_flushes,
        vda_flushes: last.vda_flushes - first.vda_flushes,
        extra_delay,
        checked,
        beyond: count("BEYOND"),
        attach: one("ATTACH"),
        boot1_init: cut.init_uptime().unwrap_or("?").to_owned(),
        boot2_init: checked_run.init_uptime().unwrap_or("?").to_owned(),
        boot1: cut.elapsed,
        boot2: checked_run.elapsed,
        cycle: started.elapsed(),
    }
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

    d.ctl.run(&["detach", "root"]).assert_success();
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

/// The host's view after the root boots: export the (detached) volume `root`'s plaintext,
/// check the filesystem with `e2fsck -fn`, and read /root/boot-1 out of it with debugfs: it
/// must have the SHA-256 `written`. Stops the daemon.
#[track_caller]
fn check_root_plaintext(dir: &TestDir, d: Daemon, written: &str) {
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
/// wrapper, named by `NBDCLIENT`, that adds the client certificate (cryptnbd's
/// boot/initramfs-tools/network-root/); the
/// root mounts from /dev/nbd0 and nbd-client runs marked with '@' for systemd. Two boots
/// (write, then check /root/boot-1), then the volume's plaintext is checked on the host.
#[test]
fn root_network_root_through_debian_nbd_client_over_tls() {
    let dir = TestDir::new("vm-root-netroot");
    let image = root_image(&dir, "root.img", "512M");
    let pki = Pki::new(&dir, "vm-netroot");
    let guest = pki.client("guest", "/O=Example/CN=guest.example.com");
    let (d, port) = root_volume_on_the_host(&dir, &pki, &image, "CN=guest.example.com,O=Example");

    // The initramfs: Debian's, plus cryptnbd's network-root files (the TLS wrapper, its hook,
    // the conf.d line: boot/initramfs-tools/network-root, installed where docs/root-volume.md
    // says), the client certificate and the volume's block size.
    let netroot = e2e_tests::workspace_root().join("boot/initramfs-tools/network-root");
    let files = dir.join("initramfs-files");
    for (from, to, mode) in [
        (
            "hook",
            "usr/share/initramfs-tools/hooks/cryptnbd-nbd-tls",
            0o755,
        ),
        ("conf", "etc/initramfs-tools/conf.d/cryptnbd-nbd-tls", 0o644),
        ("nbd-client-tls", "usr/share/cryptnbd/nbd-client-tls", 0o755),
    ] {
        install(&netroot.join(from), &files.join(to), mode);
    }
    let certs = files.join("etc/cryptnbd/nbd-client");
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        install(&guest.join(f), &certs.join(f), 0o600);
    }
    std::fs::write(certs.join("options"), "-b 4096\n").expect("nbd-client options");
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

    d.ctl.run(&["detach", "root"]).assert_success();
    check_root_plaintext(&dir, d, &written);
}

// ---------------------------------------------------------------------------------------------
// The encrypted root (issue 16): cryptnbd's own initramfs integration, in the Debian root
// ---------------------------------------------------------------------------------------------

/// The drivers a dracut image of the root boots need besides dracut's defaults (`--no-hostonly`
/// looks at no hardware): the virtio disk and NIC, ext4 and the crc32c it asks for.
const DRACUT_DRIVERS: &str = "virtio_pci virtio_blk virtio_net ext4 crc32c_generic";

/// The initramfs of a root boot with cryptnbd: `tool` run in the Debian root with `files`
/// laid over it (initramfs-tools: the hook, boot script and conf-hook are picked up as
/// installed; dracut: `-a cryptnbd`, whose module brings network-legacy for a KMS on the
/// network: dracut 059 runs the `initqueue --online` unlock only from network-legacy,
/// network-manager or connman, and would pick systemd-networkd here). Returns the image and the kernel
/// command line words the builder's network needs beside `ip=dhcp` (dracut: `rd.neednet=1`,
/// and `rd.shell=0` so that a failure halts with `dracut: FATAL` instead of a shell).
#[track_caller]
fn cryptnbd_initramfs(
    dir: &TestDir,
    tool: InitramfsTool,
    files: &RootFiles,
) -> (PathBuf, &'static [&'static str]) {
    match tool {
        InitramfsTool::InitramfsTools => {
            let initrd = root_initramfs(dir, "initrd.img", tool, Some(&files.dir), &[]);
            // cryptnbd's conf-hook (UMASK=0077): the image holds the AWS credentials.
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&initrd)
                .expect("the initramfs")
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o777,
                0o600,
                "update-initramfs wrote the image with the credentials readable by others \
                 (cryptnbd's conf-hook sets UMASK=0077)"
            );
            (initrd, &[])
        }
        InitramfsTool::Dracut => {
            let initrd = root_initramfs(
                dir,
                "initrd.dracut",
                tool,
                Some(&files.dir),
                &["-a", "cryptnbd", "--add-drivers", DRACUT_DRIVERS],
            );
            (initrd, &["rd.neednet=1", "rd.shell=0"])
        }
    }
}

/// A boot of the encrypted root on `vol` (the guest's /dev/vda) the dm-crypt way with AWS
/// KMS over the network: `root=/dev/mapper/cryptnbd-root cryptnbd.root=UUID=… ip=dhcp`.
fn dm_crypt_boot(name: &str, vol: &RootVolume, initrd: &Path, extra: &[&str]) -> RootBoot {
    let mut b = RootBoot::new(name)
        .root(DM_DEVICE)
        .cmdline(&format!("cryptnbd.root=UUID={}", vol.uuid))
        .cmdline("ip=dhcp")
        .with_network()
        .initrd(initrd)
        .disk(Disk::raw(&vol.path));
    for w in extra {
        b = b.cmdline(w);
    }
    b
}

/// The boot's audit records (the root daemon's trail, reported by the test unit) hold one
/// `operation` of the root volume, whose outcome is ok, under `key` (a key id or ARN, when
/// given).
#[track_caller]
fn assert_root_audited(run: &VmRun, operation: &str, key: Option<&str>) {
    let records: Vec<Value> = run
        .reports("AUDIT")
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("{}: an audit line is not JSON ({e}): {l}", run.scenario)
            })
        })
        .collect();
    let found: Vec<&Value> = records
        .iter()
        .filter(|r| r["operation"] == operation)
        .collect();
    assert!(
        found.len() == 1
            && found[0]["outcome"] == "ok"
            && found[0]["volume"] == ROOT_VOLUME
            && key.is_none_or(|key| {
                found[0]["key_id"]
                    .as_str()
                    .is_some_and(|k| k.contains(bare(key)))
            }),
        "{}: the root daemon's trail does not hold one successful {operation} of \
         {ROOT_VOLUME}{}: {records:#?}",
        run.scenario,
        key.map(|k| format!(" under {k}")).unwrap_or_default()
    );
}

/// Issue 16's dm-crypt way, end to end, with `tool` building the initramfs in the Debian
/// root: the root volume (a cryptnbd volume under a moto key, made from the root image by
/// a host daemon) is the guest's /dev/vda; the initramfs, built with cryptnbd's integration
/// and our release binaries, brings up the network, starts the root daemon, which unwraps
/// the key through the KMS on the host (10.0.2.2) and maps the root with dm-crypt; systemd
/// runs on /dev/mapper/cryptnbd-root. Two boots (write /root/boot-1, power off; find it),
/// each with the root daemon's audit record and a Decrypt seen by the KMS; then the host
/// exports the plaintext: a clean ext4 holding the file.
#[track_caller]
fn dm_crypt_root_on_aws_kms(label: &str, tool: InitramfsTool) {
    let dir = TestDir::new(label);
    let kms = HostKms::start();
    let image = root_image(&dir, "root.img", "512M");
    let vol = RootVolume::on_aws(&dir, &kms, Content::Image(&image));
    let files = RootFiles::new(&dir, "root-files", &guest_aws_config(kms.port())).aws_files();
    let (initrd, extra) = cryptnbd_initramfs(&dir, tool, &files);

    let boot = |name: &str, step: &str, sha: Option<&str>| {
        let mut b = dm_crypt_boot(name, &vol, &initrd, extra)
            .expect_root_source(DM_DEVICE)
            .report_audit(ROOT_TRAIL)
            .param("step", step);
        if let Some(sha) = sha {
            b = b.param("sha256", sha);
        }
        let decrypts = kms.proxy.count("Decrypt");
        let run = Vm::start_root(&dir, &b).wait();
        run.assert_pass();
        assert_eq!(
            run.reports("ROOT"),
            [DM_DEVICE],
            "{}: the root",
            run.scenario
        );
        assert_root_audited(&run, "open-dm-crypt", Some(&kms.key));
        assert!(
            kms.proxy.count("Decrypt") > decrypts,
            "{}: the KMS on the host saw no Decrypt: the key was not unwrapped through it",
            run.scenario
        );
        run
    };
    let first = boot(&format!("{label}-1"), "write", None);
    let written = written_sum(&first);
    let second = boot(&format!("{label}-2"), "check", Some(&written));
    assert_eq!(
        second.reports("SUM"),
        [format!("{written} /root/boot-1")],
        "the second boot did not find the first boot's file unchanged"
    );
    eprintln!(
        "vm: encrypted root, dm-crypt way, AWS KMS, {tool:?}: first boot {:.1} s, second {:.1} s",
        first.elapsed.as_secs_f64(),
        second.elapsed.as_secs_f64()
    );
    check_root_plaintext(&dir, vol.daemon, &written);
}

#[test]
fn root_dm_crypt_initramfs_tools_aws_kms() {
    dm_crypt_root_on_aws_kms("root-dmcrypt-itools", InitramfsTool::InitramfsTools);
}

#[test]
fn root_dm_crypt_dracut_aws_kms() {
    dm_crypt_root_on_aws_kms("root-dmcrypt-dracut", InitramfsTool::Dracut);
}

/// A root volume whose unlock must fail, and the initramfs-tools image that tries: the
/// volume is empty (the boot never gets past the unlock), 64 MiB.
struct Doomed {
    dir: TestDir,
    kms: HostKms,
    vol: RootVolume,
}

impl Doomed {
    fn new(label: &str) -> Self {
        let dir = TestDir::new(label);
        let kms = HostKms::start();
        let vol = RootVolume::on_aws(&dir, &kms, Content::Empty("64M"));
        Self { dir, kms, vol }
    }

    /// Builds the initramfs (the guest's KMS endpoint at the host's `port`), boots, and
    /// waits for initramfs-tools' emergency shell, where it powers the VM off. Returns the
    /// boot and the one line that names the failure (`cryptnbd: cannot unlock the root
    /// volume root on /dev/vda (KMS key …): …`); the volume's bytes must be unchanged.
    #[track_caller]
    fn boot_to_the_shell(&self, name: &str, port: u16) -> (VmRun, String) {
        let files = RootFiles::new(&self.dir, "root-files", &guest_aws_config(port)).aws_files();
        let (initrd, extra) = cryptnbd_initramfs(&self.dir, InitramfsTool::InitramfsTools, &files);
        let before = self.vol.sha256();
        let mut vm = Vm::start_root(
            &self.dir,
            &dm_crypt_boot(name, &self.vol, &initrd, extra)
                .serial_input()
                .fail_on(&["Kernel panic", "You are in emergency mode"])
                .timeout(Duration::from_secs(180)),
        );
        // At the shell: no daemon of ours may be left (the unlock stops it on failure). The
        // line prints what it computes, so the echo of the typed text cannot pass.
        vm.type_line_after(
            "(initramfs) ",
            "for p in /proc/[0-9]*; do case \"$(tr '\\000' ' ' <$p/cmdline 2>/dev/null)\" in \
             *cryptnbd\\ --config*) echo daemon-left-$((1 + 1));; esac; done; \
             echo checked-$((6 * 7)); poweroff -f",
        );
        let run = vm.wait();
        let lines: Vec<&str> = run.log.lines().map(str::trim_end).collect();
        assert!(
            lines.contains(&"checked-42") && !lines.contains(&"daemon-left-2"),
            "{}: the line typed at the (initramfs) prompt did not run, or found a cryptnbd \
             daemon still running; serial log {}",
            run.scenario,
            run.log_path.display()
        );
        assert_eq!(
            run.marker.as_deref(),
            Some(""),
            "{}: the boot was to stop in the initramfs, yet the test unit reported",
            run.scenario
        );
        assert_eq!(
            self.vol.sha256(),
            before,
            "{}: the failed unlock changed the volume's bytes",
            run.scenario
        );
        // Every line of ours but initramfs-tools' own "Begin: cryptnbd: unlocking ...".
        let ours: Vec<&str> = run
            .log
            .lines()
            .filter(|l| l.contains("cryptnbd: ") && !l.contains("Begin: cryptnbd: unlocking"))
            .collect();
        let [line] = ours.as_slice() else {
            panic!(
                "{}: the console shows {} messages from cryptnbd, not one: {ours:#?}\n(serial \
                 log {})",
                run.scenario,
                ours.len(),
                run.log_path.display()
            );
        };
        let line = (*line).to_owned();
        assert!(
            !line.contains("): /dev/vda: "),
            "{}: the message names the device twice: {line}",
            run.scenario
        );
        for part in [
            format!("cryptnbd: cannot unlock the root volume {ROOT_VOLUME} on /dev/vda"),
            format!("(KMS key {})", self.kms.key),
        ] {
            assert!(
                line.contains(&part),
                "{}: the message does not say {part:?}: {line}",
                run.scenario
            );
        }
        eprintln!(
            "vm: {}: stopped in the initramfs with {line:?}, off after {:.1} s",
            run.scenario,
            run.elapsed.as_secs_f64()
        );
        (run, line)
    }
}

/// The key disabled in the KMS (as AWS does it: DisabledException): the boot stops in
/// initramfs-tools' emergency shell with one sentence that names the volume, its device, the
/// key and says it is disabled; the volume is unchanged.
#[test]
fn root_fails_with_the_key_disabled() {
    let d = Doomed::new("root-key-disabled");
    d.kms.disable_key();
    let (_, line) = d.boot_to_the_shell("root-key-disabled", d.kms.port());
    for part in ["is disabled", "aws kms enable-key"] {
        assert!(
            line.contains(part),
            "the message does not say {part:?}: {line}"
        );
    }
}

/// One pair of the volume's encryption context changed in its header: the KMS refuses the
/// unwrap (InvalidCiphertextException), the boot stops with one sentence; the volume keeps
/// its bytes.
#[test]
fn root_fails_with_the_context_changed() {
    let d = Doomed::new("root-context-changed");
    e2e_tests::set_context_pair(
        &d.vol.path,
        "aws:workspaces:sid-directoryid",
        &format!("[{TEST_SID}]@[d-0000000000]"),
    );
    let (_, line) = d.boot_to_the_shell("root-context-changed", d.kms.port());
    for part in [
        "does not match this key and encryption context",
        "aws:workspaces:sid-directoryid=",
    ] {
        assert!(
            line.contains(part),
            "the message does not say {part:?}: {line}"
        );
    }
}

/// The KMS cannot be reached (the guest's configuration names a closed port of the host):
/// the boot stops with one sentence; the volume keeps its bytes.
#[test]
fn root_fails_with_the_kms_unreachable() {
    let d = Doomed::new("root-kms-unreachable");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let (_, line) = d.boot_to_the_shell("root-kms-unreachable", closed);
    let part = format!("cannot reach AWS KMS at http://10.0.2.2:{closed}");
    assert!(
        line.contains(&part),
        "the message does not say {part:?}: {line}"
    );
}

/// The passphrase the NBD-way tests seal the local keystore with.
const KEYSTORE_PASSPHRASE: &str = "correct horse battery staple 16";
/// What the unlock asks on the console (ctl/src/initramfs.rs).
const PASSPHRASE_PROMPT: &str =
    "Passphrase of the cryptnbd keystore, to unlock the root volume root: ";

/// A root volume under the local KMS, for the NBD way: a host daemon makes it (holding
/// `content`), then stops; the keystore is sealed with [`KEYSTORE_PASSPHRASE`]
/// (`kms seal`, offline) and copied, as a system's state directory holds it, into the files
/// laid over the Debian root (/var/lib/cryptnbd/keystore, with `state_dir =
/// "/var/lib/cryptnbd"` in the root configuration, which also names the volume's device by
/// its UUID in `[store.devices]`, for `cryptnbd.root=root`). Returns the volume file, its UUID
/// and the files.
#[track_caller]
fn sealed_local_root(dir: &TestDir, content: Content<'_>) -> (PathBuf, String, RootFiles) {
    let d = Daemon::start(dir, "");
    d.ctl.create_key("boot");
    create_root(&d, "alias/boot", content);
    let state = d.state_dir.clone();
    let ctl = d.ctl.clone();
    d.stop();
    let pass = dir.write_secret("keystore-passphrase", KEYSTORE_PASSPHRASE.as_bytes());
    ctl.run(&[
        "kms",
        "seal",
        "--new-passphrase-file",
        pass.to_str().expect("utf-8"),
    ])
    .assert_success();
    let vol = state.join("volumes").join(format!("{ROOT_VOLUME}.luks"));
    let uuid = e2e_tests::cryptroot::luks_uuid(&vol);
    let files = RootFiles::new(
        dir,
        "root-files",
        &format!(
            "# The root configuration of the VM rig's NBD-way boots (tests/tests/vm.rs).\n\
             state_dir = \"/var/lib/cryptnbd\"\n[kms]\nbackend = \"local\"\n\
             [store.devices]\n{ROOT_VOLUME} = \"UUID={uuid}\"\n"
        ),
    );
    let keystore = files.dir.join("var/lib/cryptnbd/keystore");
    for entry in std::fs::read_dir(state.join("keystore")).expect("the keystore") {
        let entry = entry.expect("a keystore entry");
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            install(&entry.path(), &keystore.join(entry.file_name()), 0o600);
        }
    }
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [keystore.parent().expect("state"), keystore.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .expect("chmod the keystore copy");
        }
    }
    (vol, uuid, files)
}

/// A boot of the NBD way on `vol` (the guest's /dev/vda): `root=/dev/nbd0
/// cryptnbd.root=ROOT cryptnbd.mode=nbd` (`ROOT`: `UUID=…` or a name of `[store.devices]`),
/// the console's input piped for the passphrase.
///
/// The guest has a NIC, though the local KMS needs no network: Debian's nbd-client package
/// (in the root, as on any system that uses NBD) has an initramfs script of its own that
/// wakes on `root=/dev/nbd*`, brings the network up (`configure_networking`) and, without a
/// NIC, waits 180 s for one before it gives up (seen: the unit started at 194 s of uptime).
/// With a NIC it takes a DHCP lease and quits ("Insufficient information to set up nbd").
fn nbd_boot(name: &str, vol: &Path, root: &str, initrd: &Path) -> RootBoot {
    RootBoot::new(name)
        .root("/dev/nbd0")
        .cmdline(&format!("cryptnbd.root={root}"))
        .cmdline("cryptnbd.mode=nbd")
        .with_network()
        .initrd(initrd)
        .disk(Disk::raw(vol))
        .serial_input()
}

/// Where the root daemon logs (ctl/src/initramfs.rs: `DIR/daemon.log`).
const ROOT_DAEMON_LOG: &str = "/run/cryptnbd-root/daemon.log";

/// Where `cryptnbd.service` keeps its audit trail (`state_dir` /var/lib/cryptnbd).
const SYSTEM_TRAIL: &str = "/var/lib/cryptnbd/audit/audit.jsonl";

/// Issue 16's NBD way with the local KMS, its keystore sealed: initramfs-tools' image holds
/// the sealed keystore copy; at boot the passphrase is typed at the unlock's prompt on the
/// serial console (echo off: it must not show in the log); the root daemon, started as
/// `@cryptnbd`, serves the root on /dev/nbd0 and must still run under systemd on the real
/// root. The real root has the product installed (`cryptnbd.service` enabled): on it
/// `cryptnbdctl --socket /run/cryptnbd-root/control.sock` shows the root volume and is refused
/// its detach, and the system's daemon merges the boot's audit records into its trail. Two
/// boots, the first naming the root by its UUID, the second by its name in `[store.devices]`;
/// then the plaintext checked on the host.
#[test]
fn root_nbd_way_local_kms_sealed_keystore() {
    let dir = TestDir::new("root-nbd-sealed");
    let overlay = system_daemon_overlay(&dir, "system");
    let image = root_image_with(&dir, "root.img", "512M", Some(&overlay));
    let (vol, uuid, files) = sealed_local_root(&dir, Content::Image(&image));
    let (initrd, _) = cryptnbd_initramfs(&dir, InitramfsTool::InitramfsTools, &files);
    let boot = |name: &str, root: &str, step: &str, sha: Option<&str>, nth: usize| {
        let mut b = nbd_boot(name, &vol, root, &initrd)
            .expect_root_source("/dev/nbd0")
            .require_root_daemon()
            .report_audit(ROOT_TRAIL)
            .report_log(ROOT_DAEMON_LOG)
            .param("ctl", "/run/cryptnbd-root/control.sock")
            .param("merged", SYSTEM_TRAIL)
            .param("step", step);
        if let Some(sha) = sha {
            b = b.param("sha256", sha);
        }
        let run = run_typing_passphrase(&dir, &b, PASSPHRASE_PROMPT);
        let marked = run.reports("MARKED");
        assert!(
            marked.iter().any(|m| m.contains("@cryptnbd")),
            "{}: no @cryptnbd root daemon on the real root: {marked:?}",
            run.scenario
        );
        assert_root_audited(&run, "attach", None);
        assert_root_daemon_unkillable(&run);
        assert_root_daemon_seen_by_ctl(&run);
        assert_boot_records_merged(&run, nth);
        eprintln!(
            "vm: {}: the root daemon's / on the real root: {:?}; its log:\n  {}",
            run.scenario,
            run.reports("DAEMON-ROOT"),
            run.reports("LOG").join("\n  ")
        );
        run
    };
    let first = boot(
        "root-nbd-sealed-1",
        &format!("UUID={uuid}"),
        "write",
        None,
        1,
    );
    let written = written_sum(&first);
    let second = boot("root-nbd-sealed-2", ROOT_VOLUME, "check", Some(&written), 2);
    assert_eq!(
        second.reports("SUM"),
        [format!("{written} /root/boot-1")],
        "the second boot did not find the first boot's file unchanged"
    );
    eprintln!(
        "vm: encrypted root, NBD way, sealed local keystore: first boot (by UUID) {:.1} s, \
         second (by name) {:.1} s",
        first.elapsed.as_secs_f64(),
        second.elapsed.as_secs_f64()
    );
    check_sealed_root_plaintext(&dir, &written);
}

/// `cryptnbdctl --socket /run/cryptnbd-root/control.sock` on the running system (the test
/// unit's CTL-STATUS and CTL-DETACH): the status shows the root volume on /dev/nbd0, and its
/// detach is refused with the sentence that says why.
#[track_caller]
fn assert_root_daemon_seen_by_ctl(run: &VmRun) {
    let status = run.reports("CTL-STATUS");
    let status: Value = serde_json::from_str(status.first().map_or("", String::as_str))
        .unwrap_or_else(|e| panic!("{}: CTL-STATUS is not JSON ({e}): {status:?}", run.scenario));
    let attachments = status["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        attachments.len() == 1
            && attachments[0]["volume"] == ROOT_VOLUME
            && attachments[0]["device"]["path"] == "/dev/nbd0",
        "{}: the root daemon's status does not show {ROOT_VOLUME} on /dev/nbd0: {status:#}",
        run.scenario
    );
    let detach = run.reports("CTL-DETACH");
    assert!(
        detach.len() == 1
            && !detach[0].starts_with("0 ")
            && detach[0].contains("it is not detached while the system runs on it"),
        "{}: the detach of the root volume was not refused as it should be: {detach:?}",
        run.scenario
    );
}

/// The system daemon's trail (the test unit's MERGED lines, read after `cryptnbd.service`
/// started) holds the root daemon's `attach` of each boot so far, `boots` of them, each once,
/// marked `"origin": "initramfs"`.
#[track_caller]
fn assert_boot_records_merged(run: &VmRun, boots: usize) {
    let merged: Vec<Value> = run
        .reports("MERGED")
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "{}: a line of {SYSTEM_TRAIL} is not JSON ({e}): {l}",
                    run.scenario
                )
            })
        })
        .collect();
    let attaches = merged
        .iter()
        .filter(|r| {
            r["operation"] == "attach" && r["volume"] == ROOT_VOLUME && r["origin"] == "initramfs"
        })
        .count();
    assert_eq!(
        attaches, boots,
        "{}: {SYSTEM_TRAIL} should hold the root daemon's attach of each of the {boots} boot(s) \
         so far, marked origin initramfs: {merged:#?}",
        run.scenario
    );
}

/// The sealed keystore's passphrase typed wrong three times: each try is refused on the
/// console, then the boot stops in initramfs-tools' emergency shell with one sentence; the
/// volume keeps its bytes and no daemon was left running.
#[test]
fn root_nbd_way_fails_after_three_wrong_passphrases() {
    let dir = TestDir::new("root-nbd-wrong-pass");
    let (vol, uuid, files) = sealed_local_root(&dir, Content::Empty("64M"));
    let (initrd, _) = cryptnbd_initramfs(&dir, InitramfsTool::InitramfsTools, &files);
    let before = e2e_tests::cryptroot::file_sha256(&vol);
    let mut vm = Vm::start_root(
        &dir,
        &nbd_boot(
            "root-nbd-wrong-pass",
            &vol,
            &format!("UUID={uuid}"),
            &initrd,
        )
        .fail_on(&["Kernel panic", "You are in emergency mode"])
        .timeout(Duration::from_secs(240)),
    );
    for i in 1..=3 {
        vm.type_line_after(PASSPHRASE_PROMPT, &format!("not the passphrase {i}"));
    }
    vm.type_line_after(
        "(initramfs) ",
        "for p in /proc/[0-9]*; do case \"$(tr '\\000' ' ' <$p/cmdline 2>/dev/null)\" in \
         *cryptnbd*--config*) echo daemon-left-$((1 + 1));; esac; done; \
         echo checked-$((6 * 7)); poweroff -f",
    );
    let run = vm.wait();
    let lines: Vec<&str> = run.log.lines().map(str::trim_end).collect();
    assert!(
        lines.contains(&"checked-42") && !lines.contains(&"daemon-left-2"),
        "the line typed at the (initramfs) prompt did not run, or found a cryptnbd daemon \
         still running; serial log {}",
        run.log_path.display()
    );
    for i in 1..=3 {
        let note = format!("cryptnbd: wrong passphrase (try {i} of 3)");
        assert!(
            run.log.contains(&note),
            "the console does not show {note:?}; serial log {}",
            run.log_path.display()
        );
    }
    // Every line of ours but initramfs-tools' "Begin: cryptnbd: unlocking ..." and the notes
    // of the wrong tries.
    let failed: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            l.contains("cryptnbd: ")
                && !l.contains("Begin: cryptnbd: unlocking")
                && !l.contains("cryptnbd: wrong passphrase (try")
        })
        .collect();
    assert!(
        failed.len() == 1
            && failed[0].contains(&format!(
                "cryptnbd: cannot unlock the root volume {ROOT_VOLUME} on /dev/vda (KMS key "
            ))
            && failed[0].contains("the keystore passphrase was wrong 3 times"),
        "the console does not show one sentence naming the volume, its device and its key, \
         and saying the passphrase was wrong 3 times: {failed:#?}; serial log {}",
        run.log_path.display()
    );
    assert_eq!(run.marker.as_deref(), Some(""), "the test unit reported");
    assert_eq!(
        e2e_tests::cryptroot::file_sha256(&vol),
        before,
        "the failed unlock changed the volume's bytes"
    );
    eprintln!(
        "vm: three wrong passphrases: stopped in the initramfs, off after {:.1} s",
        run.elapsed.as_secs_f64()
    );
}

/// The dm-crypt way through dracut's systemd initrd with the local KMS, its keystore sealed:
/// the unlock runs in dracut's initqueue, which has no console, so the passphrase is asked
/// through systemd's password agents (the module brings `systemd-ask-password`); the test
/// types it on the serial console at the agent's prompt, and it must not show there. One
/// boot onto /dev/mapper/cryptnbd-root with the boot's `open-dm-crypt` in the trail.
#[test]
fn root_dm_crypt_dracut_sealed_keystore_asks_through_systemd() {
    let (dir, boot) = dracut_sealed_boot("root-dracut-sealed");
    let boot = boot.root(DM_DEVICE).expect_root_source(DM_DEVICE);
    let run = run_typing_passphrase(&dir, &boot, SYSTEMD_PASSPHRASE_PROMPT);
    assert_root_audited(&run, "open-dm-crypt", None);
    eprintln!(
        "vm: encrypted root, dm-crypt way through dracut, sealed keystore asked through \
         systemd: {:.1} s",
        run.elapsed.as_secs_f64()
    );
}

/// The NBD way through dracut's systemd initrd, the local keystore sealed: the unlock runs
/// in dracut's initqueue (the passphrase asked through systemd's password agents, typed on
/// the serial console); the root daemon it starts must outlive that unit, systemd's killing
/// spree at the switch to the real root (argv[0] `@cryptnbd`) and the one at shutdown, and
/// serve the root on /dev/nbd0 until the power-off. One boot that writes a file; then the
/// host reads the volume's plaintext: the file is there, so the shutdown's flush went
/// through the root daemon.
#[test]
fn root_nbd_way_dracut_sealed_keystore() {
    let (dir, boot) = dracut_sealed_boot("root-nbd-dracut");
    let boot = boot
        .root("/dev/nbd0")
        .expect_root_source("/dev/nbd0")
        .require_root_daemon()
        .cmdline("cryptnbd.mode=nbd")
        .report_log(ROOT_DAEMON_LOG);
    let run = run_typing_passphrase(&dir, &boot, SYSTEMD_PASSPHRASE_PROMPT);
    assert_root_audited(&run, "attach", None);
    assert_root_daemon_unkillable(&run);
    let written = written_sum(&run);
    eprintln!(
        "vm: encrypted root, NBD way through dracut's systemd initrd, sealed keystore: {:.1} s",
        run.elapsed.as_secs_f64()
    );
    check_sealed_root_plaintext(&dir, &written);
}

/// A sealed local root made from a Debian root image ([`sealed_local_root`]) in a new
/// `TestDir` named `name`, its dracut image built, and a boot of it through dracut's systemd
/// initrd (`rd.shell=0`), by its UUID, reporting the root daemon's trail, that writes
/// /root/boot-1; the caller sets the root and the mode.
#[track_caller]
fn dracut_sealed_boot(name: &str) -> (TestDir, RootBoot) {
    let dir = TestDir::new(name);
    let image = root_image(&dir, "root.img", "512M");
    let (vol, uuid, files) = sealed_local_root(&dir, Content::Image(&image));
    let (initrd, _) = cryptnbd_initramfs(&dir, InitramfsTool::Dracut, &files);
    let boot = RootBoot::new(name)
        .cmdline(&format!("cryptnbd.root=UUID={uuid}"))
        .cmdline("rd.shell=0")
        .initrd(&initrd)
        .disk(Disk::raw(&vol))
        .serial_input()
        .report_audit(ROOT_TRAIL)
        .param("step", "write");
    (dir, boot)
}

/// What systemd's password agent shows on the serial console for the keystore's passphrase
/// (the unlock's own prompt, [`PASSPHRASE_PROMPT`], without its trailing space).
const SYSTEMD_PASSPHRASE_PROMPT: &str =
    "Passphrase of the cryptnbd keystore, to unlock the root volume root:";

/// Runs `boot`, typing the keystore's passphrase on the serial console once `prompt` shows:
/// the boot passes, and the passphrase does not show in the serial log (echo was off).
#[track_caller]
fn run_typing_passphrase(dir: &TestDir, boot: &RootBoot, prompt: &str) -> VmRun {
    let mut vm = Vm::start_root(dir, boot);
    vm.type_line_after(prompt, KEYSTORE_PASSPHRASE);
    let run = vm.wait();
    run.assert_pass();
    assert!(
        !run.log.contains(KEYSTORE_PASSPHRASE),
        "{}: the passphrase typed at the prompt shows in the serial log (echo was on)",
        run.scenario
    );
    run
}

/// The sealed local root's plaintext checked on the host ([`check_root_plaintext`]), by a
/// daemon given the keystore's passphrase.
#[track_caller]
fn check_sealed_root_plaintext(dir: &TestDir, written: &str) {
    let d = Daemon::start_env(dir, "", &[("CRYPTNBD_KMS_PASSPHRASE", KEYSTORE_PASSPHRASE)]);
    check_root_plaintext(dir, d, written);
}

/// The root daemon's `oom_score_adj` (the test unit's DAEMON-OOM) is -1000: the OOM killer
/// never picks it.
#[track_caller]
fn assert_root_daemon_unkillable(run: &VmRun) {
    assert_eq!(
        run.reports("DAEMON-OOM"),
        ["-1000"],
        "{}: the root daemon's oom_score_adj",
        run.scenario
    );
}
