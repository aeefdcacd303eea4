//! The encrypted root's initramfs side, on the host (issue 16): `cryptnbdctl initramfs
//! prepare` builds the image tree a hook would, and `cryptnbdctl initramfs unlock` reads a
//! kernel command line, starts the real daemon from that tree and fails the way a boot must:
//! one sentence naming the volume, the device, the KMS key and the reason, with the volume's
//! bytes unchanged and no daemon left behind. A loop device stands for the root partition.
//! The successful unlocks (dm-crypt, /dev/nbd0) need a kernel with dm-crypt and nbd: they are
//! booted in tests/tests/vm.rs. Needs root (losetup).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::daemon::Daemon;
use e2e_tests::loopdev::Loop;
use e2e_tests::{Ctl, Outcome, TestDir, run};

/// A root volume on a loop device, a root configuration naming it, and the image tree
/// `initramfs prepare` made from them.
struct Root {
    dir: TestDir,
    ctl: Ctl,
    disk: Loop,
    uuid: String,
    key: String,
    config: PathBuf,
    image: PathBuf,
}

impl Root {
    fn new(label: &str) -> Self {
        let dir = TestDir::new(label);
        let ctl = Ctl::new(&dir.state_dir());
        let key = ctl.create_key("boot");
        let disk = Loop::new(&dir, "disk", 48 << 20);
        let out = disk.create_volume(&ctl, &[]);
        out.assert_success();
        let uuid = out.json()["uuid"].as_str().expect("uuid").to_owned();
        let config = dir.join("root.toml");
        std::fs::write(
            &config,
            format!("state_dir = \"{}\"\n", dir.state_dir().display()),
        )
        .expect("config");
        let image = dir.join("image");
        let r = Self {
            dir,
            ctl,
            disk,
            uuid,
            key,
            config,
            image,
        };
        r.prepare().assert_success();
        r
    }

    /// Rewrites the root configuration: the state directory, then `extra`.
    fn configure(&self, extra: &str) {
        std::fs::write(
            &self.config,
            format!(
                "state_dir = \"{}\"\n{extra}",
                self.dir.state_dir().display()
            ),
        )
        .expect("config");
    }

    fn prepare(&self) -> Outcome {
        let image_config = self.image.join("etc/cryptnbd/root.toml");
        self.ctl.run(&[
            "initramfs",
            "prepare",
            "--dest",
            self.image.to_str().expect("utf-8"),
            "--config",
            self.config.to_str().expect("utf-8"),
            "--config-in-image",
            // Inside the tree: the unlock below reads it from the host's filesystem.
            image_config
                .strip_prefix(&self.image)
                .map(|p| Path::new("/").join(p))
                .expect("in the image")
                .to_str()
                .expect("utf-8"),
        ])
    }

    /// `initramfs unlock` with `cmdline` (`{config}` is replaced by the configuration in the
    /// image), its console on `console` when given.
    fn unlock_command(&self, cmdline: &str, console: Option<&Path>) -> Command {
        let cmdline = cmdline.replace(
            "{config}",
            self.image
                .join("etc/cryptnbd/root.toml")
                .to_str()
                .expect("utf-8"),
        );
        let file = self.dir.join("cmdline");
        std::fs::write(&file, format!("{cmdline}\n")).expect("cmdline");
        let mut cmd = self.ctl.command(&[
            "initramfs",
            "unlock",
            "--cmdline",
            file.to_str().expect("utf-8"),
            "--runtime-dir",
            self.run_dir().to_str().expect("utf-8"),
            "--initramfs-root",
            self.image.to_str().expect("utf-8"),
        ]);
        if let Some(c) = console {
            cmd.arg("--console").arg(c);
        }
        cmd
    }

    /// `initramfs unlock` running with its console on `pty`, its output piped.
    fn unlock_on(&self, cmdline: &str, pty: &Pty) -> std::process::Child {
        self.unlock_command(cmdline, Some(&pty.slave))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unlock")
    }

    fn unlock(&self, cmdline: &str) -> Outcome {
        run(&mut self.unlock_command(cmdline, None))
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run-root")
    }

    /// No daemon of this root is left running.
    #[track_caller]
    fn assert_no_daemon(&self) {
        let run = self.run_dir();
        let run = run.to_str().expect("utf-8");
        let left = Command::new("pgrep")
            .args(["-f", run])
            .output()
            .expect("pgrep");
        assert!(
            left.stdout.is_empty(),
            "a daemon of {run} is still running: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }
}

#[test]
fn the_command_line_decides_and_a_wrong_one_stops_with_one_sentence() {
    let r = Root::new("root-cmdline");
    // Not asked: nothing printed, nothing started.
    let out = r.unlock("BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet");
    out.assert_success();
    assert_eq!(out.stdout_text(), "");
    assert!(!r.run_dir().exists());

    for (line, code, said) in [
        ("cryptnbd.root=UUID=1234", 2, "a UUID is 36 characters"),
        ("cryptnbd.root=UUID=1234", 2, "fix the kernel command line"),
        (
            "cryptnbd.root=root cryptnbd.mode=luks",
            2,
            "use dm-crypt (the default) or nbd",
        ),
        (
            "cryptnbd.root=root cryptnbd.config=/nonexistent/root.toml",
            3,
            "update-initramfs -u",
        ),
        (
            "cryptnbd.root=home cryptnbd.config={config}",
            3,
            "names no such volume in [store.devices]",
        ),
        (
            "cryptnbd.root=UUID=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 cryptnbd.config={config}",
            3,
            "no block device holds a LUKS2 header with UUID 0f1e2d3c",
        ),
    ] {
        let out = r.unlock(line);
        out.assert_code(code).assert_stderr_contains(said);
        assert_eq!(out.stdout_text(), "", "{line}: a device was printed");
    }
    r.assert_no_daemon();
}

#[test]
fn prepare_puts_the_configuration_and_the_keystore_in_the_image_and_never_a_passphrase_file() {
    let r = Root::new("root-prepare");
    let out = r.prepare();
    out.assert_success()
        .assert_stderr_contains("is not sealed: whoever reads the initramfs");
    // The programs the hook copies with their libraries.
    let programs = out.stdout_text();
    for p in ["cryptnbdctl", "cryptnbd", "cryptsetup"] {
        assert!(
            programs
                .lines()
                .any(|l| l.starts_with("program /") && l.ends_with(&format!("/{p}"))),
            "{p} is not listed: {programs}"
        );
    }
    for m in ["dm_crypt", "nbd"] {
        assert!(
            programs.lines().any(|l| l == format!("module {m}")),
            "{programs}"
        );
    }
    assert!(
        !programs.lines().any(|l| l == "network"),
        "the local KMS needs no network"
    );
    let keystore = r
        .image
        .join("etc/cryptnbd/root-state/keystore/keystore.json");
    assert_eq!(
        std::fs::read(&keystore).expect("the keystore copy"),
        std::fs::read(r.dir.state_dir().join("keystore/keystore.json")).expect("keystore")
    );
    assert_eq!(
        std::fs::metadata(&keystore)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(r.image.join("etc/cryptnbd/root.toml").is_file());

    r.configure("[kms]\npassphrase_file = \"/etc/cryptnbd/pass\"\n");
    r.prepare()
        .assert_code(2)
        .assert_stderr_contains("kms.passphrase_file");
}

#[test]
fn a_failed_unlock_names_the_volume_the_device_and_the_key_and_leaves_nothing_running() {
    let r = Root::new("root-failed");
    // This host's kernel has no NBD driver: the daemon starts from the image tree, with the
    // keystore copy, and the attach fails there. (The KMS refusals, a disabled key or a
    // changed context, are booted in tests/tests/vm.rs, where the kernel has the device.)
    let before = r.disk.bytes();
    let out = r.unlock(&format!(
        "ro cryptnbd.root=UUID={} cryptnbd.mode=nbd cryptnbd.config={{config}}",
        r.uuid
    ));
    out.assert_code(4)
        .assert_stderr_contains(&format!(
            "cannot unlock the root volume root on {} (KMS key {})",
            r.disk.dev, r.key
        ))
        .assert_stderr_contains("modprobe nbd");
    assert_eq!(out.stdout_text(), "");
    r.assert_no_daemon();
    assert!(
        r.disk.bytes() == before,
        "a failed unlock changed the volume"
    );
    let log = std::fs::read_to_string(r.run_dir().join("daemon.log")).expect("its log");
    assert!(log.contains("cryptnbd ready"), "{log}");

    // A daemon that cannot start: its own sentence comes through.
    r.configure("[nbd]\ntcp = \"192.0.2.1:10809\"\n");
    r.prepare().assert_success();
    r.unlock(&format!(
        "cryptnbd.root=UUID={} cryptnbd.config={{config}}",
        r.uuid
    ))
    .assert_stderr_contains("the root daemon stopped at start")
    .assert_stderr_contains("is not a loopback address");
    r.assert_no_daemon();
}

/// A pseudo-terminal: the test types on `master` what the unlock reads from the console.
struct Pty {
    master: std::fs::File,
    slave: PathBuf,
    /// Held open, so that the master reads nothing (rather than EIO) between the unlock's
    /// opens of the console.
    _held: std::fs::File,
}

impl Pty {
    fn new() -> Self {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave = PathBuf::from(name.to_str().expect("utf-8"));
        let held = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&slave)
            .expect("open the terminal");
        Self {
            master: std::fs::File::from(master),
            slave,
            _held: held,
        }
    }

    /// Reads from the console into `seen` until `text` appears, while `child` runs; what came
    /// up to the end of `text` is taken out of `seen` and returned.
    fn expect(&mut self, child: &mut std::process::Child, seen: &mut String, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 256];
        while !seen.contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} never came; the console said {seen:?}"
            );
            rustix::io::ioctl_fionbio(&self.master, true).expect("nonblocking");
            match self.master.read(&mut buf) {
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Nothing more to read: is the unlock still there to write it?
                    if let Ok(Some(status)) = child.try_wait() {
                        // What it wrote just before it ended is read first.
                        if let Ok(n @ 1..) = self.master.read(&mut buf) {
                            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                            continue;
                        }
                        let mut err = String::new();
                        if let Some(e) = child.stderr.as_mut() {
                            let _ = e.read_to_string(&mut err);
                        }
                        panic!("the unlock ended ({status}) before {text:?} came: {err}");
                    }
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("reading the console: {e}"),
            }
        }
        // What came up to the text is consumed; what came after it stays for the next call.
        let end = seen.find(text).map_or(0, |i| i + text.len());
        seen.drain(..end).collect()
    }
}

#[test]
fn a_sealed_keystore_asks_its_passphrase_on_the_console_three_times() {
    let r = Root::new("root-sealed");
    let pass = r.dir.write_secret("pass", b"the right one");
    let mut seal = r.ctl.command(&["kms", "seal", "--new-passphrase-file"]);
    seal.arg(&pass);
    run(&mut seal).assert_success();
    r.prepare().assert_success();
    let line = format!(
        "cryptnbd.root=UUID={} cryptnbd.mode=nbd cryptnbd.config={{config}}",
        r.uuid
    );

    // Three wrong answers: the boot stops.
    let mut pty = Pty::new();
    let mut child = r.unlock_on(&line, &pty);
    let mut seen = String::new();
    for n in 1..=3 {
        pty.expect(&mut child, &mut seen, "to unlock the root volume root: ");
        pty.master.write_all(b"wrong\n").expect("type");
        let said = pty.expect(
            &mut child,
            &mut seen,
            &format!("wrong passphrase (try {n} of 3)"),
        );
        assert!(
            !said.contains("wrong\r\n"),
            "the passphrase was echoed: {said:?}"
        );
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the keystore passphrase was wrong 3 times"),
        "{err}"
    );
    r.assert_no_daemon();

    // A wrong answer, then the right one: the daemon opens the sealed keystore with it and
    // gets as far as the kernel device, which this host's kernel lacks.
    let mut pty = Pty::new();
    let mut child = r.unlock_on(&line, &pty);
    let mut seen = String::new();
    pty.expect(&mut child, &mut seen, "to unlock the root volume root: ");
    pty.master.write_all(b"wrong\n").expect("type");
    pty.expect(&mut child, &mut seen, "try 1 of 3");
    pty.expect(&mut child, &mut seen, "to unlock the root volume root: ");
    pty.master.write_all(b"the right one\n").expect("type");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("passphrase"), "{err}");
    assert!(err.contains("cannot unlock the root volume root"), "{err}");
    r.assert_no_daemon();
    let log = std::fs::read_to_string(r.run_dir().join("daemon.log")).expect("daemon log");
    assert!(
        !log.contains("the right one"),
        "the passphrase reached the log"
    );
}

/// Packs `tree` as a zstd-compressed initramfs (Debian 12's default) behind an uncompressed
/// early archive (as Debian's images with CPU microcode are), mode `mode`.
fn pack_image(dir: &TestDir, tree: &Path, mode: u32) -> PathBuf {
    let early = dir.join("early");
    std::fs::create_dir_all(early.join("kernel/x86/microcode")).expect("mkdir");
    std::fs::write(
        early.join("kernel/x86/microcode/AuthenticAMD.bin"),
        b"microcode",
    )
    .expect("write");
    let mut bytes = e2e_tests::cpio::pack(&early);
    let mut zstd = Command::new(e2e_tests::require_tool("zstd", "zstd"))
        .args(["-1", "-T0", "-q", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("zstd");
    let main = e2e_tests::cpio::pack(tree);
    let mut stdin = zstd.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || stdin.write_all(&main).expect("feed zstd"));
    let out = zstd.wait_with_output().expect("zstd");
    feeder.join().expect("feeder");
    bytes.extend_from_slice(&out.stdout);
    let image = dir.join("initrd.img");
    std::fs::write(&image, &bytes).expect("write the image");
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(mode)).expect("chmod");
    image
}

#[test]
fn initramfs_check_names_what_is_missing_and_what_is_stale() {
    let r = Root::new("root-check");
    // The image tree a hook makes: prepare's files, its programs, the modules, the script.
    let tree = &r.image;
    let plan = r.prepare();
    plan.assert_success();
    for line in plan.stdout_text().lines() {
        if let Some(program) = line.strip_prefix("program ") {
            let to = tree.join(program.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().expect("dir")).expect("mkdir");
            std::fs::copy(program, &to).expect("copy the program");
        }
    }
    let modules = tree.join("usr/lib/modules/6.1.0-99-amd64/kernel/drivers");
    for m in ["md/dm-crypt.ko", "md/dm-mod.ko.xz", "block/nbd.ko.zst"] {
        let p = modules.join(m);
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(&p, b"module").expect("module");
    }
    std::os::unix::fs::symlink("usr/lib", tree.join("lib")).expect("symlink");
    let script = tree.join("scripts/local-top/cryptnbd");
    std::fs::create_dir_all(script.parent().expect("dir")).expect("mkdir");
    std::fs::copy(
        e2e_tests::workspace_root().join("boot/initramfs-tools/scripts/local-top/cryptnbd"),
        &script,
    )
    .expect("the script");
    let cmdline = r.dir.join("check-cmdline");
    std::fs::write(&cmdline, "ro quiet\n").expect("cmdline");
    let check = |image: &Path| {
        r.ctl.run(&[
            "--json",
            "initramfs",
            "check",
            "--image",
            image.to_str().expect("utf-8"),
            "--config",
            r.config.to_str().expect("utf-8"),
            "--config-in-image",
            "/etc/cryptnbd/root.toml",
            "--cmdline",
            cmdline.to_str().expect("utf-8"),
        ])
    };

    // Complete, 0600: it can unlock the root (the unsealed keystore is warned about).
    let image = pack_image(&r.dir, tree, 0o600);
    let out = check(&image);
    out.assert_success();
    let c = out.json();
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["warnings"].as_array().map(Vec::len), Some(1), "{c}");

    // Readable by others: a warning, not a failure.
    let image = pack_image(&r.dir, tree, 0o644);
    let c = check(&image).json();
    assert!(
        c["warnings"]
            .to_string()
            .contains("is readable by others (mode 0644)"),
        "{c}"
    );

    // A key created after the image was built: the keystore copy is stale.
    r.ctl.create_key("later");
    let out = check(&image);
    out.assert_code(1);
    let c = out.json();
    assert!(
        c["stale"].to_string().contains("the local KMS keystore"),
        "{c}"
    );
    r.prepare().assert_success();

    // A missing module: the NBD way needs nbd.ko.
    std::fs::remove_file(modules.join("block/nbd.ko.zst")).expect("rm");
    std::fs::write(
        &cmdline,
        format!("cryptnbd.root=UUID={} cryptnbd.mode=nbd\n", r.uuid),
    )
    .expect("cmdline");
    let out = check(&pack_image(&r.dir, tree, 0o600));
    out.assert_code(1);
    let c = out.json();
    assert_eq!(
        c["missing"],
        serde_json::json!(["the kernel module nbd (nbd)"]),
        "{c}"
    );

    // Missing credentials: the configuration now names an AWS credentials file the image
    // does not hold.
    let creds = r.dir.join("aws-credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = AKIA\naws_secret_access_key = s\n",
    )
    .expect("credentials");
    std::fs::write(
        &r.config,
        format!(
            "[kms]\nbackend = \"aws\"\n[kms.aws]\nregion = \"eu-west-1\"\nendpoint_url = \
             \"http://127.0.0.1:9\"\ncredentials_file = \"{}\"\n",
            creds.display()
        ),
    )
    .expect("config");
    let out = check(&pack_image(&r.dir, tree, 0o600));
    out.assert_code(1);
    let c = out.json();
    let missing = c["missing"].to_string();
    assert!(missing.contains("the AWS credentials"), "{c}");
    assert!(
        c["stale"].to_string().contains("the root configuration"),
        "{c}"
    );
}

#[test]
fn the_root_daemon_s_audit_records_are_merged_into_the_system_trail_once() {
    // A trail written elsewhere, as the root daemon writes one under /run at boot (here by
    // offline verbs, which audit as the daemon does).
    let boot = TestDir::new("root-trail-boot");
    let boot_ctl = Ctl::new(&boot.state_dir());
    boot_ctl.create_key("boot");
    boot_ctl.create_volume("v", "1M", "alias/boot", 512, &[]);
    let trail = boot.state_dir().join("audit/audit.jsonl");
    let records = std::fs::read_to_string(&trail)
        .expect("the trail")
        .lines()
        .count();
    assert!(records >= 2, "{records}");

    let dir = TestDir::new("root-trail");
    let config = format!("[audit]\ninitramfs_trail = \"{}\"\n", trail.display());
    let merged = |d: &Daemon| {
        let audit = d.ctl.run(&["--json", "audit"]);
        audit.assert_success();
        audit
            .json()
            .as_array()
            .expect("records")
            .iter()
            .filter(|v| v["origin"] == "initramfs")
            .count()
    };
    let d = Daemon::start(&dir, &config);
    assert_eq!(merged(&d), records);
    d.stop();
    // A restart merges nothing twice; a record added since is merged.
    boot_ctl.create_volume("w", "1M", "alias/boot", 512, &[]);
    let now = std::fs::read_to_string(&trail)
        .expect("the trail")
        .lines()
        .count();
    let d = Daemon::start(&dir, &config);
    assert_eq!(merged(&d), now);
    d.stop();
}
