//! `open VOLUME --dm-crypt NAME` and `close NAME`: a volume served by the kernel's dm-crypt
//! (the fast path) with the same key custody as an attach.
//!
//! The volume key never enters this process nor a file: this CLI makes a pipe, sends its
//! write end to the daemon (`open-dm-crypt`), which unwraps the key through the KMS (audited
//! as `open-dm-crypt`) and writes its 64 bytes into the pipe; `cryptsetup open
//! --volume-key-file /proc/self/fd/0` then reads them from the read end, its standard input
//! (named through /proc: `/dev/stdin` is a link that udev or systemd makes, and minimal
//! systems such as an initramfs lack it). The CLI reports what cryptsetup did
//! (`dm-crypt-opened`), and the daemon checks it against the kernel. `close` asks the daemon which of its volumes the mapping serves (others are
//! refused), runs `cryptsetup close` and reports (`dm-crypt-closed`).
//!
//! Before asking for the key, the CLI checks what it needs, so a key is never handed out for
//! nothing: root, a cryptsetup to run (`CRYPTNBD_CRYPTSETUP`, else `cryptsetup` on `PATH`,
//! `/usr/sbin`, `/sbin`), and a kernel with a device-mapper (`/dev/mapper/control` opens).

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output as ProcessOutput, Stdio};

use anyhow::{Context as _, Result};
use control_api::paths::validate_name;
use control_api::{OpenDmCryptRequest, Request, Response, validate_dm_name};

use crate::cli::OpenArgs;
use crate::client::Client;
use crate::exit::{self, CliError};
use crate::output::Output;
use crate::units::human;

/// The environment variable naming the cryptsetup program to run.
const CRYPTSETUP_ENV: &str = "CRYPTNBD_CRYPTSETUP";
/// The device-mapper's control device: it opens only when the kernel has a device-mapper.
const DM_CONTROL: &str = "/dev/mapper/control";

fn require_root(what: &str) -> Result<(), CliError> {
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    Err(CliError::new(
        exit::DENIED,
        format!(
            "only root may {what}: cryptsetup makes device-mapper devices, and the daemon hands \
             a volume key only to root; run it as root (sudo)"
        ),
    ))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The cryptsetup to run: `CRYPTNBD_CRYPTSETUP` (a path, or a name looked up like
/// `cryptsetup`), else `cryptsetup` on `PATH`, then in `/usr/sbin` and `/sbin` (where
/// Debian puts it, which a user's `PATH` may lack).
pub(crate) fn find_cryptsetup() -> Result<PathBuf, CliError> {
    let wanted = std::env::var_os(CRYPTSETUP_ENV).filter(|v| !v.is_empty());
    let name = PathBuf::from(wanted.clone().unwrap_or_else(|| "cryptsetup".into()));
    let found = if name.components().count() > 1 {
        is_executable(&name).then(|| name.clone())
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(&name))
            .find(|p| is_executable(p))
    };
    found.ok_or_else(|| {
        CliError::new(
            exit::NO_DM_CRYPT,
            match wanted {
                Some(_) => format!(
                    "{CRYPTSETUP_ENV} names {}, which is not an executable file: point it at \
                     cryptsetup, or unset it",
                    name.display()
                ),
                None => "cryptsetup is not installed (not on PATH, nor in /usr/sbin or /sbin): \
                         install it ('apt-get install cryptsetup-bin'), set CRYPTNBD_CRYPTSETUP \
                         to its path, or serve the volume over NBD with 'cryptnbdctl attach'"
                    .into(),
            },
        )
    })
}

/// Refuses when the kernel has no device-mapper (so no dm-crypt).
fn check_device_mapper() -> Result<(), CliError> {
    let e = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(DM_CONTROL)
    {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let why = match (e.kind(), e.raw_os_error()) {
        (ErrorKind::NotFound, _) => format!("{DM_CONTROL} does not exist"),
        (_, Some(code)) if code == libc_enodev() || code == libc_enxio() => {
            format!("the kernel has no device-mapper ({DM_CONTROL}: {e})")
        }
        _ => {
            return Err(CliError::new(
                exit::IO,
                format!("cannot open {DM_CONTROL}: {e}"),
            ));
        }
    };
    Err(CliError::new(
        exit::NO_DM_CRYPT,
        format!(
            "dm-crypt is not available on this host: {why}; load it with 'modprobe dm_crypt', \
             or serve the volume over NBD with 'cryptnbdctl attach'"
        ),
    ))
}

fn libc_enodev() -> i32 {
    rustix::io::Errno::NODEV.raw_os_error()
}

fn libc_enxio() -> i32 {
    rustix::io::Errno::NXIO.raw_os_error()
}

/// What a failed cryptsetup said: its exit status and its message (stderr, else stdout).
fn failure(out: &ProcessOutput) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    let msg = match text(&out.stderr) {
        s if s.is_empty() => text(&out.stdout),
        s => s,
    };
    let status = out
        .status
        .code()
        .map_or_else(|| out.status.to_string(), |c| format!("exit {c}"));
    if msg.is_empty() {
        status
    } else {
        format!("{status}: {}", msg.replace('\n', "; "))
    }
}

/// cryptsetup's exit code 5 is "device already exists or device is busy".
fn cryptsetup_code(out: Option<&ProcessOutput>) -> u8 {
    match out.and_then(|o| o.status.code()) {
        Some(5) => exit::CONFLICT,
        _ => exit::FAILURE,
    }
}

/// Runs cryptsetup with `args` (stdin as given), capturing its output.
fn run_cryptsetup(
    cryptsetup: &Path,
    args: &[&str],
    stdin: Stdio,
) -> (Option<ProcessOutput>, Option<String>) {
    match Command::new(cryptsetup)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => (Some(o), None),
        Ok(o) => {
            let why = failure(&o);
            (Some(o), Some(why))
        }
        Err(e) => (
            None,
            Some(format!("cannot run {}: {e}", cryptsetup.display())),
        ),
    }
}

/// `open VOLUME --dm-crypt NAME`.
pub fn open(socket: &Path, a: &OpenArgs, out: &Output) -> Result<()> {
    let r = open_mapping(socket, a)?;
    out.emit(&r, || match &r {
        Response::DmCryptOpened(m) => format!(
            "opened {} through dm-crypt as {}{}: {}, sector size {}\nclose it with \
             'cryptnbdctl close {}'",
            m.volume,
            m.device,
            if m.read_only { " (read-only)" } else { "" },
            human(m.size),
            m.sector_size,
            m.name
        ),
        other => format!("{other:?}"),
    })
}

/// Maps a volume with dm-crypt, the daemon handing its key to cryptsetup (`open`, and the
/// encrypted root's unlock in the initramfs): the daemon's confirmation.
pub fn open_mapping(socket: &Path, a: &OpenArgs) -> Result<Response> {
    validate_name(&a.volume).map_err(CliError::usage)?;
    validate_dm_name(&a.dm_crypt).map_err(CliError::usage)?;
    require_root("open a volume with dm-crypt")?;
    let cryptsetup = find_cryptsetup()?;
    check_device_mapper()?;
    let mut client = Client::connect(socket)?;
    let (reader, writer) = std::io::pipe().context("cannot make a pipe for the volume key")?;
    let request = Request::OpenDmCrypt(OpenDmCryptRequest {
        volume: a.volume.clone(),
        name: a.dm_crypt.clone(),
        read_only: a.read_only,
        sid: a.sid.clone(),
        directory: a.directory.clone(),
    });
    let answer = client.call_with(request, Some(writer.as_fd()), None);
    // Ours is closed at once: only the daemon's copy could add bytes, and it has closed it.
    drop(writer);
    let mapping = match answer? {
        Response::DmCryptKeySent(m) => m,
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    };
    // The key is in the pipe: cryptsetup reads it from its standard input.
    let mut args = vec![
        "open",
        "--type",
        "luks2",
        "--key-size",
        "512",
        "--volume-key-file",
        "/proc/self/fd/0",
    ];
    if a.read_only {
        args.push("--readonly");
    }
    args.extend([mapping.path.as_str(), a.dm_crypt.as_str()]);
    let (ran, error) = run_cryptsetup(&cryptsetup, &args, Stdio::from(reader));
    let report = client.call(Request::DmCryptOpened {
        volume: a.volume.clone(),
        name: a.dm_crypt.clone(),
        error: error.clone(),
    });
    if let Some(why) = error {
        let mapped = matches!(report, Ok(Response::DmCryptOpened(_)));
        return Err(CliError::new(
            cryptsetup_code(ran.as_ref()),
            format!(
                "cryptsetup open failed ({why}){}",
                if mapped {
                    format!(
                        "; yet {} exists: check it, and close it with 'cryptnbdctl close {}'",
                        mapping.device, a.dm_crypt
                    )
                } else {
                    format!("; {} was not opened", a.volume)
                }
            ),
        )
        .into());
    }
    report.context("cryptsetup open succeeded, but the daemon did not confirm it")
}

/// `close NAME`.
pub fn close(socket: &Path, name: &str, out: &Output) -> Result<()> {
    validate_dm_name(name).map_err(CliError::usage)?;
    require_root("close a dm-crypt mapping")?;
    let cryptsetup = find_cryptsetup()?;
    let mut client = Client::connect(socket)?;
    let mapping = match client.call(Request::CloseDmCrypt { name: name.into() })? {
        Response::DmCryptMapping(m) => m,
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    };
    let (ran, error) = run_cryptsetup(&cryptsetup, &["close", name], Stdio::null());
    let report = client.call(Request::DmCryptClosed {
        volume: mapping.volume.clone(),
        name: name.into(),
        error: error.clone(),
    });
    if let Some(why) = error {
        return Err(CliError::new(
            cryptsetup_code(ran.as_ref()),
            format!(
                "cryptsetup close failed ({why}); {} is still open: unmount what uses it, then \
                 retry",
                mapping.device
            ),
        )
        .into());
    }
    let r = report.context("cryptsetup close succeeded, but the daemon did not confirm it")?;
    out.emit(&r, || {
        format!("closed {} (volume {})", mapping.device, mapping.volume)
    })
}
