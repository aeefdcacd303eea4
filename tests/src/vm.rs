//! The VM test rig: a stock Debian 12 kernel (which has the kernel NBD client, `nbd.ko`, and
//! dm-crypt, unlike the kernels CI machines run) booted under qemu's emulation (TCG) with an
//! initramfs made by `tests/vm/build-rig.sh`: busybox, the guest tools, our release binaries
//! and the guest scripts of `tests/vm/guest/`.
//!
//! A test boots the VM with one scenario (`tests/vm/guest/scenario-NAME.sh`) named on the
//! kernel command line. The guest's `/init` runs it and prints exactly one marker line on
//! the serial console, `CRYPTNBD-VM: PASS NAME` or `CRYPTNBD-VM: FAIL NAME: REASON`, then
//! powers off. The serial log is kept in the test's directory and, to outlive it, in
//! `target/vm-rig/logs/NAME.log`.
//!
//! Nothing is skipped: a missing host tool, a missing release binary, a rig that does not
//! build, a VM that does not finish in time all fail the test with what is missing or the
//! end of the serial log. VMs run one at a time (each emulates two CPUs).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::{TestDir, newest_mtime, run, target_dir, workspace_root};

/// The prefix of every line the guest prints for the host to read.
pub const MARKER: &str = "CRYPTNBD-VM: ";
/// How many lines of the serial log a failure shows.
const TAIL_LINES: usize = 60;
/// The guest gives up on its scenario this long before the host kills the VM, so that a
/// scenario that runs too long still ends with a FAIL line naming it.
const GUEST_MARGIN: Duration = Duration::from_secs(30);

/// A built rig: what `tests/vm/build-rig.sh` wrote to `rig.env`.
#[derive(Debug, Clone)]
pub struct Rig {
    /// The unpacked `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `LD_LIBRARY_PATH` for it (the libraries unpacked next to it).
    pub qemu_ld_library_path: String,
    /// `QEMU_MODULE_DIR` (the TCG accelerator is a module).
    pub qemu_module_dir: PathBuf,
    /// Directories of qemu's firmware (`-L`): its data and SeaBIOS.
    pub firmware_dirs: Vec<PathBuf>,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs, with this build's binaries.
    pub initrd: PathBuf,
    /// The guest kernel's release (`uname -r`).
    pub kernel_release: String,
}

/// The rig, built once per test process: runs `tests/vm/build-rig.sh` with the release
/// binaries. Fails the test (every test that asks, each time) if it cannot be built.
pub fn rig() -> &'static Rig {
    static RIG: OnceLock<Result<Rig, String>> = OnceLock::new();
    match RIG.get_or_init(build_rig) {
        Ok(rig) => rig,
        Err(msg) => panic!("{msg}"),
    }
}

/// Where the rig's per-build files (initramfs, rig.env, the last serial logs) go.
pub fn rig_dir() -> PathBuf {
    target_dir().join("vm-rig")
}

/// A release binary of the workspace, for the guest. Fails when it has not been built, and
/// warns when a source file of the workspace is newer.
fn release_bin(name: &str) -> Result<PathBuf, String> {
    let bin = target_dir().join("release").join(name);
    let built = fs::metadata(&bin).and_then(|m| m.modified()).map_err(|_| {
        format!(
            "{} is missing: the VM tests put the release binaries in the guest, build them \
                 first with `cargo build --release -p daemon -p ctl` (scripts/test-all.sh does)",
            bin.display()
        )
    })?;
    let root = workspace_root();
    let newest = [
        "nbd",
        "kms-client",
        "volume",
        "control-api",
        "daemon",
        "ctl",
    ]
    .iter()
    .filter_map(|c| newest_mtime(&root.join(c).join("src")))
    .max();
    if newest.is_some_and(|n| n > built) {
        eprintln!(
            "warning: {} is older than its sources: run `cargo build --release -p daemon -p ctl` \
             so the VM tests exercise the current code",
            bin.display()
        );
    }
    Ok(bin)
}

fn build_rig() -> Result<Rig, String> {
    let daemon = release_bin("cryptnbd")?;
    let ctl = release_bin("cryptnbdctl")?;
    let script = workspace_root().join("tests/vm/build-rig.sh");
    let out_dir = rig_dir();
    let started = Instant::now();
    let out = run(Command::new("bash")
        .arg(&script)
        .arg(&out_dir)
        .arg(&daemon)
        .arg(&ctl));
    if out.code != Some(0) {
        return Err(format!(
            "the VM rig did not build: `{}` exited with {:?}\n--- its output:\n{}{}",
            out.command,
            out.code,
            out.stdout_text(),
            out.stderr
        ));
    }
    eprintln!(
        "vm: rig ready in {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        out.stderr.trim_end()
    );
    let env_file = out_dir.join("rig.env");
    let text = fs::read_to_string(&env_file).map_err(|e| {
        format!(
            "build-rig.sh succeeded but {} cannot be read: {e}",
            env_file.display()
        )
    })?;
    parse_rig_env(&text).map_err(|e| format!("{}: {e}", env_file.display()))
}

/// Parses the `KEY=VALUE` lines of `rig.env`.
fn parse_rig_env(text: &str) -> Result<Rig, String> {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(str::to_owned)
            .ok_or_else(|| format!("no {key}= line"))
    };
    let rig = Rig {
        qemu: get("QEMU")?.into(),
        qemu_ld_library_path: get("QEMU_LD_LIBRARY_PATH")?,
        qemu_module_dir: get("QEMU_MODULE_DIR")?.into(),
        firmware_dirs: get("QEMU_FIRMWARE_DIRS")?
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect(),
        kernel: get("KERNEL")?.into(),
        initrd: get("INITRD")?.into(),
        kernel_release: get("KERNEL_RELEASE")?,
    };
    for p in [&rig.qemu, &rig.kernel, &rig.initrd] {
        if !p.exists() {
            return Err(format!("{} does not exist", p.display()));
        }
    }
    Ok(rig)
}

/// One boot of the VM: the scenario, its parameters, networking, the time it may take.
#[derive(Debug, Clone)]
pub struct Scenario {
    name: String,
    params: Vec<(String, String)>,
    net: bool,
    timeout: Duration,
    /// Files put in the guest: its path (under `/cryptnbd-vm/`), the host file.
    files: Vec<(String, PathBuf)>,
}

impl Scenario {
    /// `tests/vm/guest/scenario-NAME.sh`, without networking, within 5 minutes.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            params: Vec::new(),
            net: false,
            timeout: Duration::from_secs(300),
            files: Vec::new(),
        }
    }

    /// Puts the host file `host` in the guest as `/cryptnbd-vm/files/NAME` (certificates, for
    /// instance: too large for the kernel command line).
    pub fn file(mut self, name: &str, host: &Path) -> Self {
        self.files.push((name.to_owned(), host.to_path_buf()));
        self
    }

    /// A parameter: `cryptnbd.KEY=VALUE` on the kernel command line, `VM_KEY` in the guest.
    pub fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push((key.to_owned(), value.to_string()));
        self
    }

    /// A virtio NIC on qemu's user networking: the guest is 10.0.2.15 and reaches the host's
    /// 127.0.0.1 as 10.0.2.2.
    pub fn with_network(mut self) -> Self {
        self.net = true;
        self
    }

    /// How long the whole boot may take before the VM is killed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The scenario's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn kernel_command_line(&self) -> String {
        let guest_timeout = self
            .timeout
            .saturating_sub(GUEST_MARGIN)
            .max(Duration::from_secs(10));
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 quiet loglevel=3 cryptnbd.scenario={} cryptnbd.timeout={}",
            self.name,
            guest_timeout.as_secs()
        );
        if self.net {
            cmdline.push_str(" cryptnbd.net=1");
        }
        for (k, v) in &self.params {
            cmdline.push_str(&format!(" cryptnbd.{k}={v}"));
        }
        cmdline
    }
}

/// Only one VM at a time: each emulates two CPUs on machines that have about two.
fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A test that panicked while holding the lock has killed its VM (Vm's Drop).
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running VM.
pub struct Vm {
    child: Option<Child>,
    scenario: Scenario,
    log: PathBuf,
    started: Instant,
    _turn: MutexGuard<'static, ()>,
}

impl Vm {
    /// Boots the VM on `scenario`, its serial console logged to `dir/serial-NAME.log`.
    /// Waits for the other VMs of this process to finish first.
    #[track_caller]
    pub fn start(dir: &TestDir, scenario: &Scenario) -> Self {
        let rig = rig();
        let turn = vm_lock();
        let log = dir.join(&format!("serial-{}.log", scenario.name));
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let log_err = log_file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate the handle of {}: {e}", log.display()));
        let mut cmd = Command::new(&rig.qemu);
        cmd.env("LD_LIBRARY_PATH", &rig.qemu_ld_library_path)
            .env("QEMU_MODULE_DIR", &rig.qemu_module_dir);
        for dir in &rig.firmware_dirs {
            cmd.arg("-L").arg(dir);
        }
        cmd.args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2048",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ]);
        if scenario.net {
            cmd.args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
            ]);
        } else {
            cmd.args(["-nic", "none"]);
        }
        let initrd = if scenario.files.is_empty() {
            rig.initrd.clone()
        } else {
            let initrd = dir.join(&format!("initrd-{}.img", scenario.name));
            with_files(&rig.initrd, &scenario.files, &initrd);
            initrd
        };
        cmd.arg("-kernel")
            .arg(&rig.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(scenario.kernel_command_line());
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", rig.qemu.display()));
        eprintln!(
            "vm: booting scenario {} (kernel {}), serial log {}",
            scenario.name,
            rig.kernel_release,
            log.display()
        );
        Self {
            child: Some(child),
            scenario: scenario.clone(),
            log,
            started: Instant::now(),
            _turn: turn,
        }
    }

    /// Waits for the VM to power off (within the scenario's timeout).
    #[track_caller]
    pub fn wait(self) -> VmRun {
        self.wait_observing(|| {})
    }

    /// Waits for the VM to power off, calling `observe` about every 200 ms meanwhile (to
    /// watch the host side while the guest works). Kills the VM and fails the test, with the
    /// end of the serial log, when the scenario's timeout passes.
    #[track_caller]
    pub fn wait_observing(mut self, mut observe: impl FnMut()) -> VmRun {
        let deadline = self.started + self.scenario.timeout;
        let mut child = self
            .child
            .take()
            .expect("the VM is running until waited for");
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => panic!("cannot wait for qemu: {e}"),
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = read_log(&self.log);
                keep_log(&self.scenario.name, &log);
                let reported = match verdict(&log, &self.scenario.name) {
                    Verdict::Pass => " after the guest reported PASS".to_owned(),
                    Verdict::Fail(reason) => format!(" after the guest reported FAIL: {reason}"),
                    Verdict::Missing => String::new(),
                };
                panic!(
                    "the VM running scenario {} did not power off within {} s{reported}: killed\n{}",
                    self.scenario.name,
                    self.scenario.timeout.as_secs(),
                    tail(&log, &self.log)
                );
            }
            observe();
            std::thread::sleep(Duration::from_millis(200));
        };
        let log = read_log(&self.log);
        keep_log(&self.scenario.name, &log);
        let run = VmRun {
            scenario: self.scenario.name.clone(),
            log,
            log_path: self.log.clone(),
            elapsed: self.started.elapsed(),
            qemu_status: status.code(),
        };
        eprintln!(
            "vm: scenario {} ran {:.1} s (guest init after {} s), qemu exit {:?}",
            run.scenario,
            run.elapsed.as_secs_f64(),
            run.init_uptime().unwrap_or("?"),
            run.qemu_status
        );
        run
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes `out`: the initramfs `base`, then (at a 4-byte boundary; the kernel skips the zero
/// padding between archives) an uncompressed newc cpio archive holding `files` under
/// `cryptnbd-vm/files/`.
#[track_caller]
fn with_files(base: &Path, files: &[(String, PathBuf)], out: &Path) {
    let mut image =
        fs::read(base).unwrap_or_else(|e| panic!("cannot read {}: {e}", base.display()));
    image.resize(image.len().next_multiple_of(4), 0);
    let mut ino = 0x00c0_0000u32;
    let mut entry = |image: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        ino += 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).expect("a small file"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("a short name"),
            0,
        ];
        image.extend_from_slice(b"070701");
        for f in fields {
            image.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        image.extend_from_slice(name.as_bytes());
        image.push(0);
        image.resize(image.len().next_multiple_of(4), 0);
        image.extend_from_slice(data);
        image.resize(image.len().next_multiple_of(4), 0);
    };
    entry(&mut image, "cryptnbd-vm/files", 0o040_755, &[]);
    for (name, host) in files {
        let data = fs::read(host).unwrap_or_else(|e| panic!("cannot read {}: {e}", host.display()));
        entry(
            &mut image,
            &format!("cryptnbd-vm/files/{name}"),
            0o100_600,
            &data,
        );
    }
    entry(&mut image, "TRAILER!!!", 0, &[]);
    fs::write(out, image).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_else(|e| format!("(cannot read the serial log {}: {e})", path.display()))
}

/// A copy of the serial log in `target/vm-rig/logs/`, which outlives the test's directory.
fn keep_log(scenario: &str, log: &str) {
    let dir = rig_dir().join("logs");
    if fs::create_dir_all(&dir).is_ok() {
        let _ = fs::write(dir.join(format!("{scenario}.log")), log);
    }
}

/// The last lines of the serial log, for failure messages.
fn tail(log: &str, path: &Path) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(TAIL_LINES);
    format!(
        "--- last {} lines of the serial log {} (a copy stays in {}):\n{}",
        lines.len() - from,
        path.display(),
        rig_dir().join("logs").display(),
        lines[from..].join("\n")
    )
}

/// What the guest reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `CRYPTNBD-VM: PASS NAME`.
    Pass,
    /// `CRYPTNBD-VM: FAIL NAME: REASON`.
    Fail(String),
    /// No marker line for the scenario.
    Missing,
}

/// The guest's verdict on `scenario` in a serial log: its marker line (the first one that
/// names it).
pub fn verdict(log: &str, scenario: &str) -> Verdict {
    let pass = format!("PASS {scenario}");
    let fail = format!("FAIL {scenario}: ");
    for m in markers(log) {
        if m == pass {
            return Verdict::Pass;
        }
        if let Some(reason) = m.strip_prefix(&fail) {
            return Verdict::Fail(reason.to_owned());
        }
    }
    Verdict::Missing
}

/// Every marker line of a serial log, without the marker prefix (a kernel message may have
/// begun the line: the marker is found anywhere in it).
pub fn markers(log: &str) -> impl Iterator<Item = &str> {
    log.lines().filter_map(|l| {
        l.find(MARKER)
            .map(|i| l[i + MARKER.len()..].trim_end_matches(['\r', ' ']))
    })
}

/// A finished VM.
#[derive(Debug, Clone)]
pub struct VmRun {
    /// The scenario it ran.
    pub scenario: String,
    /// Its serial log (carriage returns removed).
    pub log: String,
    /// Where the log is.
    pub log_path: PathBuf,
    /// From qemu's start to its exit.
    pub elapsed: Duration,
    /// qemu's exit code.
    pub qemu_status: Option<i32>,
}

impl VmRun {
    /// Asserts that the guest printed `CRYPTNBD-VM: PASS NAME`; otherwise fails with its
    /// FAIL reason (or the absence of a marker) and the end of the serial log.
    #[track_caller]
    pub fn assert_pass(&self) -> &Self {
        match verdict(&self.log, &self.scenario) {
            Verdict::Pass => self,
            Verdict::Fail(reason) => panic!(
                "scenario {} failed in the VM: {reason}\n{}",
                self.scenario,
                tail(&self.log, &self.log_path)
            ),
            Verdict::Missing => panic!(
                "scenario {} printed no PASS/FAIL line (qemu exited with {:?}; a kernel panic \
                 or a crash of /init?)\n{}",
                self.scenario,
                self.qemu_status,
                tail(&self.log, &self.log_path)
            ),
        }
    }

    /// The marker lines that start with `kind ` (e.g. `SUM`), without the kind.
    pub fn reports(&self, kind: &str) -> Vec<String> {
        let prefix = format!("{kind} ");
        markers(&self.log)
            .filter_map(|m| m.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }

    /// The guest's uptime when /init logged its first line (boot time), as printed (the
    /// line may begin with the firmware's terminal escapes).
    pub fn init_uptime(&self) -> Option<&str> {
        self.log
            .lines()
            .find(|l| l.contains("] init: kernel "))
            .and_then(|l| l.find("[vm ").map(|i| &l[i + "[vm ".len()..]))
            .and_then(|l| l.split_once("s]"))
            .map(|(t, _)| t)
    }
}

/// Boots the VM on `scenario` and asserts that it passes.
#[track_caller]
pub fn run_scenario(dir: &TestDir, scenario: &Scenario) -> VmRun {
    let run = Vm::start(dir, scenario).wait();
    run.assert_pass();
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_from_the_marker_lines() {
        let log = "[vm 1.0s] init: kernel 6.1\r\nnoise CRYPTNBD-VM: SUM abc f1\n\
                   [  5.1] nbd: x CRYPTNBD-VM: FAIL home: mkfs exited with 1\n";
        assert_eq!(
            verdict(log, "home"),
            Verdict::Fail("mkfs exited with 1".into())
        );
        assert_eq!(verdict(log, "crash"), Verdict::Missing);
        assert_eq!(
            verdict("x\nCRYPTNBD-VM: PASS home\r\n", "home"),
            Verdict::Pass
        );
        // A scenario whose name is a prefix of another's is not taken for it.
        assert_eq!(
            verdict("CRYPTNBD-VM: PASS home2\n", "home"),
            Verdict::Missing
        );
        assert_eq!(markers(log).count(), 2);
    }

    #[test]
    fn the_command_line_carries_the_scenario_and_its_parameters() {
        let s = Scenario::new("host-tcp")
            .with_network()
            .param("port", 10809)
            .timeout(Duration::from_secs(100));
        let cmdline = s.kernel_command_line();
        assert!(
            cmdline.contains(" cryptnbd.scenario=host-tcp "),
            "{cmdline}"
        );
        assert!(cmdline.contains(" cryptnbd.timeout=70"), "{cmdline}");
        assert!(cmdline.contains(" cryptnbd.net=1"), "{cmdline}");
        assert!(cmdline.ends_with(" cryptnbd.port=10809"), "{cmdline}");
    }

    #[test]
    fn rig_env_needs_every_key() {
        let err = parse_rig_env("QEMU=/bin/sh\n").expect_err("incomplete rig.env");
        assert!(err.contains("QEMU_LD_LIBRARY_PATH"), "{err}");
    }
}
