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
//! Root boots ([`RootBoot`], [`Vm::start_root`]) boot the same kernel the stock way instead:
//! the initramfs that Debian's initramfs-tools built in the cached Debian 12 root of
//! `tests/vm/build-root.sh` ([`debian_root`]), and systemd 252 as PID 1 on an ext4 root made
//! from that tree ([`root_image`]), on virtio disks that are image files or exports of an NBD
//! server on the host. The image's test unit (`tests/vm/root/`) reports on a marker disk,
//! read after the VM is off, and powers the VM off.
//!
//! Nothing is skipped: a missing host tool, a missing release binary, a rig that does not
//! build, a VM that does not finish in time all fail the test with what is missing or the
//! end of the serial log. VMs run one at a time (each emulates two CPUs).

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
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
    /// The kernel's config and a subset of its modules, for the Debian root.
    pub kernel_tree: PathBuf,
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
        kernel_tree: get("KERNEL_TREE")?.into(),
    };
    for p in [&rig.qemu, &rig.kernel, &rig.initrd, &rig.kernel_tree] {
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
    /// Virtio disks, `/dev/vda` first: the guest's own storage for the scenarios that need
    /// one to outlive the boot (the initramfs is RAM).
    disks: Vec<Disk>,
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
            disks: Vec::new(),
        }
    }

    /// The next virtio disk (`/dev/vda` first). The scenario's initramfs gets the kernel's
    /// `virtio_blk.ko` (not in the rig's base image), which the guest's `/init` loads.
    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
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

/// What one qemu run is made of, whichever kind of boot asked for it.
struct Launch {
    /// The boot's name: the serial log's and the marker disk's file names.
    name: String,
    initrd: PathBuf,
    cmdline: String,
    net: bool,
    disks: Vec<Disk>,
    /// The marker disk (attached last, serial `cryptnbd-marker`), read when the VM is off.
    marker: Option<PathBuf>,
    timeout: Duration,
    /// Pipe qemu's stdin (the serial console's input) for [`Vm::type_line_after`].
    serial_input: bool,
    /// Texts that end the boot as a failure as soon as the serial log shows them.
    fail_on: Vec<String>,
}

/// A running VM.
pub struct Vm {
    child: Option<Child>,
    /// The serial console's input, when the boot asked for it.
    stdin: Option<ChildStdin>,
    name: String,
    timeout: Duration,
    log: PathBuf,
    marker: Option<PathBuf>,
    fail_on: Vec<String>,
    /// How much of the serial log [`Vm::type_line_after`] has consumed: each wait looks
    /// only at what came after the text the previous one waited for.
    seen_upto: usize,
    started: Instant,
    _turn: MutexGuard<'static, ()>,
}

impl Vm {
    /// Boots the VM on `scenario`, its serial console logged to `dir/serial-NAME.log`.
    /// Waits for the other VMs of this process to finish first.
    #[track_caller]
    pub fn start(dir: &TestDir, scenario: &Scenario) -> Self {
        let rig = rig();
        let mut files = scenario.files.clone();
        if !scenario.disks.is_empty() {
            // `/init` loads every `files/*.ko` after the base image's modules.
            files.push((VIRTIO_BLK.to_owned(), virtio_blk_module(rig)));
        }
        let initrd = if files.is_empty() {
            rig.initrd.clone()
        } else {
            let initrd = dir.join(&format!("initrd-{}.img", scenario.name));
            with_files(&rig.initrd, &files, &initrd);
            initrd
        };
        Self::launch(
            dir,
            Launch {
                name: scenario.name.clone(),
                initrd,
                cmdline: scenario.kernel_command_line(),
                net: scenario.net,
                disks: scenario.disks.clone(),
                marker: None,
                timeout: scenario.timeout,
                serial_input: false,
                fail_on: Vec::new(),
            },
        )
    }

    /// Boots the rig's kernel the stock way on `boot`: the Debian root's initramfs (unless
    /// the boot names another), its disks in order (`/dev/vda`, `/dev/vdb`, ...), then a fresh
    /// 1 MiB marker disk, `dir/marker-NAME.img`, for the image's test unit. The serial log
    /// is `dir/serial-NAME.log`. Waits for the other VMs of this process to finish first.
    #[track_caller]
    pub fn start_root(dir: &TestDir, boot: &RootBoot) -> Self {
        let rig = rig();
        let initrd = boot
            .initrd
            .clone()
            .unwrap_or_else(|| debian_root().initrd.clone());
        let marker = dir.join(&format!("marker-{}.img", boot.name));
        let file = File::create(&marker)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", marker.display()));
        file.set_len(MARKER_DISK_LEN)
            .unwrap_or_else(|e| panic!("cannot size {}: {e}", marker.display()));
        eprintln!(
            "vm: root boot {}: kernel {} with {}, command line: {}",
            boot.name,
            rig.kernel_release,
            initrd.display(),
            boot.kernel_command_line()
        );
        Self::launch(
            dir,
            Launch {
                name: boot.name.clone(),
                initrd,
                cmdline: boot.kernel_command_line(),
                net: boot.net,
                disks: boot.disks.clone(),
                marker: Some(marker),
                timeout: boot.timeout,
                serial_input: boot.serial_input,
                fail_on: boot.fail_on.clone(),
            },
        )
    }

    #[track_caller]
    fn launch(dir: &TestDir, launch: Launch) -> Self {
        let rig = rig();
        let turn = vm_lock();
        let log = dir.join(&format!("serial-{}.log", launch.name));
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
        if launch.net {
            cmd.args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
            ]);
        } else {
            cmd.args(["-nic", "none"]);
        }
        let marker_disk = launch
            .marker
            .as_ref()
            .map(|m| Disk::raw(m).serial(MARKER_SERIAL));
        for (i, disk) in launch.disks.iter().chain(&marker_disk).enumerate() {
            cmd.args(disk.qemu_args(i));
        }
        cmd.arg("-kernel")
            .arg(&rig.kernel)
            .arg("-initrd")
            .arg(&launch.initrd)
            .arg("-append")
            .arg(&launch.cmdline);
        let stdin = if launch.serial_input {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut child = cmd
            .stdin(stdin)
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", rig.qemu.display()));
        eprintln!(
            "vm: booting {} (kernel {}), serial log {}",
            launch.name,
            rig.kernel_release,
            log.display()
        );
        Self {
            stdin: child.stdin.take(),
            child: Some(child),
            name: launch.name,
            timeout: launch.timeout,
            log,
            marker: launch.marker,
            fail_on: launch.fail_on,
            seen_upto: 0,
            started: Instant::now(),
            _turn: turn,
        }
    }

    /// Waits until the serial log shows `text` (after whatever an earlier call waited for),
    /// then types `line` and Enter on the serial console: a passphrase at a prompt, a
    /// command in an emergency shell. Needs a boot with serial input
    /// ([`RootBoot::serial_input`]). Fails the test, with the end of the serial log, when the
    /// VM powers off or its timeout passes first.
    #[track_caller]
    pub fn type_line_after(&mut self, text: &str, line: &str) {
        let deadline = self.started + self.timeout;
        loop {
            let log = read_log(&self.log);
            if let Some(at) = log.get(self.seen_upto..).and_then(|rest| rest.find(text)) {
                self.seen_upto += at + text.len();
                break;
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                self.kill();
                keep_log(&self.name, &log);
                panic!(
                    "{}: the serial console never showed {text:?} before {}\n{}",
                    self.name,
                    if exited {
                        "the VM stopped"
                    } else {
                        "the boot's timeout"
                    },
                    tail(&log, &self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let stdin = self.stdin.as_mut().unwrap_or_else(|| {
            panic!(
                "{}: typing on the serial console needs a boot with serial_input()",
                self.name
            )
        });
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot type on the serial console: {e}", self.name));
    }

    /// Waits until the serial log satisfies `ready` (the guest has printed enough progress
    /// lines, say), looking about every 100 ms, and returns the log as it then was. Fails the
    /// test, with the end of the serial log, when the VM stops, the guest reports PASS or FAIL,
    /// or the boot's timeout passes first: `what` names the wait in that message.
    #[track_caller]
    pub fn wait_for_log(&mut self, what: &str, mut ready: impl FnMut(&str) -> bool) -> String {
        let deadline = self.started + self.timeout;
        loop {
            let log = read_log(&self.log);
            if ready(&log) {
                return log;
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            let reported = verdict(&log, &self.name);
            if exited || reported != Verdict::Missing || Instant::now() > deadline {
                self.kill();
                let log = read_log(&self.log);
                keep_log(&self.name, &log);
                let why = match verdict(&log, &self.name) {
                    Verdict::Fail(reason) => format!("the guest reported FAIL: {reason}"),
                    Verdict::Pass => "the guest reported PASS".to_owned(),
                    Verdict::Missing if exited => "the VM stopped".to_owned(),
                    Verdict::Missing => {
                        format!("the boot's timeout ({} s)", self.timeout.as_secs())
                    }
                };
                panic!(
                    "{}: waited for {what}, but first {why}\n{}",
                    self.name,
                    tail(&log, &self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A power cut: kills qemu at once with SIGKILL, so that whatever the guest held in its
    /// memory (its page cache, the daemon's buffers) is gone, and returns the serial log as
    /// it stands. What qemu had written to its disks stays (with [`DiskCache::None`], on the
    /// host's storage rather than in its page cache).
    pub fn power_cut(mut self) -> VmRun {
        let mut child = self
            .child
            .take()
            .expect("the VM is running until waited for");
        // Child::kill sends SIGKILL.
        let _ = child.kill();
        let status = child.wait().ok();
        // A cut guest wrote no marker disk worth reading.
        let run = self.finished(status.and_then(|s| s.code()), false);
        eprintln!(
            "vm: scenario {} power cut (qemu SIGKILLed) after {:.1} s (guest init after {} s)",
            run.scenario,
            run.elapsed.as_secs_f64(),
            run.init_uptime().unwrap_or("?"),
        );
        run
    }

    /// The run of a qemu that has ended: its serial log (kept past the test) and, when asked
    /// for and the boot has one, its marker disk's text.
    fn finished(&self, qemu_status: Option<i32>, read_marker: bool) -> VmRun {
        let log = read_log(&self.log);
        keep_log(&self.name, &log);
        VmRun {
            scenario: self.name.clone(),
            log,
            log_path: self.log.clone(),
            marker: if read_marker {
                self.marker.as_deref().map(read_marker_disk)
            } else {
                None
            },
            elapsed: self.started.elapsed(),
            qemu_status,
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the VM to power off (within the scenario's timeout).
    #[track_caller]
    pub fn wait(self) -> VmRun {
        self.wait_observing(|| {})
    }

    /// Waits for the VM to power off, calling `observe` about every 200 ms meanwhile (to
    /// watch the host side while the guest works). Kills the VM and fails the test, with the
    /// end of the serial log, when the timeout passes or the log shows one of the boot's
    /// failure texts.
    #[track_caller]
    pub fn wait_observing(mut self, mut observe: impl FnMut()) -> VmRun {
        let deadline = self.started + self.timeout;
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
            let failed_on = if self.fail_on.is_empty() {
                None
            } else {
                let log = read_log(&self.log);
                self.fail_on
                    .iter()
                    .find(|t| log.contains(t.as_str()))
                    .map(|t| (t.clone(), log))
            };
            if let Some((text, log)) = failed_on {
                let _ = child.kill();
                let _ = child.wait();
                keep_log(&self.name, &log);
                panic!(
                    "{}: the serial console shows {text:?} (the boot failed): VM killed after \
                     {:.1} s\n{}",
                    self.name,
                    self.started.elapsed().as_secs_f64(),
                    tail(&log, &self.log)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = read_log(&self.log);
                keep_log(&self.name, &log);
                let marker = self.marker.as_deref().map(read_marker_disk);
                let reported = match verdict(marker.as_deref().unwrap_or(&log), &self.name) {
                    Verdict::Pass => " after the guest reported PASS".to_owned(),
                    Verdict::Fail(reason) => format!(" after the guest reported FAIL: {reason}"),
                    Verdict::Missing => String::new(),
                };
                panic!(
                    "the VM running {} did not power off within {} s{reported}: killed\n{}",
                    self.name,
                    self.timeout.as_secs(),
                    tail(&log, &self.log)
                );
            }
            observe();
            std::thread::sleep(Duration::from_millis(200));
        };
        let run = self.finished(status.code(), true);
        if run.marker.is_some() {
            let unit = run.reports("UPTIME").first().map_or_else(
                || "the test unit reported nothing".to_owned(),
                |t| format!("the test unit started at guest uptime {t} s"),
            );
            eprintln!(
                "vm: root boot {} ran {:.1} s ({unit}), qemu exit {:?}",
                run.scenario,
                run.elapsed.as_secs_f64(),
                run.qemu_status
            );
        } else {
            eprintln!(
                "vm: scenario {} ran {:.1} s (guest init after {} s), qemu exit {:?}",
                run.scenario,
                run.elapsed.as_secs_f64(),
                run.init_uptime().unwrap_or("?"),
                run.qemu_status
            );
        }
        run
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The guest's file name of the virtio disk driver that [`Scenario::disk`] adds.
const VIRTIO_BLK: &str = "virtio_blk.ko";

/// The kernel's `virtio_blk.ko`, from the kernel tree the rig keeps for the Debian root (the
/// rig's base initramfs has no virtio disk driver). Its dependencies, `virtio` and
/// `virtio_ring`, come with the base image's `virtio_pci`.
#[track_caller]
fn virtio_blk_module(rig: &Rig) -> PathBuf {
    let module = rig
        .kernel_tree
        .join("lib/modules")
        .join(&rig.kernel_release)
        .join("kernel/drivers/block")
        .join(VIRTIO_BLK);
    assert!(
        module.is_file(),
        "{} is missing: the rig's kernel tree (tests/vm/build-rig.sh, ROOT_MODULES) should hold it",
        module.display()
    );
    module
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
    /// A root boot's marker disk, as text (up to its first NUL): the report of the image's
    /// test unit. `None` for the initramfs scenarios, which report on the serial console.
    pub marker: Option<String>,
    /// From qemu's start to its exit.
    pub elapsed: Duration,
    /// qemu's exit code.
    pub qemu_status: Option<i32>,
}

impl VmRun {
    /// Where the guest's marker lines are: the marker disk of a root boot, else the serial
    /// log.
    fn report_text(&self) -> &str {
        self.marker.as_deref().unwrap_or(&self.log)
    }

    /// Asserts that the guest reported `CRYPTNBD-VM: PASS NAME` (on the marker disk of a root
    /// boot, else on the serial console); otherwise fails with its FAIL reason (or the
    /// absence of a marker) and the end of the serial log.
    #[track_caller]
    pub fn assert_pass(&self) -> &Self {
        match verdict(self.report_text(), &self.scenario) {
            Verdict::Pass => self,
            Verdict::Fail(reason) => panic!(
                "scenario {} failed in the VM: {reason}\n{}",
                self.scenario,
                tail(&self.log, &self.log_path)
            ),
            Verdict::Missing if self.marker.is_some() => panic!(
                "root boot {} left no PASS/FAIL line on its marker disk (qemu exited with \
                 {:?}; the root never came up, or the test unit did not run?); the marker \
                 disk says: {:?}\n{}",
                self.scenario,
                self.qemu_status,
                self.report_text(),
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

    /// The marker lines that start with `kind ` (e.g. `SUM`), without the kind (from the
    /// marker disk of a root boot, else from the serial log).
    pub fn reports(&self, kind: &str) -> Vec<String> {
        let prefix = format!("{kind} ");
        markers(self.report_text())
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

// ---------------------------------------------------------------------------------------------
// Root boots: the Debian 12 root of build-root.sh, its disks, the marker disk
// ---------------------------------------------------------------------------------------------

/// The serial number of the marker disk: the guest finds it as
/// `/dev/disk/by-id/virtio-cryptnbd-marker`.
pub const MARKER_SERIAL: &str = "cryptnbd-marker";
/// The marker disk's size: the report is a few lines of text.
const MARKER_DISK_LEN: u64 = 1 << 20;

/// A virtio disk of the VM (`/dev/vda`, `/dev/vdb`, ... in the order given).
#[derive(Debug, Clone)]
pub struct Disk {
    kind: DiskKind,
    /// The virtio serial number (the guest's `/dev/disk/by-id/virtio-SERIAL`).
    serial: Option<String>,
}

/// How qemu caches a raw image file on the host (`-drive cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCache {
    /// `cache=none`: the image is opened with `O_DIRECT`, so the guest's writes go past the
    /// host's page cache to the host's storage, and the guest sees a disk with a write cache
    /// that qemu flushes (`fdatasync` of the image) when the guest sends a FLUSH. The power
    /// cut test uses it so that the image holds what the host's storage got, not what the
    /// host's page cache happens to keep. A SIGKILL of qemu loses the guest's memory in every
    /// mode; what qemu had written stays in every mode too.
    None,
}

impl DiskCache {
    fn arg(self) -> &'static str {
        match self {
            Self::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
enum DiskKind {
    /// A raw image file on the host, with qemu's default cache mode unless one is given.
    Raw(PathBuf, Option<DiskCache>),
    /// An export of an NBD server on the host, opened by qemu's own NBD client: the guest
    /// sees a plain virtio disk and needs nothing of ours.
    Nbd {
        server: NbdServer,
        export: String,
        /// A client certificate directory (`ca-cert.pem`, `client-cert.pem`,
        /// `client-key.pem`) for TLS.
        tls: Option<PathBuf>,
    },
}

/// Where qemu reaches an NBD server on the host.
#[derive(Debug, Clone)]
enum NbdServer {
    Unix(PathBuf),
    /// A TCP port on 127.0.0.1 (qemu runs on the host; the guest never sees the address).
    Tcp(u16),
}

impl Disk {
    /// A raw image file (`-drive file=…,format=raw`).
    pub fn raw(path: &Path) -> Self {
        Self {
            kind: DiskKind::Raw(path.to_path_buf(), None),
            serial: None,
        }
    }

    /// The cache mode of a raw image (qemu's default is `writeback`: every write lands in
    /// the host's page cache). Only for [`Disk::raw`]: an NBD disk has no host file.
    #[track_caller]
    pub fn cache(mut self, mode: DiskCache) -> Self {
        match &mut self.kind {
            DiskKind::Raw(_, cache) => *cache = Some(mode),
            DiskKind::Nbd { .. } => panic!("a cache mode is for raw image files, not NBD disks"),
        }
        self
    }

    /// An NBD export on a unix socket of the host (`-blockdev driver=nbd,server.type=unix`).
    pub fn nbd_unix(socket: &Path, export: &str) -> Self {
        Self {
            kind: DiskKind::Nbd {
                server: NbdServer::Unix(socket.to_path_buf()),
                export: export.to_owned(),
                tls: None,
            },
            serial: None,
        }
    }

    /// An NBD export on the host's 127.0.0.1:`port` (`-blockdev driver=nbd,server.type=inet`).
    pub fn nbd_tcp(port: u16, export: &str) -> Self {
        Self {
            kind: DiskKind::Nbd {
                server: NbdServer::Tcp(port),
                export: export.to_owned(),
                tls: None,
            },
            serial: None,
        }
    }

    /// Over TLS, with the client certificate directory `dir` (the layout of
    /// [`crate::pki::Pki::client`]; qemu's `tls-creds-x509,endpoint=client`). qemu checks
    /// the server's certificate against 127.0.0.1 on TCP.
    pub fn tls(mut self, dir: &Path) -> Self {
        if let DiskKind::Nbd { tls, .. } = &mut self.kind {
            *tls = Some(dir.to_path_buf());
        }
        self
    }

    /// The virtio serial number.
    pub fn serial(mut self, serial: &str) -> Self {
        self.serial = Some(serial.to_owned());
        self
    }

    /// qemu's arguments for this disk as the `index`th virtio disk: a block node `diskN`, a
    /// virtio-blk-pci device at PCI slot 0x10+N (so that the guest names the disks in the
    /// order given), and for TLS the credentials object `tlsN`.
    fn qemu_args(&self, index: usize) -> Vec<String> {
        let node = format!("disk{index}");
        let mut args = Vec::new();
        match &self.kind {
            DiskKind::Raw(path, cache) => {
                let mut spec = format!(
                    "file={},format=raw,if=none,id={node}",
                    qemu_escape(&path.to_string_lossy())
                );
                if let Some(cache) = cache {
                    spec.push_str(&format!(",cache={}", cache.arg()));
                }
                args.push("-drive".to_owned());
                args.push(spec);
            }
            DiskKind::Nbd {
                server,
                export,
                tls,
            } => {
                let mut spec =
                    format!("driver=nbd,node-name={node},export={}", qemu_escape(export));
                match server {
                    NbdServer::Unix(path) => spec.push_str(&format!(
                        ",server.type=unix,server.path={}",
                        qemu_escape(&path.to_string_lossy())
                    )),
                    NbdServer::Tcp(port) => spec.push_str(&format!(
                        ",server.type=inet,server.host=127.0.0.1,server.port={port}"
                    )),
                }
                if let Some(dir) = tls {
                    args.push("-object".to_owned());
                    args.push(format!(
                        "tls-creds-x509,id=tls{index},endpoint=client,dir={}",
                        qemu_escape(&dir.to_string_lossy())
                    ));
                    spec.push_str(&format!(",tls-creds=tls{index}"));
                    if matches!(server, NbdServer::Unix(_)) {
                        // No host name to check the certificate against on a socket.
                        spec.push_str(",tls-hostname=localhost");
                    }
                }
                args.push("-blockdev".to_owned());
                args.push(spec);
            }
        }
        let mut device = format!("virtio-blk-pci,drive={node},addr={:#x}", 0x10 + index);
        if let Some(serial) = &self.serial {
            device.push_str(&format!(",serial={}", qemu_escape(serial)));
        }
        args.push("-device".to_owned());
        args.push(device);
        args
    }
}

/// A value inside one of qemu's `key=value,...` option strings: commas doubled.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// One boot of the Debian root ([`Vm::start_root`]): the root device, the test unit's
/// parameters, the disks, what may be typed on the console.
///
/// The kernel command line is `console=ttyS0 loglevel=4 root=ROOT`, the test unit's
/// `cryptnbdtest.KEY=VALUE` parameters (tests/vm/root/cryptnbd-test says which it reads),
/// then any further words (the product's own `cryptnbd.*` options, later). It has no
/// `panic=`: initramfs-tools would reboot at its first error instead of opening its
/// emergency shell, and qemu's `-no-reboot` would end the VM without a trace of why; the
/// shell's prompt is one of the failure texts instead ([`RootBoot::fail_on`]).
#[derive(Debug, Clone)]
pub struct RootBoot {
    name: String,
    root: String,
    params: Vec<(String, String)>,
    extra: Vec<String>,
    disks: Vec<Disk>,
    net: bool,
    timeout: Duration,
    initrd: Option<PathBuf>,
    serial_input: bool,
    fail_on: Vec<String>,
}

/// What the serial console shows when a root boot has failed for good: initramfs-tools'
/// emergency shell, a kernel panic, dracut's fatal error, systemd's emergency mode (in the
/// initrd or on the root).
pub const ROOT_BOOT_FAILURES: [&str; 5] = [
    "(initramfs) ",
    "Kernel panic",
    "dracut: FATAL",
    "You are in emergency mode",
    "Cannot open access to console, the root account is locked",
];

impl RootBoot {
    /// A boot named `name` (the test unit's `cryptnbdtest.scenario`, the PASS/FAIL line's
    /// name, the log's file name) with `root=/dev/vda`, no network, within 5 minutes.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            root: "/dev/vda".to_owned(),
            params: Vec::new(),
            extra: Vec::new(),
            disks: Vec::new(),
            net: false,
            timeout: Duration::from_secs(300),
            initrd: None,
            serial_input: false,
            fail_on: ROOT_BOOT_FAILURES.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// The kernel's `root=` (what the initramfs mounts).
    pub fn root(mut self, root: &str) -> Self {
        root.clone_into(&mut self.root);
        self
    }

    /// A parameter of the test unit: `cryptnbdtest.KEY=VALUE` on the kernel command line.
    pub fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push((key.to_owned(), value.to_string()));
        self
    }

    /// The test unit checks that `findmnt -no SOURCE /` is `source`.
    pub fn expect_root_source(self, source: &str) -> Self {
        self.param("root", source)
    }

    /// The test unit checks that a root process whose command line starts with `@cryptnbd`
    /// (a root storage daemon systemd spares) is running.
    pub fn require_root_daemon(self) -> Self {
        self.param("daemon", 1)
    }

    /// The test unit reports each line of the audit trail `path` (`AUDIT LINE`); a missing
    /// trail fails the boot.
    pub fn report_audit(self, path: &str) -> Self {
        self.param("audit", path)
    }

    /// The test unit reports each line of the log `path` (`LOG LINE`), for the test's output;
    /// a missing log decides nothing.
    pub fn report_log(self, path: &str) -> Self {
        self.param("log", path)
    }

    /// Another word on the kernel command line (the product's `cryptnbd.*` options).
    pub fn cmdline(mut self, word: &str) -> Self {
        self.extra.push(word.to_owned());
        self
    }

    /// The next virtio disk (`/dev/vda` first). The marker disk comes after all of them.
    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    /// A virtio NIC on qemu's user networking: the guest is 10.0.2.15 (DHCP) and reaches the
    /// host's 127.0.0.1 as 10.0.2.2.
    pub fn with_network(mut self) -> Self {
        self.net = true;
        self
    }

    /// How long the boot may take, power-off included, before the VM is killed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Another initramfs than the Debian root's (one with the product's hooks, or with files
    /// appended).
    pub fn initrd(mut self, initrd: &Path) -> Self {
        self.initrd = Some(initrd.to_path_buf());
        self
    }

    /// Pipes the serial console's input, for [`Vm::type_line_after`].
    pub fn serial_input(mut self) -> Self {
        self.serial_input = true;
        self
    }

    /// The texts that end the boot as a failure as soon as the serial log shows them
    /// (default: [`ROOT_BOOT_FAILURES`]); a test that expects the emergency shell drops it.
    pub fn fail_on(mut self, texts: &[&str]) -> Self {
        self.fail_on = texts.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The boot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn kernel_command_line(&self) -> String {
        let mut cmdline = format!(
            "console=ttyS0 loglevel=4 root={} cryptnbdtest.scenario={}",
            self.root, self.name
        );
        for (k, v) in &self.params {
            cmdline.push_str(&format!(" cryptnbdtest.{k}={v}"));
        }
        for word in &self.extra {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
        cmdline
    }
}

/// The marker disk's text: up to its first NUL, lossily decoded.
fn read_marker_disk(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        }
        Err(e) => format!("(cannot read the marker disk {}: {e})", path.display()),
    }
}

/// The Debian 12 root of `tests/vm/build-root.sh`: what it wrote to `root.env`.
#[derive(Debug, Clone)]
pub struct DebianRoot {
    /// The cached root tree (shared by every test: never change it, copy it with
    /// [`root_image`]).
    pub tree: PathBuf,
    /// The initramfs that `update-initramfs` built in it for the rig's kernel.
    pub initrd: PathBuf,
    /// The kernel it was built for (the rig's).
    pub kernel_release: String,
    /// What building the tree took, in seconds (0 when it came from the cache).
    pub build_seconds: f64,
    /// What building the initramfs took, in seconds (0 when it came from the cache).
    pub initrd_seconds: f64,
}

/// The Debian root, built (or found in the cache) once per test process after the rig.
/// Fails the test (every test that asks, each time) if it cannot be built.
pub fn debian_root() -> &'static DebianRoot {
    static ROOT: OnceLock<Result<DebianRoot, String>> = OnceLock::new();
    match ROOT.get_or_init(build_debian_root) {
        Ok(root) => root,
        Err(msg) => panic!("{msg}"),
    }
}

fn build_debian_root() -> Result<DebianRoot, String> {
    let rig = rig();
    let script = workspace_root().join("tests/vm/build-root.sh");
    let out_dir = rig_dir();
    let started = Instant::now();
    let out = run(Command::new("bash")
        .arg(&script)
        .arg(out_dir.join("rig.env"))
        .arg(&out_dir));
    if out.code != Some(0) {
        return Err(format!(
            "the Debian root of the VM rig did not build: `{}` exited with {:?}\n--- its \
             output:\n{}{}",
            out.command,
            out.code,
            out.stdout_text(),
            out.stderr
        ));
    }
    eprintln!(
        "vm: Debian root ready in {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        out.stderr.trim_end()
    );
    let env_file = out_dir.join("root.env");
    let text = fs::read_to_string(&env_file).map_err(|e| {
        format!(
            "build-root.sh succeeded but {} cannot be read: {e}",
            env_file.display()
        )
    })?;
    let root = parse_root_env(&text).map_err(|e| format!("{}: {e}", env_file.display()))?;
    if root.kernel_release != rig.kernel_release {
        return Err(format!(
            "the Debian root's initramfs is for kernel {}, the rig boots {}",
            root.kernel_release, rig.kernel_release
        ));
    }
    Ok(root)
}

/// Parses the `KEY=VALUE` lines of `root.env`.
fn parse_root_env(text: &str) -> Result<DebianRoot, String> {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(str::to_owned)
            .ok_or_else(|| format!("no {key}= line"))
    };
    let seconds = |key: &str| {
        get(key)?
            .parse::<f64>()
            .map_err(|e| format!("{key}= is not a number: {e}"))
    };
    let root = DebianRoot {
        tree: get("ROOT_TREE")?.into(),
        initrd: get("ROOT_INITRD")?.into(),
        kernel_release: get("ROOT_KERNEL_RELEASE")?,
        build_seconds: seconds("ROOT_BUILD_SECONDS")?,
        initrd_seconds: seconds("ROOT_INITRD_SECONDS")?,
    };
    for p in [&root.tree, &root.initrd] {
        if !p.exists() {
            return Err(format!("{} does not exist", p.display()));
        }
    }
    Ok(root)
}

/// The initramfs builders of the Debian root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitramfsTool {
    /// Debian's default: `update-initramfs` (busybox, klibc, shell scripts).
    InitramfsTools,
    /// `dracut --no-hostonly` (dracut-core 059): a systemd initrd, since the root has systemd.
    Dracut,
}

impl InitramfsTool {
    fn arg(self) -> &'static str {
        match self {
            Self::InitramfsTools => "initramfs-tools",
            Self::Dracut => "dracut",
        }
    }
}

/// A new initramfs `dir/NAME` for the rig's kernel, built by `tool` in the Debian root with
/// the tree of `files` (hooks, configuration, binaries) laid over it first and `args` given
/// to the builder (`tests/vm/root-initramfs.sh`; the cached root stays untouched). The
/// Debian root's own initramfs ([`DebianRoot::initrd`]) is initramfs-tools' without extras.
#[track_caller]
pub fn root_initramfs(
    dir: &TestDir,
    name: &str,
    tool: InitramfsTool,
    files: Option<&Path>,
    args: &[&str],
) -> PathBuf {
    let root = debian_root();
    let out = dir.join(name);
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("tests/vm/root-initramfs.sh"))
        .arg(&root.tree)
        .arg(&out)
        .arg(tool.arg());
    if let Some(files) = files {
        cmd.arg(files);
    }
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let done = run(&mut cmd);
    assert_eq!(
        done.code,
        Some(0),
        "the initramfs was not built: `{}` exited with {:?}\n{}{}",
        done.command,
        done.code,
        done.stdout_text(),
        done.stderr
    );
    eprintln!("vm: {}", done.stderr.trim_end());
    out
}

/// A new ext4 root image `dir/NAME` of `size` (`512M`, as mke2fs takes it): the Debian root
/// with the test unit of `tests/vm/root/` (`tests/vm/root-image.sh`).
#[track_caller]
pub fn root_image(dir: &TestDir, name: &str, size: &str) -> PathBuf {
    root_image_with(dir, name, size, None)
}

/// [`root_image`] with the tree `overlay` added at / (the product installed on the real root:
/// binaries, units, configuration).
#[track_caller]
pub fn root_image_with(dir: &TestDir, name: &str, size: &str, overlay: Option<&Path>) -> PathBuf {
    let root = debian_root();
    let image = dir.join(name);
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("tests/vm/root-image.sh"))
        .arg(&root.tree)
        .arg(&image)
        .arg(size);
    if let Some(overlay) = overlay {
        cmd.arg(overlay);
    }
    let out = run(&mut cmd);
    assert_eq!(
        out.code,
        Some(0),
        "the root image was not made: `{}` exited with {:?}\n{}{}",
        out.command,
        out.code,
        out.stdout_text(),
        out.stderr
    );
    eprintln!("vm: {}", out.stderr.trim_end());
    image
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
    fn a_root_boot_has_no_panic_option_and_carries_the_test_parameters() {
        let boot = RootBoot::new("root-nbd-1")
            .root("/dev/vda")
            .expect_root_source("/dev/vda")
            .require_root_daemon()
            .param("step", "write")
            .cmdline("cryptnbd.root=UUID=x");
        let cmdline = boot.kernel_command_line();
        assert!(!cmdline.contains("panic="), "{cmdline}");
        assert!(cmdline.contains(" root=/dev/vda "), "{cmdline}");
        for word in [
            "cryptnbdtest.scenario=root-nbd-1",
            "cryptnbdtest.root=/dev/vda",
            "cryptnbdtest.daemon=1",
            "cryptnbdtest.step=write",
        ] {
            assert!(cmdline.split(' ').any(|w| w == word), "{word}: {cmdline}");
        }
        assert!(cmdline.ends_with(" cryptnbd.root=UUID=x"), "{cmdline}");
    }

    #[test]
    fn disks_become_qemu_block_nodes_in_order() {
        let raw = Disk::raw(Path::new("/tmp/a,b.img")).qemu_args(0);
        assert_eq!(
            raw,
            [
                "-drive",
                "file=/tmp/a,,b.img,format=raw,if=none,id=disk0",
                "-device",
                "virtio-blk-pci,drive=disk0,addr=0x10"
            ]
        );
        let nbd = Disk::nbd_tcp(10809, "root")
            .tls(Path::new("/pki/qemu"))
            .serial("s1")
            .qemu_args(1);
        assert_eq!(
            nbd,
            [
                "-object",
                "tls-creds-x509,id=tls1,endpoint=client,dir=/pki/qemu",
                "-blockdev",
                "driver=nbd,node-name=disk1,export=root,server.type=inet,\
                 server.host=127.0.0.1,server.port=10809,tls-creds=tls1",
                "-device",
                "virtio-blk-pci,drive=disk1,addr=0x11,serial=s1"
            ]
        );
        let uncached = Disk::raw(Path::new("/tmp/p.img"))
            .cache(DiskCache::None)
            .qemu_args(3);
        assert_eq!(
            uncached[1],
            "file=/tmp/p.img,format=raw,if=none,id=disk3,cache=none"
        );
        let unix = Disk::nbd_unix(Path::new("/run/nbd.sock"), "root").qemu_args(2);
        assert_eq!(
            unix[1],
            "driver=nbd,node-name=disk2,export=root,server.type=unix,server.path=/run/nbd.sock"
        );
    }

    #[test]
    fn the_marker_disk_is_read_up_to_its_first_nul() {
        let dir = TestDir::new("vm-marker");
        let path = dir.join("marker.img");
        let mut bytes = b"CRYPTNBD-VM: ROOT /dev/vda\nCRYPTNBD-VM: PASS r1\n".to_vec();
        bytes.extend_from_slice(&[0; 64]);
        bytes.extend_from_slice(b"CRYPTNBD-VM: FAIL r1: stale\n");
        fs::write(&path, bytes).expect("write the marker disk");
        let text = read_marker_disk(&path);
        assert_eq!(verdict(&text, "r1"), Verdict::Pass);
        assert!(!text.contains("stale"), "{text}");
    }

    #[test]
    fn rig_env_needs_every_key() {
        let err = parse_rig_env("QEMU=/bin/sh\n").expect_err("incomplete rig.env");
        assert!(err.contains("QEMU_LD_LIBRARY_PATH"), "{err}");
    }
}
