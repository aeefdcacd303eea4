//! `cryptnbdctl initramfs …`: the encrypted root at boot (docs/root-volume.md).
//!
//! - `prepare --dest DIR`, run by the initramfs hooks while an image is built: copies the
//!   root configuration and what its KMS needs (keystore, AWS files, CA bundle) into the
//!   image, and prints what the hook must add itself, one per line: `program PATH` (with its
//!   libraries), `module NAME`, and `network` when the KMS is reached over the network.
//! - `check`, run by a user before rebooting: whether the installed image can unlock the
//!   root (what is missing, what is stale, who may read it).
//! - `unlock`, run by the initramfs at boot: reads the kernel command line, starts the root
//!   daemon with its state and sockets under `/run/cryptnbd-root` (which moves to the real
//!   root), asks the keystore's passphrase on the console when the keystore is sealed, and
//!   maps the root with dm-crypt (the daemon then exits) or attaches it to `/dev/nbd0`
//!   (the daemon stays). It prints the device to mount, and nothing else; on failure one
//!   sentence on stderr, which the initramfs shows before its emergency shell.

use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use boot::cmdline::{Mode, RootRequest, Target};
use boot::config::{ImageFile, RootConfig};
use kms_client::local::{LocalKms, LocalKmsOptions};
use zeroize::Zeroizing;

use crate::cli::{CheckArgs, OpenArgs, PrepareArgs, UnlockArgs};
use crate::exit::CliError;

/// How many times the keystore's passphrase is asked before the boot stops.
const PASSPHRASE_TRIES: u32 = 3;
/// How long the root daemon may take to answer on its control socket.
const DAEMON_START: Duration = Duration::from_secs(60);

/// `initramfs prepare`.
pub fn prepare(a: &PrepareArgs) -> Result<()> {
    let config = RootConfig::load(&a.config).map_err(CliError::usage)?;
    let (files, warnings) = config
        .image_files(&a.config, &a.config_in_image)
        .map_err(CliError::usage)?;
    for f in &files {
        copy_into(&a.dest, f)?;
    }
    for w in &warnings {
        eprintln!("cryptnbdctl: warning: {w}");
    }
    // The programs the hook copies with their libraries (copy_exec, inst_binary).
    let me = std::env::current_exe().context("cannot find this program")?;
    let daemon = me.with_file_name("cryptnbd");
    if !daemon.is_file() {
        return Err(CliError::not_found(format!(
            "the daemon {} is missing beside {}: install both from the same build",
            daemon.display(),
            me.display()
        ))
        .into());
    }
    let mut lines = vec![
        format!("program {}", me.display()),
        format!("program {}", daemon.display()),
        format!("program {}", crate::dmcrypt::find_cryptsetup()?.display()),
    ];
    lines.extend(
        config
            .programs()
            .iter()
            .map(|p| format!("program {}", p.display())),
    );
    lines.extend(MODULES.iter().map(|m| format!("module {m}")));
    if config.needs_network() {
        lines.push("network".into());
    }
    for l in lines {
        crate::output::print_line(&l)?;
    }
    Ok(())
}

/// The kernel modules of both ways: device-mapper, dm-crypt and its cipher (XTS over AES,
/// with the AES-NI implementation where the CPU has it), and the NBD client.
const MODULES: [&str; 6] = [
    "dm_mod",
    "dm_crypt",
    "xts",
    "aes_generic",
    "aesni_intel",
    "nbd",
];

/// Copies `f` (a file, or a directory's files) into the image tree `dest`.
fn copy_into(dest: &Path, f: &ImageFile) -> Result<()> {
    let target = dest.join(f.dest.strip_prefix("/").unwrap_or(&f.dest));
    let meta = std::fs::metadata(&f.source).map_err(|e| {
        CliError::not_found(format!(
            "{} ({}) cannot be put into the initramfs: {e}",
            f.source.display(),
            f.what
        ))
    })?;
    if meta.is_dir() {
        make_dir(&target, f.secret)?;
    }
    let files = f
        .files()
        .with_context(|| format!("cannot list {}", f.source.display()))?;
    for (host, in_image) in files {
        copy_file(
            &host,
            &dest.join(in_image.strip_prefix("/").unwrap_or(&in_image)),
            f.secret,
        )?;
    }
    Ok(())
}

/// Creates `dir` and its parents; 0700 when it holds secrets (the KMS refuses a keystore
/// others can read).
fn make_dir(dir: &Path, secret: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path, secret: bool) -> Result<()> {
    if let Some(dir) = to.parent() {
        make_dir(dir, false)?;
    }
    let bytes = Zeroizing::new(
        std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?,
    );
    let _ = std::fs::remove_file(to);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(to)
        .with_context(|| format!("cannot write {}", to.display()))?;
    out.write_all(&bytes)
        .with_context(|| format!("cannot write {}", to.display()))
}

/// `initramfs unlock`.
pub fn unlock(a: &UnlockArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.cmdline).with_context(|| {
        format!(
            "cannot read the kernel command line {}",
            a.cmdline.display()
        )
    })?;
    let Some(root) = boot::cmdline::parse(&text).map_err(|e| CliError::usage(e.to_string()))?
    else {
        // Not asked for: the initramfs goes on as if we were not there.
        return Ok(());
    };
    let config = RootConfig::load(&root.config).map_err(|m| {
        CliError::not_found(format!(
            "{m}; the initramfs was built without it: run update-initramfs -u (or dracut \
             --force) once /etc/cryptnbd/root.toml exists"
        ))
    })?;
    let device = unlock_root(a, &root, &config)?;
    crate::output::print_line(&device)
}

fn unlock_root(a: &UnlockArgs, root: &RootRequest, config: &RootConfig) -> Result<String> {
    let volume = root.volume().to_owned();
    // What the messages name: the device and the KMS key, read from the header (no KMS).
    let located = match &root.target {
        Target::Device(l) => l.find(Path::new(store::device::SYS_CLASS_BLOCK)),
        Target::Volume(name) => match config.store.devices.get(name) {
            Some(v) => store::device::Locator::parse(v)
                .map_err(std::io::Error::other)
                .and_then(|l| l.find(Path::new(store::device::SYS_CLASS_BLOCK))),
            None => {
                return Err(CliError::not_found(format!(
                    "cryptnbd.root={name}: the root configuration {} names no such volume in \
                     [store.devices]: add it ({name} = \"UUID=…\") and rebuild the initramfs, \
                     or boot with cryptnbd.root=UUID=…",
                    root.config.display()
                ))
                .into());
            }
        },
    };
    let path = located.map_err(|e| {
        CliError::not_found(format!("the root volume {volume} cannot be found: {e}"))
    })?;
    let key = volume::inspect(&path)
        .ok()
        .and_then(|i| i.token)
        .map(|t| t.key_id)
        .unwrap_or_else(|| "(unknown: the header cannot be read)".into());
    let failed = |e: anyhow::Error| {
        let why = e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        // The daemon's answers start with the volume's path, which the sentence names already.
        let shown = format!("{}: ", path.display());
        let why = why.strip_prefix(&shown).unwrap_or(&why);
        anyhow::Error::new(CliError::new(
            crate::exit::code_for(&e),
            format!(
                "cannot unlock the root volume {volume} on {} (KMS key {key}): {why}",
                path.display()
            ),
        ))
    };

    let run = &a.runtime_dir;
    let state = run.join("state");
    for dir in [run, &state] {
        store::durable::create_private_dir(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    // The keystore copy the image holds becomes the root daemon's (under /run: the audit
    // records it writes there survive the switch to the real root).
    let passphrase = match config.keystore() {
        Some(_) => {
            let in_image = config.keystore_in_image();
            let keystore = if config.kms.keystore.is_some() {
                in_image
            } else {
                let copy = state.join("keystore");
                copy_into(
                    &state,
                    &ImageFile {
                        source: a
                            .initramfs_root
                            .join(in_image.strip_prefix("/").unwrap_or(&in_image)),
                        dest: PathBuf::from("/keystore"),
                        what: "the local KMS keystore",
                        secret: true,
                    },
                )
                .map_err(failed)?;
                copy
            };
            if boot::config::keystore_is_sealed(&keystore) {
                Some(ask_passphrase(a, &volume, &keystore).map_err(failed)?)
            } else {
                None
            }
        }
        None => None,
    };

    let mut daemon = start_daemon(a, root, run, &state, passphrase).map_err(failed)?;
    let socket = run.join("control.sock");
    let served = match root.mode {
        Mode::DmCrypt => crate::dmcrypt::open_mapping(
            &socket,
            &OpenArgs {
                volume: volume.clone(),
                dm_crypt: boot::cmdline::DM_NAME.into(),
                read_only: false,
                sid: None,
                directory: None,
            },
        )
        .map(|_| ()),
        Mode::Nbd => attach_nbd(&socket, &volume),
    };
    if root.mode == Mode::DmCrypt || served.is_err() {
        // The key is in the kernel (or nowhere): nothing of the daemon is needed any more.
        stop(&mut daemon);
    }
    served.map_err(failed)?;
    Ok(root.mode.device())
}

/// Attaches `volume` to the kernel NBD device of the root, through netlink.
fn attach_nbd(socket: &Path, volume: &str) -> Result<()> {
    let r = crate::client::Client::connect(socket)?.call(control_api::Request::Attach(
        control_api::AttachRequest {
            volume: volume.to_owned(),
            device: Some(boot::cmdline::NBD_DEVICE.to_owned()),
            ..Default::default()
        },
    ))?;
    match r {
        control_api::Response::Attached(_) => Ok(()),
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// Starts the root daemon (`@cryptnbd` for the NBD way, which systemd's killing spree
/// spares) and waits until it answers.
fn start_daemon(
    a: &UnlockArgs,
    root: &RootRequest,
    run: &Path,
    state: &Path,
    passphrase: Option<Zeroizing<Vec<u8>>>,
) -> Result<Child> {
    let daemon = match &a.daemon {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("cannot find this program")?
            .with_file_name("cryptnbd"),
    };
    let log_path = run.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    let mut cmd = Command::new(&daemon);
    if root.mode == Mode::Nbd {
        cmd.arg0("@cryptnbd");
    }
    cmd.arg("--config")
        .arg(&root.config)
        .arg("--state-dir")
        .arg(state)
        .arg("--runtime-dir")
        .arg(run)
        .env_remove("CRYPTNBD_KMS_PASSPHRASE")
        .stdout(Stdio::null())
        .stderr(log);
    if let Target::Device(l) = &root.target {
        cmd.arg("--store-device")
            .arg(format!("{}={l}", boot::cmdline::ROOT_VOLUME));
    }
    let mut writer = None;
    if passphrase.is_some() {
        let (r, w) = std::io::pipe().context("cannot make a pipe for the passphrase")?;
        cmd.arg("--kms-passphrase-file")
            .arg("/dev/stdin")
            .stdin(Stdio::from(r));
        writer = Some(w);
    } else {
        cmd.stdin(Stdio::null());
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start the daemon {}", daemon.display()))?;
    if let (Some(mut w), Some(p)) = (writer, passphrase) {
        // The pipe holds a passphrase easily; the daemon reads it to the end at start.
        w.write_all(&p)
            .context("cannot hand the passphrase to the daemon")?;
    }
    let socket = run.join("control.sock");
    let deadline = Instant::now() + DAEMON_START;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // Its last error and the causes under it, as one line.
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = said.lines().collect();
            let from = lines
                .iter()
                .rposition(|l| l.starts_with("cryptnbd: error:"))
                .unwrap_or(lines.len().saturating_sub(1));
            let why = lines[from.min(lines.len())..]
                .iter()
                .map(|l| {
                    l.trim()
                        .trim_start_matches("cryptnbd: error: ")
                        .trim_start_matches("caused by: ")
                })
                .collect::<Vec<_>>()
                .join(": ");
            anyhow::bail!("the root daemon stopped at start ({status}): {why}");
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            stop(&mut child);
            anyhow::bail!(
                "the root daemon did not answer within {} s (its log: {})",
                DAEMON_START.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the daemon: SIGTERM, then SIGKILL if it is still there after 10 s.
fn stop(child: &mut Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Asks the sealed keystore's passphrase (systemd-ask-password where systemd runs the
/// initramfs, else the console), checking each answer against the keystore, three times.
fn ask_passphrase(a: &UnlockArgs, volume: &str, keystore: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let prompt =
        format!("Passphrase of the cryptnbd keystore, to unlock the root volume {volume}: ");
    for attempt in 1..=PASSPHRASE_TRIES {
        let answer = read_passphrase(a, &prompt)?;
        let opened = LocalKms::open(
            keystore,
            LocalKmsOptions {
                passphrase: Some(answer.clone()),
                ..LocalKmsOptions::default()
            },
        )
        .and_then(|kms| kms.list_keys());
        match opened {
            Ok(_) => return Ok(answer),
            Err(e) if e.kind() == kms_client::KmsErrorKind::AccessDenied => {
                say(
                    a,
                    &format!("cryptnbd: wrong passphrase (try {attempt} of {PASSPHRASE_TRIES})"),
                );
            }
            Err(e) => {
                return Err(CliError::new(
                    crate::exit::DAMAGED,
                    format!("the keystore {} cannot be read: {e}", keystore.display()),
                )
                .into());
            }
        }
    }
    Err(CliError::new(
        crate::exit::KMS_REFUSED,
        format!(
            "the keystore passphrase was wrong {PASSPHRASE_TRIES} times: the volume stays locked \
             (reboot to try again, or open it with a recovery passphrase: docs/root-volume.md)"
        ),
    )
    .into())
}

/// The console the passphrase is asked on.
fn console_of(a: &UnlockArgs) -> &Path {
    a.console
        .as_deref()
        .unwrap_or_else(|| Path::new("/dev/console"))
}

/// Writes a line on the console the passphrase is asked on.
fn say(a: &UnlockArgs, line: &str) {
    if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open(console_of(a)) {
        let _ = writeln!(c, "{line}");
    }
}

fn read_passphrase(a: &UnlockArgs, prompt: &str) -> Result<Zeroizing<Vec<u8>>> {
    // systemd's password agents answer where systemd runs the initramfs (dracut's default):
    // its consoles are theirs then. Elsewhere, and whenever a console is named, the console.
    let systemd_initrd = Path::new("/run/systemd/ask-password").is_dir()
        && Path::new("/etc/initrd-release").exists();
    if a.console.is_none()
        && systemd_initrd
        && let Ok(out) = Command::new("systemd-ask-password")
            .arg("--timeout=0")
            .arg(prompt)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
    {
        // The answer is wiped when dropped, whether it is used or not.
        let mut p = Zeroizing::new(out.stdout);
        if out.status.success() {
            while p.last() == Some(&b'\n') {
                p.pop();
            }
            return Ok(p);
        }
    }
    let path = console_of(a);
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| {
            format!(
                "cannot open the console {} to ask the passphrase",
                path.display()
            )
        })?;
    let echo_off = EchoOff::new(&console);
    (&console).write_all(prompt.as_bytes())?;
    let mut reader = std::io::BufReader::new(&console);
    let mut line = Zeroizing::new(Vec::new());
    reader
        .read_until(b'\n', &mut line)
        .context("cannot read the passphrase from the console")?;
    drop(echo_off);
    let _ = (&console).write_all(b"\n");
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(line)
}

/// The console's echo, off while a passphrase is typed (nothing to do on a non-terminal).
struct EchoOff<'a> {
    file: &'a std::fs::File,
    saved: Option<rustix::termios::Termios>,
}

impl<'a> EchoOff<'a> {
    fn new(file: &'a std::fs::File) -> Self {
        let saved = rustix::termios::tcgetattr(file).ok();
        if let Some(t) = &saved {
            let mut quiet = t.clone();
            quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
            let _ = rustix::termios::tcsetattr(file, rustix::termios::OptionalActions::Now, &quiet);
        }
        Self { file, saved }
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = rustix::termios::tcsetattr(self.file, rustix::termios::OptionalActions::Now, t);
        }
    }
}

/// What `initramfs check` found.
#[derive(Debug, Default, serde::Serialize)]
struct Checked {
    image: PathBuf,
    /// Whether the image can unlock the root (nothing missing, nothing stale).
    ok: bool,
    missing: Vec<String>,
    stale: Vec<String>,
    warnings: Vec<String>,
}

/// `initramfs check`.
pub fn check(a: &CheckArgs, out: &crate::output::Output) -> Result<()> {
    let image_path = match (&a.image, &a.kver) {
        (Some(p), _) => p.clone(),
        (None, Some(k)) => PathBuf::from(format!("/boot/initrd.img-{k}")),
        (None, None) => {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .context("cannot read the running kernel's release")?;
            PathBuf::from(format!("/boot/initrd.img-{}", release.trim()))
        }
    };
    let config = RootConfig::load(&a.config).map_err(CliError::usage)?;
    let image = read_image(&image_path)?;
    let mut c = Checked {
        image: image_path.clone(),
        ..Checked::default()
    };

    // The root configuration and what its KMS needs: there, and the same as on this host.
    let (files, warnings) = config
        .image_files(&a.config, &a.config_in_image)
        .map_err(CliError::usage)?;
    c.warnings.extend(warnings);
    for f in &files {
        compare_file(&image, f, &mut c);
    }
    // The programs, and the boot script of initramfs-tools or dracut.
    let me = std::env::current_exe().context("cannot find this program")?;
    let mut programs = vec![me.clone(), me.with_file_name("cryptnbd")];
    let mode = std::fs::read_to_string(&a.cmdline)
        .ok()
        .and_then(|t| boot::cmdline::parse(&t).ok().flatten())
        .map(|r| r.mode);
    if mode != Some(Mode::Nbd) {
        programs.push(crate::dmcrypt::find_cryptsetup()?);
    }
    programs.extend(config.programs());
    for p in &programs {
        let text = p.display().to_string();
        match image.get(&text) {
            None => c.missing.push(format!("the program {text}")),
            Some(e) => {
                if std::fs::read(p).is_ok_and(|b| b != e.data) {
                    c.stale.push(format!(
                        "the program {text}: the image has another build than this host's"
                    ));
                }
            }
        }
    }
    let script = image.get("/scripts/local-top/cryptnbd").is_some()
        || image
            .files_named(|n| n == boot::config::DRACUT_HOOK)
            .next()
            .is_some();
    if !script {
        c.missing.push(
            "the boot script (initramfs-tools' scripts/local-top/cryptnbd, or the dracut \
             module's hook): install cryptnbd's boot integration (docs/root-volume.md)"
                .into(),
        );
    }
    // The kernel modules of the way the root is served (both, when the command line does
    // not say), unless the kernel has them built in.
    let kver = a.kver.clone().or_else(|| kernel_of(&image));
    let mut modules = vec![("dm-crypt", "dm-crypt"), ("dm-mod", "device-mapper")];
    match mode {
        Some(Mode::DmCrypt) => {}
        Some(Mode::Nbd) => modules = vec![("nbd", "nbd")],
        None => modules.push(("nbd", "nbd")),
    }
    for (module, what) in modules {
        let file = format!("{module}.ko");
        let built_in = kver.as_ref().is_some_and(|k| {
            std::fs::read_to_string(format!("/lib/modules/{k}/modules.builtin"))
                .is_ok_and(|b| b.lines().any(|l| l.ends_with(&format!("/{file}"))))
        });
        let named = |n: &str| n == file || n.starts_with(&format!("{file}."));
        if !built_in && image.files_named(named).next().is_none() {
            c.missing
                .push(format!("the kernel module {module} ({what})"));
        }
    }
    // Who may read it.
    if let Ok(meta) = std::fs::metadata(&image_path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && files.iter().any(|f| f.secret) {
            c.warnings.push(format!(
                "{} is readable by others (mode {mode:04o}) and holds the KMS's keystore or \
                 credentials: chmod 600 it; images built with cryptnbd's conf-hook are 0600 \
                 (UMASK=0077)",
                image_path.display()
            ));
        }
    }
    c.ok = c.missing.is_empty() && c.stale.is_empty();
    out.emit(&c, || {
        let mut s = format!(
            "{} {} unlock the root",
            image_path.display(),
            if c.ok { "can" } else { "cannot" }
        );
        for (label, items) in [
            ("missing", &c.missing),
            ("stale", &c.stale),
            ("warning", &c.warnings),
        ] {
            for i in items {
                s.push_str(&format!("\n  {label}: {i}"));
            }
        }
        if !c.ok {
            s.push_str("\nRebuild it before rebooting: update-initramfs -u (or dracut --force)");
        }
        s
    })?;
    if !c.ok {
        return Err(CliError::new(
            crate::exit::FAILURE,
            format!(
                "{} cannot unlock the root: {} missing, {} stale",
                image_path.display(),
                c.missing.len(),
                c.stale.len()
            ),
        )
        .into());
    }
    Ok(())
}

/// Whether the image holds `f` (each file of it, for a directory) as this host has it.
fn compare_file(image: &boot::initramfs::Image, f: &ImageFile, c: &mut Checked) {
    // A source that cannot be read on this host is reported with the first file below.
    let pairs = f
        .files()
        .unwrap_or_else(|_| vec![(f.source.clone(), f.dest.clone())]);
    for (host, in_image) in pairs {
        let shown = in_image.display().to_string();
        match image.get(&shown) {
            None => c.missing.push(format!("{} ({shown})", f.what)),
            Some(e) => match std::fs::read(&host) {
                Ok(b) if *b == *e.data => {}
                Ok(_) => c.stale.push(format!(
                    "{} ({shown}) differs from {}: it changed after the image was built{}",
                    f.what,
                    host.display(),
                    if f.what.contains("keystore") {
                        " (a key was created, rotated, disabled or a volume rekeyed)"
                    } else {
                        ""
                    }
                )),
                Err(e) => c.missing.push(format!(
                    "{} ({}) cannot be read on this host: {e}",
                    f.what,
                    host.display()
                )),
            },
        }
    }
}

/// The kernel release whose modules the image holds (`lib/modules/RELEASE/…`).
fn kernel_of(image: &boot::initramfs::Image) -> Option<String> {
    image.entries().find_map(|e| {
        let rest = e
            .name
            .strip_prefix("usr/lib/modules/")
            .or_else(|| e.name.strip_prefix("lib/modules/"))?;
        rest.split_once('/').map(|(k, _)| k.to_owned())
    })
}

/// Every entry of the image at `path`, its compressed parts decompressed by their programs.
fn read_image(path: &Path) -> Result<boot::initramfs::Image> {
    let mut bytes = std::fs::read(path).map_err(|e| {
        CliError::not_found(format!("cannot read the initramfs {}: {e}", path.display()))
    })?;
    let mut image = boot::initramfs::Image::default();
    loop {
        let (entries, rest) = boot::initramfs::parse(&bytes).map_err(|m| {
            CliError::new(
                crate::exit::DAMAGED,
                format!(
                    "{} is not an initramfs this reader knows: {m}",
                    path.display()
                ),
            )
        })?;
        image.add(entries);
        let Some((compression, at)) = rest else {
            return Ok(image);
        };
        let (program, package) = compression.program();
        let mut child = Command::new(program)
            .arg("-dc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                CliError::not_found(format!(
                    "cannot run {program} to read {} ({e}): install the Debian package {package}",
                    path.display()
                ))
            })?;
        let compressed = bytes.split_off(at);
        let mut stdin = child.stdin.take().context("the decompressor's input")?;
        let feeder = std::thread::spawn(move || {
            // The decompressor stops reading at the end of its stream (padding may follow).
            let _ = stdin.write_all(&compressed);
        });
        let output = child.wait_with_output()?;
        let _ = feeder.join();
        if output.stdout.is_empty() {
            anyhow::bail!("{program} -dc could not decompress {}", path.display());
        }
        bytes = output.stdout;
    }
}
