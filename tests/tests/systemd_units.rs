//! The systemd integration in `systemd/` (docs/systemd.md), checked with systemd's own tools:
//!
//! - `systemd-analyze verify` on every unit, with the binaries installed where the units say:
//!   in a temporary root (`--root=`, with a copy of this machine's unit tree), so nothing is
//!   installed on the machine; and on the mount units systemd-fstab-generator makes from each
//!   line of `systemd/fstab.example`. Verify reports ordering cycles and unknown settings but
//!   still exits 0, so any output at all fails the test;
//! - `systemd-analyze security --offline=true`: the daemon unit's exposure is at most 2.5;
//! - the tmpfiles.d entry, applied to a temporary root;
//! - every `cryptnbd` / `cryptnbdctl` command line in the units uses a subcommand and flags the
//!   built binaries have;
//! - the daemon under its unit for real: systemd as PID 1 in a `systemd-nspawn` container
//!   made of this machine's `/usr` and a throw-away root, the unit files and the example
//!   configuration bound in. A volume is created, attached, written and read with nbdcopy
//!   through the unit's sandbox (system call filter, capability set, read-only system), the
//!   daemon is restarted (and killed: Restart=on-failure) and re-attaches it, the attach
//!   template runs in its own sandbox and survives the daemon's crash, and both stop cleanly;
//!   and the attach template still starts when the daemon has already re-attached its volume
//!   (a boot after an unclean stop). The kernel NBD device itself cannot be bound here (no nbd
//!   module on the test machines, no udev in a container): `attach --device` is checked to get
//!   as far as the kernel's answer, and the template runs without `--device`.
//!
//! A missing tool fails the test with the Debian package to install (`systemd`,
//! `systemd-container`, `libnbd-bin`). Run as root (the container, the tmpfiles ownership).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::daemon::cryptnbd_bin;
use e2e_tests::{
    Outcome, TEST_DIRECTORY, TEST_SID, TestDir, TestRng, assert_bytes_eq, cryptnbdctl,
    require_tool, run, workspace_root,
};

/// The unit files the project ships, as named in `systemd/`.
const UNITS: [&str; 3] = [
    "cryptnbd.service",
    "cryptnbd-attach@.service",
    "cryptnbd-open@.service",
];

/// Where the units say the binaries are.
const BIN_DIR: &str = "usr/local/bin";

/// The limit for `systemd-analyze security` on the daemon unit.
const MAX_EXPOSURE: f64 = 2.5;

/// `systemd/` in the workspace.
fn systemd_dir() -> PathBuf {
    workspace_root().join("systemd")
}

fn systemd_analyze() -> PathBuf {
    require_tool("systemd-analyze", "systemd")
}

/// A file of systemd's own that is not on `PATH` (generators); fails the test naming the
/// package when absent.
fn systemd_file(candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "this test needs {}, which is not installed: install the Debian package systemd",
                candidates[0]
            )
        })
}

/// Asserts that a systemd tool succeeded and printed nothing (no warning, no cycle).
#[track_caller]
fn assert_quiet(out: &Outcome) {
    out.assert_success();
    let stdout = out.stdout_text();
    assert!(
        stdout.trim().is_empty() && out.stderr.trim().is_empty(),
        "`{}` printed something (a warning, an ordering cycle?):\n--- stdout:\n{stdout}\n--- stderr:\n{}",
        out.command,
        out.stderr
    );
}

/// Hard-links `src` to `dst` (the built binaries are large), or copies it across file systems.
#[track_caller]
fn link_or_copy(src: &Path, dst: &Path) {
    if fs::hard_link(src, dst).is_err() {
        fs::copy(src, dst)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", src.display(), dst.display()));
    }
}

/// Copies a directory tree, keeping symbolic links as links (unit aliases, `.wants/`).
#[track_caller]
fn copy_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap_or_else(|e| panic!("cannot create {}: {e}", dst.display()));
    let entries =
        fs::read_dir(src).unwrap_or_else(|e| panic!("cannot list {}: {e}", src.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", src.display()));
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry
            .file_type()
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", from.display()));
        if kind.is_symlink() {
            let target = fs::read_link(&from)
                .unwrap_or_else(|e| panic!("cannot read link {}: {e}", from.display()));
            std::os::unix::fs::symlink(&target, &to)
                .unwrap_or_else(|e| panic!("cannot link {}: {e}", to.display()));
        } else if kind.is_dir() {
            copy_tree(&from, &to);
        } else {
            fs::copy(&from, &to).unwrap_or_else(|e| {
                panic!("cannot copy {} to {}: {e}", from.display(), to.display())
            });
        }
    }
}

/// A directory with the built `cryptnbd` and `cryptnbdctl`.
#[track_caller]
fn binaries_in(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    link_or_copy(&cryptnbd_bin(), &dir.join("cryptnbd"));
    link_or_copy(&cryptnbdctl(), &dir.join("cryptnbdctl"));
}

/// A root for `systemd-analyze verify --root=`: this machine's unit tree (the units ours
/// depend on: modprobe@.service, blockdev@.target, remote-fs.target, ...), the built binaries
/// in /usr/local/bin, `kill` in /usr/bin, and our units in /etc/systemd/system.
#[track_caller]
fn verify_root(dir: &TestDir) -> PathBuf {
    let root = dir.join("root");
    let host_units = systemd_file(&["/usr/lib/systemd/system", "/lib/systemd/system"]);
    copy_tree(&host_units, &root.join("usr/lib/systemd/system"));
    binaries_in(&root.join(BIN_DIR));
    // ExecReload sends SIGHUP with procps's kill.
    let usr_bin = root.join("usr/bin");
    fs::create_dir_all(&usr_bin)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", usr_bin.display()));
    link_or_copy(&require_tool("kill", "procps"), &usr_bin.join("kill"));
    let etc = root.join("etc/systemd/system");
    fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("cannot create {}: {e}", etc.display()));
    for unit in UNITS {
        fs::copy(systemd_dir().join(unit), etc.join(unit))
            .unwrap_or_else(|e| panic!("cannot copy systemd/{unit}: {e}"));
    }
    root
}

/// `systemd-analyze verify --root=ROOT UNITS...`.
fn verify(root: &Path, units: &[&str]) -> Outcome {
    run(Command::new(systemd_analyze())
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units))
}

#[test]
fn units_pass_systemd_analyze_verify_with_the_binaries_where_they_say() {
    let dir = TestDir::new("systemd-verify");
    let root = verify_root(&dir);
    assert_quiet(&verify(
        &root,
        &[
            "cryptnbd.service",
            "cryptnbd-attach@nbd0.service",
            "cryptnbd-open@home.service",
        ],
    ));

    // The check has teeth: without the binaries where the units say, verify fails.
    fs::remove_file(root.join(BIN_DIR).join("cryptnbdctl")).expect("remove cryptnbdctl");
    let out = verify(&root, &["cryptnbd-attach@nbd0.service"]);
    out.assert_stderr_contains("/usr/local/bin/cryptnbdctl is not executable");
}

/// The lines of `systemd/fstab.example` that are fstab entries: the active one and the
/// commented-out alternatives (`#/dev/...`).
fn fstab_example_entries() -> Vec<String> {
    let path = systemd_dir().join("fstab.example");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| {
            let l = l.strip_prefix('#').unwrap_or(l);
            l.starts_with("/dev/").then(|| l.to_owned())
        })
        .collect()
}

/// Runs systemd-fstab-generator on a one-line fstab; returns the directory of units it made.
#[track_caller]
fn generate_mount_units(dir: &TestDir, name: &str, line: &str) -> PathBuf {
    let fstab = dir.join(&format!("{name}.fstab"));
    fs::write(&fstab, format!("{line}\n")).expect("write fstab");
    let out_dir = dir.join(&format!("{name}.generated"));
    for sub in ["normal", "early", "late"] {
        fs::create_dir_all(out_dir.join(sub)).expect("generator output directories");
    }
    let generator = systemd_file(&[
        "/usr/lib/systemd/system-generators/systemd-fstab-generator",
        "/lib/systemd/system-generators/systemd-fstab-generator",
    ]);
    run(Command::new(generator)
        .arg(out_dir.join("normal"))
        .arg(out_dir.join("early"))
        .arg(out_dir.join("late"))
        .env("SYSTEMD_FSTAB", &fstab)
        // Not this machine's kernel command line (root=, fstab=, ...).
        .env("SYSTEMD_PROC_CMDLINE", "")
        .env("SYSTEMD_IN_INITRD", "0"))
    .assert_success();
    out_dir.join("normal")
}

#[test]
fn fstab_example_lines_mount_after_their_units_with_no_ordering_cycle() {
    let entries = fstab_example_entries();
    assert!(
        entries.len() >= 2,
        "systemd/fstab.example should show the NBD and the dm-crypt way: {entries:?}"
    );
    for (i, line) in entries.iter().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [what, "/home", _fstype, options, ..] = fields[..] else {
            panic!("an example line that does not mount /home: {line}");
        };
        let unit = options
            .split(',')
            .find_map(|o| o.strip_prefix("x-systemd.requires="))
            .unwrap_or_else(|| panic!("no x-systemd.requires= in {line}"));
        assert!(
            options.split(',').any(|o| o == "_netdev"),
            "{line}: the volume needs the daemon (and maybe the network): _netdev"
        );

        let dir = TestDir::new("systemd-fstab");
        let generated = generate_mount_units(&dir, &format!("entry{i}"), line);
        let mount = fs::read_to_string(generated.join("home.mount"))
            .unwrap_or_else(|e| panic!("the generator made no home.mount for {line}: {e}"));
        // The device name as systemd escapes it in unit names: /dev/nbd0 -> dev-nbd0.
        let device = what.trim_start_matches('/').replace('/', "-");
        for expected in [
            format!("Requires={unit}"),
            format!("After={unit}"),
            format!("After=blockdev@{device}.target"),
            "Before=remote-fs.target".to_owned(),
        ] {
            assert!(
                mount.lines().any(|l| l == expected),
                "home.mount generated from `{line}` lacks {expected}:\n{mount}"
            );
        }

        // Our template orders itself before the same blockdev target the mount waits for.
        let template = unit.split_once('@').map(|(t, _)| format!("{t}@.service"));
        let template = template.unwrap_or_else(|| panic!("{unit} is not a template instance"));
        let text = fs::read_to_string(systemd_dir().join(&template))
            .unwrap_or_else(|e| panic!("cannot read systemd/{template}: {e}"));
        let prefix = if device.starts_with("dev-mapper-") {
            "blockdev@dev-mapper-%i.target"
        } else {
            "blockdev@dev-%i.target"
        };
        assert!(
            text.lines()
                .any(|l| l.starts_with("Before=") && l.contains(prefix)),
            "systemd/{template} is not ordered before {prefix}"
        );

        let root = verify_root(&dir);
        copy_tree(&generated, &root.join("etc/systemd/system"));
        assert_quiet(&verify(
            &root,
            &["home.mount", unit, "remote-fs.target", "multi-user.target"],
        ));
    }
}

/// The figure from "→ Overall exposure level for UNIT: 2.2 OK 🙂".
fn overall_exposure(stdout: &str) -> Option<f64> {
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn daemon_unit_exposure_is_at_most_2_5() {
    let unit = systemd_dir().join("cryptnbd.service");
    let out = run(Command::new(systemd_analyze())
        .arg("security")
        .arg("--offline=true")
        // Out of 100: the tool itself fails above 2.5.
        .arg("--threshold=25")
        .arg("--no-pager")
        .arg(&unit)
        .env("SYSTEMD_COLORS", "0"));
    let stdout = out.stdout_text();
    let exposure = overall_exposure(&stdout).unwrap_or_else(|| {
        panic!(
            "no overall exposure level in the output of `{}`:\n{stdout}\n{}",
            out.command, out.stderr
        )
    });
    eprintln!("systemd-analyze security --offline=true cryptnbd.service: {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "cryptnbd.service is rated {exposure}, above {MAX_EXPOSURE}:\n{stdout}"
    );
    out.assert_success();
}

#[test]
fn tmpfiles_entry_makes_the_directories_with_their_modes() {
    let dir = TestDir::new("systemd-tmpfiles");
    let root = dir.join("root");
    fs::create_dir_all(&root).expect("root");
    let tmpfiles = require_tool("systemd-tmpfiles", "systemd");
    assert_quiet(&run(Command::new(tmpfiles)
        .arg("--create")
        .arg(format!("--root={}", root.display()))
        .arg(systemd_dir().join("tmpfiles.d/cryptnbd.conf"))));
    for (path, mode) in [("var/lib/cryptnbd", 0o700), ("run/cryptnbd", 0o755)] {
        let meta = fs::metadata(root.join(path))
            .unwrap_or_else(|e| panic!("tmpfiles.d/cryptnbd.conf did not make /{path}: {e}"));
        assert!(meta.is_dir(), "/{path} is not a directory");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of /{path}");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "owner of /{path}");
    }
    let modules = fs::read_to_string(systemd_dir().join("modules-load.d/cryptnbd.conf"))
        .expect("systemd/modules-load.d/cryptnbd.conf");
    let names: Vec<&str> = modules
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(names, ["nbd"], "modules-load.d/cryptnbd.conf");
}

/// The `ExecStart=`/`ExecStop=` command lines of a unit file.
fn exec_lines(unit_text: &str) -> Vec<String> {
    unit_text
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once('=')?;
            matches!(
                key.trim(),
                "ExecStart" | "ExecStop" | "ExecStartPre" | "ExecStopPost"
            )
            .then(|| value.trim().to_owned())
        })
        .filter(|v| !v.is_empty())
        .collect()
}

#[test]
fn unit_command_lines_use_subcommands_and_flags_the_binaries_have() {
    let mut checked = 0;
    for unit in UNITS {
        let text = fs::read_to_string(systemd_dir().join(unit))
            .unwrap_or_else(|e| panic!("cannot read systemd/{unit}: {e}"));
        for line in exec_lines(&text) {
            let mut words = line.split_whitespace();
            let program = words
                .next()
                .map(|p| p.trim_start_matches(['-', '@', '+', '!', ':']))
                .unwrap_or_default();
            let name = program
                .strip_prefix("/usr/local/bin/")
                .unwrap_or_else(|| panic!("{unit}: {program} is not in /usr/local/bin"));
            let (bin, subcommand) = match name {
                "cryptnbd" => (cryptnbd_bin(), None),
                "cryptnbdctl" => (cryptnbdctl(), words.next()),
                other => panic!("{unit}: runs {other}, not one of ours"),
            };
            let mut help = Command::new(&bin);
            help.args(subcommand).arg("--help");
            let out = run(&mut help);
            assert!(
                out.code == Some(0),
                "{unit} runs `{line}`, but `{}` fails: {}",
                out.command,
                out.stderr
            );
            let help_text = out.stdout_text();
            for flag in words.filter(|w| w.starts_with("--")) {
                let flag = flag.split('=').next().unwrap_or(flag);
                let known = help_text
                    .split(|c: char| c.is_whitespace() || c == ',')
                    .any(|w| {
                        w == flag
                            || w.strip_prefix(flag)
                                .is_some_and(|r| r.starts_with(['=', '[', '<']))
                    });
                assert!(
                    known,
                    "{unit} runs `{line}`, but {name} {} has no {flag}:\n{help_text}",
                    subcommand.unwrap_or_default()
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "only {checked} command lines found in the units"
    );
}

// ---------------------------------------------------------------------------------------------
// The daemon under its unit, systemd as PID 1 in a container
// ---------------------------------------------------------------------------------------------

/// A `systemd-nspawn` container booted from this machine's `/usr` with a throw-away root
/// (`--volatile=yes`): nothing it does reaches the machine except through the bound paths.
/// Halted when dropped.
struct Container {
    nspawn: Child,
    /// The container's PID 1 (systemd), as this machine sees it.
    init: u32,
    log: PathBuf,
}

impl Container {
    /// Boots the container with `binds` (`--bind-ro=` or `--bind=` arguments) and waits until
    /// its systemd has finished starting up.
    #[track_caller]
    fn boot(dir: &TestDir, binds: &[String]) -> Self {
        let nspawn_bin = require_tool("systemd-nspawn", "systemd-container");
        let log = dir.join("container.log");
        let log_file = fs::File::create(&log).expect("container log");
        let log_err = log_file.try_clone().expect("container log");
        let nspawn = Command::new(nspawn_bin)
            .args([
                "--quiet",
                // No systemd on this machine to register with or to make a scope.
                "--keep-unit",
                "--register=no",
                "--directory=/",
                "--volatile=yes",
                "--console=pipe",
            ])
            .arg(format!("--machine={}", machine_name()))
            // Lets the unit's memory locking work where the machine's hard RLIMIT_MEMLOCK is
            // low (see memlock_drop_in); the unit's own bounding set still applies.
            .arg("--capability=CAP_IPC_LOCK")
            .args(binds)
            .args(["--boot", "--", "systemd.unit=basic.target"])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .expect("start systemd-nspawn");
        let mut c = Self {
            nspawn,
            init: 0,
            log,
        };
        c.wait_booted();
        c
    }

    #[track_caller]
    fn wait_booted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}) before the container booted:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if self.init == 0 {
                self.init = child_named(self.nspawn.id(), "systemd").unwrap_or(0);
            }
            if self.init != 0 {
                let state = self.sh("systemctl is-system-running").stdout_text();
                match state.trim() {
                    "running" => return,
                    "degraded" => {
                        let failed = self.sh("systemctl --failed --no-legend --plain");
                        eprintln!(
                            "the container booted degraded (not our units):\n{}",
                            failed.stdout_text()
                        );
                        return;
                    }
                    _ => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "the container did not finish booting within 120 s:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `script` with `sh -c` inside the container (all its namespaces), with a clean
    /// environment.
    fn sh(&self, script: &str) -> Outcome {
        run(Command::new("nsenter")
            .arg("--target")
            .arg(self.init.to_string())
            .arg("--all")
            .args(["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "sh", "-c"])
            .arg(script))
    }

    /// `sh` that must succeed; returns stdout.
    #[track_caller]
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        if out.code != Some(0) {
            let journal = self.sh("journalctl --no-pager -n 60 -o cat").stdout_text();
            panic!(
                "in the container, `{script}` exited with {:?}\n--- stdout:\n{}\n--- stderr:\n{}\n--- journal:\n{journal}",
                out.code,
                out.stdout_text(),
                out.stderr
            );
        }
        out.stdout_text()
    }

    /// `systemctl show -p NAME --value UNIT`.
    #[track_caller]
    fn property(&self, unit: &str, name: &str) -> String {
        self.ok(&format!("systemctl show -p {name} --value {unit}"))
            .trim()
            .to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // The first SIGTERM asks the container's systemd to halt; then give it time.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.nspawn.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// A machine name no other container of this test process has.
fn machine_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "cryptnbd-e2e-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A child process of `parent` whose command name is `name`.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces, so split at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map(|(_, c)| c).unwrap_or_default();
        let ppid = tail
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if comm == name && ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// A drop-in for this test machine only, or `None` when not needed. `LimitMEMLOCK=infinity`
/// takes effect only when the container's systemd may raise the limit (CAP_SYS_RESOURCE); on
/// a machine whose hard RLIMIT_MEMLOCK is low and whose root lacks CAP_SYS_RESOURCE (the
/// project's test VMs: 8 MiB), systemd settles for the hard limit and the daemon, which must
/// lock its memory as root, would refuse to start. The drop-in then adds CAP_IPC_LOCK to the
/// unit's bounding set.
fn memlock_drop_in() -> Option<&'static str> {
    let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let unlimited = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .is_some_and(|l| l.split_whitespace().nth(4) == Some("unlimited"));
    (!has_cap_sys_resource() && !unlimited).then_some(
        "# Test machine only: no CAP_SYS_RESOURCE to raise the hard RLIMIT_MEMLOCK.\n\
         [Service]\nCapabilityBoundingSet=CAP_IPC_LOCK\n",
    )
}

/// Capability numbers (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;

/// A booted container with the project's units, binaries and example configuration, and
/// `/etc/cryptnbd/attach/nbd0.conf` naming the volume `home`.
struct Installed {
    // First, so that a pattern binding every field drops it last (after the container).
    _dir: TestDir,
    c: Container,
    /// Bound read-write at /srv/e2e.
    work: PathBuf,
    /// The memory-lock drop-in was needed (CAP_IPC_LOCK is in the daemon's bounding set).
    memlock: bool,
}

/// Boots a container as [`Installed`] describes.
#[track_caller]
fn install_in_container(label: &str) -> Installed {
    install_in_container_with(label, &systemd_dir().join("cryptnbd.toml"), &[])
}

/// [`install_in_container`] with `config` as /etc/cryptnbd/cryptnbd.toml and more binds.
#[track_caller]
fn install_in_container_with(label: &str, config: &Path, more: &[String]) -> Installed {
    require_tool("nbdcopy", "libnbd-bin");
    assert!(
        fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0),
        "this test boots a container: run it as root"
    );
    let dir = TestDir::new(label);
    let bin = dir.join("bin");
    binaries_in(&bin);
    let daemon_d = dir.join("drop-ins/cryptnbd.service.d");
    let attach_d = dir.join("drop-ins/cryptnbd-attach@.service.d");
    fs::create_dir_all(&daemon_d).expect("drop-in dir");
    fs::create_dir_all(&attach_d).expect("drop-in dir");
    let memlock = memlock_drop_in();
    if let Some(text) = memlock {
        eprintln!("this machine's hard RLIMIT_MEMLOCK is low: adding CAP_IPC_LOCK for the test");
        fs::write(daemon_d.join("test-memlock.conf"), text).expect("drop-in");
    }
    // No nbd module here and no udev in a container: the template runs its own command line
    // without --device (its sandbox, ordering and stop are what is tested).
    fs::write(
        attach_d.join("test-no-kernel-device.conf"),
        "[Service]\nExecStart=\nExecStart=/usr/local/bin/cryptnbdctl attach ${VOLUME} $ATTACH_OPTIONS\n",
    )
    .expect("drop-in");
    let attach_conf = dir.join("attach");
    fs::create_dir_all(&attach_conf).expect("attach dir");
    fs::write(attach_conf.join("nbd0.conf"), "VOLUME=home\n").expect("attach conf");
    let work = dir.join("work");
    fs::create_dir_all(&work).expect("work dir");

    let s = systemd_dir();
    let ro = |host: &Path, inside: &str| format!("--bind-ro={}:{inside}", host.display());
    let mut binds = vec![
        ro(&bin, "/usr/local/bin"),
        ro(config, "/etc/cryptnbd/cryptnbd.toml"),
        ro(
            &s.join("tmpfiles.d/cryptnbd.conf"),
            "/etc/tmpfiles.d/cryptnbd.conf",
        ),
        ro(&daemon_d, "/etc/systemd/system/cryptnbd.service.d"),
        ro(&attach_d, "/etc/systemd/system/cryptnbd-attach@.service.d"),
        ro(&attach_conf, "/etc/cryptnbd/attach"),
        format!("--bind={}:/srv/e2e", work.display()),
        // Masked: it wants a terminal and only makes the boot "degraded".
        "--bind-ro=/dev/null:/etc/systemd/system/systemd-firstboot.service".to_owned(),
    ];
    for unit in UNITS {
        binds.push(ro(&s.join(unit), &format!("/etc/systemd/system/{unit}")));
    }
    binds.extend_from_slice(more);
    let c = Container::boot(&dir, &binds);
    Installed {
        _dir: dir,
        c,
        work,
        memlock: memlock.is_some(),
    }
}

/// Creates the volume `home` (16 MiB) on a new local KMS key, inside the container.
#[track_caller]
fn create_home(c: &Container) {
    c.ok("cryptnbdctl kms create-key --alias alias/e2e");
    c.ok(&format!(
        "cryptnbdctl create home --size 16M --kms-key alias/e2e --sid {TEST_SID} --directory {TEST_DIRECTORY}"
    ));
}

/// Waits until `unit` is active with a main process other than `old_pid`.
#[track_caller]
fn wait_restarted(c: &Container, unit: &str, old_pid: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pid = c.property(unit, "MainPID");
        if c.property(unit, "ActiveState") == "active" && pid != "0" && pid != old_pid {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{unit} was not restarted within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn daemon_runs_under_its_unit_with_systemd_as_pid_1() {
    let Installed {
        _dir,
        c,
        work,
        memlock,
    } = install_in_container("systemd-container");
    let data = TestRng::new(0x5ec0_0de5).bytes(8 << 20);
    fs::write(work.join("data"), &data).expect("data");

    // tmpfiles.d made the directories at boot.
    assert_eq!(
        c.ok("stat -c '%a %U' /var/lib/cryptnbd /run/cryptnbd"),
        "700 root\n755 root\n"
    );

    // Type=notify: `start` returns once the daemon said READY=1.
    c.ok("systemctl start cryptnbd.service");
    assert_eq!(c.property("cryptnbd.service", "SubState"), "running");
    let main_pid = c.property("cryptnbd.service", "MainPID");
    let status = c.ok(&format!("cat /proc/{main_pid}/status"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in /proc/PID/status:\n{status}"))
            .to_owned()
    };
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "the system call filter is on");
    let bounding = u64::from_str_radix(&field("CapBnd:"), 16).expect("CapBnd is hex");
    let mut allowed = (1u64 << CAP_SYS_ADMIN) | (1 << CAP_SYS_RESOURCE);
    if memlock {
        allowed |= 1 << CAP_IPC_LOCK;
    }
    assert_eq!(
        bounding & !allowed,
        0,
        "capabilities beyond CAP_SYS_ADMIN and CAP_SYS_RESOURCE: {bounding:#x}"
    );
    let limits = c.ok(&format!("cat /proc/{main_pid}/limits"));
    assert!(
        limits.lines().any(
            |l| l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")
        ),
        "core dumps are not off:\n{limits}"
    );

    // What the daemon may write, seen from inside its mount namespace.
    let probe = |path: &str| {
        c.sh(&format!(
            "nsenter --target {main_pid} --mount sh -c 'touch {path}/.probe && rm {path}/.probe'"
        ))
        .code
            == Some(0)
    };
    for path in ["/var/lib/cryptnbd", "/run/cryptnbd", "/tmp"] {
        assert!(probe(path), "the daemon cannot write {path}");
    }
    for path in ["/etc", "/usr", "/var/lib", "/run", "/root"] {
        assert!(!probe(path), "the daemon can write {path}");
    }

    // A volume through the sandbox: local KMS, create, attach, write and read over NBD, a
    // snapshot (copy_file_range / FICLONE).
    let uri = "'nbd+unix:///home?socket=/run/cryptnbd/nbd.sock'";
    create_home(&c);
    c.ok("cryptnbdctl attach home");
    c.ok(&format!("nbdcopy /srv/e2e/data {uri}"));
    c.ok("cryptnbdctl snapshot home s1");
    c.ok(&format!("nbdcopy {uri} /srv/e2e/back1"));
    let back = fs::read(work.join("back1")).expect("back1");
    assert_bytes_eq(&back[..data.len()], &data, "read back through the unit");

    // A restart: the attachment is saved and re-attached before READY=1.
    c.ok("systemctl restart cryptnbd.service");
    assert!(
        c.ok("cryptnbdctl status").contains("home"),
        "home is not re-attached after a restart"
    );
    c.ok(&format!("nbdcopy {uri} /srv/e2e/back2"));
    let back = fs::read(work.join("back2")).expect("back2");
    assert_bytes_eq(&back[..data.len()], &data, "read back after a restart");

    // The kernel device path goes through the sandbox as far as this machine allows: the
    // netlink socket and the generic-netlink family lookup (no nbd module here: the daemon
    // says so; a filtered call or address family would say EPERM or EAFNOSUPPORT instead).
    c.ok("cryptnbdctl detach home");
    c.ok(&format!(
        "cryptnbdctl create home2 --size 16M --kms-key alias/e2e --sid {TEST_SID} --directory {TEST_DIRECTORY}"
    ));
    let kernel = c.sh("cryptnbdctl attach home2 --device /dev/nbd0");
    match kernel.code {
        Some(0) => {
            c.ok("cryptnbdctl detach home2");
        }
        _ => assert!(
            kernel.stderr.contains("no generic-netlink family \"nbd\""),
            "attach --device failed for another reason than a missing nbd module:\n{}",
            kernel.stderr
        ),
    }

    // The attach template: its own sandbox and its blockdev target.
    c.ok("systemctl start cryptnbd-attach@nbd0.service");
    assert_eq!(
        c.property("cryptnbd-attach@nbd0.service", "ActiveState"),
        "active"
    );
    assert_eq!(
        c.property("blockdev@dev-nbd0.target", "ActiveState"),
        "active"
    );
    assert!(
        c.ok("cryptnbdctl status").contains("home"),
        "the attach unit did not attach home"
    );

    // A crash: Restart=on-failure brings the daemon back, it re-attaches home, and the attach
    // unit (Wants=, not BindsTo=) stays active, as a mount on the device would.
    let old = c.property("cryptnbd.service", "MainPID");
    c.ok("systemctl kill --signal=SIGKILL cryptnbd.service");
    wait_restarted(&c, "cryptnbd.service", &old);
    assert!(
        c.ok("cryptnbdctl status").contains("home"),
        "home is not re-attached after a crash"
    );
    assert_eq!(
        c.property("cryptnbd-attach@nbd0.service", "ActiveState"),
        "active"
    );

    // Shutdown order: the attach unit detaches, then the daemon stops cleanly.
    c.ok("systemctl stop cryptnbd-attach@nbd0.service cryptnbd.service");
    for unit in ["cryptnbd-attach@nbd0.service", "cryptnbd.service"] {
        assert_eq!(c.property(unit, "ActiveState"), "inactive", "{unit}");
        assert_eq!(c.property(unit, "Result"), "success", "{unit}");
    }
    let attach_log = c.ok("journalctl --no-pager -o cat -u cryptnbd-attach@nbd0.service");
    assert!(
        attach_log.contains("detached home"),
        "the attach unit's ExecStop did not detach:\n{attach_log}"
    );

    // Nothing the sandbox refused (a filtered system call fails with EPERM). Known lines: the
    // missing nbd module, and PR_SET_IO_FLUSHER on a machine without CAP_SYS_RESOURCE.
    let daemon_log = c.ok("journalctl --no-pager -o cat -u cryptnbd.service");
    let unexpected: Vec<&str> = daemon_log
        .lines()
        .filter(|l| {
            [
                "ERROR",
                "WARN",
                "Operation not permitted",
                "Permission denied",
            ]
            .iter()
            .any(|bad| l.contains(bad))
        })
        .filter(|l| !l.contains("no generic-netlink family"))
        .filter(|l| has_cap_sys_resource() || !l.contains("PR_SET_IO_FLUSHER"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the daemon's journal under its unit has:\n{}",
        unexpected.join("\n")
    );
}

/// A boot after a crash or a power cut: the daemon re-attaches the saved attachment by
/// itself at start, before the attach unit runs. The unit must still succeed (as
/// systemd-cryptsetup@ does for a volume already open), or the mount that requires it fails.
#[test]
fn attach_unit_succeeds_when_the_daemon_already_reattached_the_volume() {
    let Installed { _dir, c, .. } = install_in_container("systemd-reattach");
    c.ok("systemctl start cryptnbd.service");
    create_home(&c);
    // What the daemon does at start from attachments.json: the same request as the unit's.
    c.ok("cryptnbdctl attach home");
    let out = c.sh("systemctl start cryptnbd-attach@nbd0.service");
    let log = c
        .sh("journalctl --no-pager -o cat -u cryptnbd-attach@nbd0.service")
        .stdout_text();
    assert!(
        out.code == Some(0),
        "cryptnbd-attach@nbd0.service fails when home is already attached as it asks (after \
         an unclean stop the daemon re-attaches it before the unit runs): `cryptnbdctl attach` \
         should succeed when the volume is already attached with the same device:\n{log}"
    );
    assert_eq!(
        c.property("cryptnbd-attach@nbd0.service", "ActiveState"),
        "active"
    );
}

/// cryptnbd.service's sandbox and system-call filter with an RBD store: the daemon, under
/// its unit with systemd as PID 1, reads /etc/ceph/ceph.conf, reaches a real cluster over the
/// network, and creates, attaches and serves a volume in the pool through a real NBD client.
#[test]
fn daemon_unit_serves_an_rbd_volume_from_its_sandbox() {
    let dir = TestDir::new("systemd-rbd-cluster");
    let cluster = e2e_tests::ceph::Cluster::start(&dir);
    // A client's ceph.conf: the cluster's own names its daemons' files.
    let conf_text = fs::read_to_string(&cluster.conf).expect("ceph.conf");
    let mon = conf_text
        .lines()
        .find(|l| l.starts_with("mon host"))
        .expect("mon host");
    let client_conf = dir.join("client.conf");
    fs::write(
        &client_conf,
        format!("[global]\n{mon}\nauth client required = none\n"),
    )
    .expect("client conf");
    let config = dir.join("cryptnbd.toml");
    fs::write(
        &config,
        format!(
            "{}\n[store]\ndefault = \"rbd\"\n[store.rbd]\nconf = \"/etc/ceph/ceph.conf\"\n\
             pool = \"{}\"\nid = \"admin\"\ntimeout_secs = 20\n",
            fs::read_to_string(systemd_dir().join("cryptnbd.toml")).expect("example config"),
            cluster.pool
        ),
    )
    .expect("config");
    let binds = [format!(
        "--bind-ro={}:/etc/ceph/ceph.conf",
        client_conf.display()
    )];
    let Installed { _dir, c, work, .. } = install_in_container_with("systemd-rbd", &config, &binds);
    let data = TestRng::new(0x0cef_0001).bytes(4 << 20);
    fs::write(work.join("data"), &data).expect("data");
    c.ok("systemctl start cryptnbd.service");
    create_home(&c);
    let listed = c.ok("cryptnbdctl --json list");
    assert!(listed.contains("\"store\": \"rbd\""), "{listed}");
    c.ok("cryptnbdctl attach home");
    let uri = "'nbd+unix:///home?socket=/run/cryptnbd/nbd.sock'";
    c.ok(&format!("nbdcopy /srv/e2e/data {uri}"));
    c.ok(&format!("nbdcopy {uri} /srv/e2e/back"));
    let back = fs::read(work.join("back")).expect("read back");
    assert!(back[..data.len()] == data[..], "the RBD volume lost data");
    c.ok("cryptnbdctl detach home");
    let ls = cluster.rbd_ok(&["ls", &cluster.pool]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "home");
    c.ok("systemctl stop cryptnbd.service");
}
