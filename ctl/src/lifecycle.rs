//! The lifecycle verbs: they run in the daemon; this side opens the files the user names
//! (with the user's own permissions) and passes them as descriptors, and shows progress.
//!
//! Progress: on a terminal, one line on stderr redrawn in place (phase, percent, rate, ETA);
//! with `--json`, one JSON object per event on stderr (`{"event":"progress",...}`), so stdout
//! keeps exactly one JSON document, the answer. Ctrl-C ends the command; the daemon sees the
//! connection close, stops the operation and removes what it had built.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result};
use control_api::{
    ExportRequest, ImageSource, ProgressEvent, RebuildRequest, RebuildSource, RekeyRequest,
    Request, Response, Secret,
};
use kms_client::context;
use serde::Serialize;

use crate::cli::{CreateArgs, HeaderCommand, RecoveryCommand};
use crate::client::Client;
use crate::exit::CliError;
use crate::output::Output;
use crate::units::human;

/// Shows progress events.
pub struct ProgressView {
    json: bool,
    tty: bool,
    started: Instant,
    drawn: bool,
}

impl ProgressView {
    /// For `--json` or text output.
    pub fn new(json: bool) -> Self {
        Self {
            json,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            drawn: false,
        }
    }

    /// One event.
    pub fn show(&mut self, p: &ProgressEvent) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        if self.json {
            #[derive(Serialize)]
            struct Event<'a> {
                event: &'static str,
                #[serde(flatten)]
                progress: &'a ProgressEvent,
                elapsed_s: f64,
            }
            if let Ok(line) = serde_json::to_string(&Event {
                event: "progress",
                progress: p,
                elapsed_s: (secs * 10.0).round() / 10.0,
            }) {
                eprintln!("{line}");
            }
            return;
        }
        if !self.tty {
            return;
        }
        let rate = p.done as f64 / secs;
        let line = if p.total > 0 {
            let pct = p.done as f64 * 100.0 / p.total as f64;
            let eta = if rate > 0.0 {
                format!("{:.0}s", (p.total.saturating_sub(p.done)) as f64 / rate)
            } else {
                "?".into()
            };
            format!(
                "{} {}: {pct:5.1}% {} of {} at {}/s, ETA {eta}",
                p.operation,
                p.phase,
                human(p.done),
                human(p.total),
                human(rate as u64)
            )
        } else {
            format!("{} {}...", p.operation, p.phase)
        };
        eprint!("\r\x1b[K{line}");
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }

    /// Ends the progress line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// An image opened for the daemon: the descriptor to pass and what describes it. A
/// non-raw image is converted by a `qemu-nbd` + `nbdcopy` pipeline whose raw output is the
/// descriptor; the child is waited for at the end.
pub struct OpenedImage {
    /// What the daemon reads.
    pub fd: OwnedFd,
    /// The description sent with it.
    pub source: ImageSource,
    child: Option<Child>,
}

impl OpenedImage {
    /// Checks that the converter (if any) finished cleanly.
    pub fn finish(mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let status = c.wait().context("waiting for nbdcopy")?;
            if !status.success() {
                anyhow::bail!("converting the image with qemu-nbd/nbdcopy failed ({status})");
            }
        }
        Ok(())
    }
}

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// Opens an image for reading as raw bytes. Raw images are passed as they are; other
/// formats (qcow2, vmdk, ...) are detected with `qemu-img info` and read through
/// `nbdcopy -- [ qemu-nbd -r -f FORMAT PATH ] -`.
pub fn open_image(path: &Path) -> Result<OpenedImage> {
    let file = File::open(path).map_err(|e| {
        CliError::new(
            if e.kind() == std::io::ErrorKind::NotFound {
                crate::exit::NOT_FOUND
            } else {
                crate::exit::IO
            },
            format!("cannot open the image {}: {e}", path.display()),
        )
    })?;
    let meta = file.metadata()?;
    let block_device = meta.file_type().is_block_device();
    if !meta.is_file() && !block_device {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "neither a regular file nor a block device"
        };
        return Err(CliError::usage(format!(
            "the image {} is {kind}: give the path of an image file (raw, qcow2, ...) or of a \
             block device",
            path.display()
        ))
        .into());
    }
    // The path as the daemon records it (--record-base) and a later `rebuild` reopens it,
    // maybe from another directory: absolute, never relative to this process's cwd.
    let name = std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let (format, virtual_size) = match tool("qemu-img") {
        Some(qemu_img) => {
            let out = Process::new(qemu_img)
                .args(["info", "--output=json"])
                .arg(path)
                .stderr(Stdio::piped())
                .output()
                .context("running qemu-img info")?;
            if !out.status.success() {
                return Err(CliError::usage(format!(
                    "qemu-img cannot read {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
                .into());
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            (
                v["format"].as_str().unwrap_or("raw").to_owned(),
                v["virtual-size"].as_u64(),
            )
        }
        None => {
            let mut magic = [0u8; 4];
            let _ = std::os::unix::fs::FileExt::read_exact_at(&file, &mut magic, 0);
            if &magic == b"QFI\xfb" {
                return Err(CliError::usage(format!(
                    "{} is a qcow2 image: install qemu-utils (qemu-img, qemu-nbd) and \
                     libnbd-bin (nbdcopy) to import it, or convert it to raw first",
                    path.display()
                ))
                .into());
            }
            ("raw".to_owned(), None)
        }
    };
    if format == "raw" {
        // A regular file's size the daemon reads itself; a block device's `st_size` is 0,
        // so its size travels with it (found by seeking to its end, then back to the start:
        // the daemon reads from the descriptor's offset).
        let size = if block_device {
            use std::io::{Seek, SeekFrom};
            let mut f = &file;
            let size = f
                .seek(SeekFrom::End(0))
                .and_then(|n| f.seek(SeekFrom::Start(0)).map(|_| n))
                .map_err(|e| {
                    CliError::new(
                        crate::exit::IO,
                        format!("cannot find the size of {}: {e}", path.display()),
                    )
                })?;
            Some(size)
        } else {
            None
        };
        return Ok(OpenedImage {
            fd: file.into(),
            source: ImageSource {
                path: name,
                size,
                format: Some(format),
            },
            child: None,
        });
    }
    let size = virtual_size.context("qemu-img did not report the virtual size")?;
    for t in ["qemu-nbd", "nbdcopy"] {
        if tool(t).is_none() {
            return Err(CliError::usage(format!(
                "{} is a {format} image: reading it needs {t} (apt-get install qemu-utils \
                 libnbd-bin)",
                path.display()
            ))
            .into());
        }
    }
    let mut child = Process::new("nbdcopy")
        .args(["--", "[", "qemu-nbd", "-r", "-f", &format])
        .arg(path)
        .args(["]", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting nbdcopy")?;
    let stdout = child.stdout.take().context("nbdcopy's output")?;
    Ok(OpenedImage {
        fd: stdout.into(),
        source: ImageSource {
            path: name,
            size: Some(size),
            format: Some(format),
        },
        child: Some(child),
    })
}

/// Runs a request that may be long, with progress, passing `fd` if given.
pub(crate) fn long_call(
    client: &mut Client,
    request: Request,
    fd: Option<&OwnedFd>,
    json: bool,
) -> Result<Response> {
    let mut view = ProgressView::new(json);
    let mut show = |p: &ProgressEvent| view.show(p);
    let r = client.call_with(request, fd.map(|f| f.as_fd()), Some(&mut show));
    view.finish();
    Ok(r?)
}

/// `create --from-image` (always through the daemon).
pub fn create_from_image(client: &mut Client, args: &CreateArgs, json: bool) -> Result<Response> {
    let image = args.from_image.as_deref().context("no image")?;
    let opened = open_image(image)?;
    let request = Request::Create(create_request(args, Some(opened.source.clone()))?);
    let r = long_call(client, request, Some(&opened.fd), json)?;
    opened.finish()?;
    Ok(r)
}

/// `rebuild`.
pub fn rebuild(
    client: &mut Client,
    volume: &str,
    from_image: Option<&Path>,
    from_snapshot: Option<&str>,
    force: bool,
    json: bool,
) -> Result<()> {
    let mut opened = None;
    let source = match (from_image, from_snapshot) {
        (_, Some(name)) => RebuildSource::Snapshot { name: name.into() },
        (Some(p), None) => {
            let o = open_image(p)?;
            let s = RebuildSource::Image(o.source.clone());
            opened = Some(o);
            s
        }
        (None, None) => {
            // The recorded base image: the daemon knows its path; we open it.
            let Response::Volumes { volumes } = client.call(Request::List)? else {
                anyhow::bail!("unexpected answer from the daemon");
            };
            let v = volumes.iter().find(|v| v.name == volume).ok_or_else(|| {
                CliError::new(
                    crate::exit::NOT_FOUND,
                    format!("no volume {volume}: see 'cryptnbdctl list'"),
                )
            })?;
            let base = v.base_image.as_ref().ok_or_else(|| {
                CliError::usage(format!(
                    "volume {volume} has no recorded base image: give --from-image PATH or \
                     --from-snapshot NAME"
                ))
            })?;
            let o = open_image(Path::new(&base.path)).with_context(|| {
                format!(
                    "cannot read the recorded base image {} of volume {volume}: put it back, \
                     or give another source with --from-image PATH or --from-snapshot NAME",
                    base.path
                )
            })?;
            let s = RebuildSource::BaseImage(o.source.clone());
            opened = Some(o);
            s
        }
    };
    let r = long_call(
        client,
        Request::Rebuild(RebuildRequest {
            volume: volume.into(),
            source,
            force,
        }),
        opened.as_ref().map(|o| &o.fd),
        json,
    )?;
    if let Some(o) = opened {
        o.finish()?;
    }
    Output { json }.emit(&r, || match &r {
        Response::Rebuilt {
            volume,
            source,
            bytes,
            reattached,
        } => format!(
            "rebuilt {volume} from {source} ({} written){}",
            human(*bytes),
            if *reattached { "; re-attached" } else { "" }
        ),
        other => format!("{other:?}"),
    })
}

/// `snapshot`, `snapshots`, `delete-snapshot`.
pub fn snapshot(client: &mut Client, volume: &str, name: Option<&str>, json: bool) -> Result<()> {
    let r = long_call(
        client,
        Request::Snapshot {
            volume: volume.into(),
            name: name.map(str::to_owned),
        },
        None,
        json,
    )?;
    Output { json }.emit(&r, || match &r {
        Response::SnapshotTaken(s) => format!(
            "snapshot {} of {} taken ({}, by {})\n  file: {}",
            s.name,
            s.volume,
            human(s.size),
            s.method.as_deref().unwrap_or("?"),
            s.path
        ),
        other => format!("{other:?}"),
    })
}

/// `snapshots`.
pub fn snapshots(client: &mut Client, volume: &str, json: bool) -> Result<()> {
    let r = client.call(Request::Snapshots {
        volume: volume.into(),
    })?;
    Output { json }.emit(&r, || match &r {
        Response::Snapshots { volume, snapshots } if snapshots.is_empty() => {
            format!("volume {volume} has no snapshots ('cryptnbdctl snapshot {volume}')")
        }
        Response::Snapshots { snapshots, .. } => snapshots
            .iter()
            .map(|s| format!("{:<24} {:>10}  {}", s.name, human(s.size), s.created))
            .collect::<Vec<_>>()
            .join("\n"),
        other => format!("{other:?}"),
    })
}

/// `rekey`.
pub fn rekey(
    client: &mut Client,
    volume: &str,
    kms_key: &str,
    context_pairs: &[String],
    clear: bool,
    json: bool,
) -> Result<()> {
    let context = if clear || !context_pairs.is_empty() {
        Some(
            context_pairs
                .iter()
                .map(|p| context::parse_pair(p))
                .collect::<Result<Vec<_>, _>>()?,
        )
    } else {
        None
    };
    let r = client.call(Request::Rekey(RekeyRequest {
        volume: volume.into(),
        kms_key: kms_key.into(),
        context,
    }))?;
    Output { json }.emit(&r, || match &r {
        Response::Rekeyed {
            volume,
            old_key_id,
            key_id,
            ..
        } => format!(
            "rekeyed {volume}: the volume key is now wrapped by {key_id} (was {old_key_id}); \
             data unchanged"
        ),
        other => format!("{other:?}"),
    })
}

/// `reencrypt`.
/// `move`.
pub fn move_volume(client: &mut Client, volume: &str, to: &str, json: bool) -> Result<()> {
    let request = Request::Move {
        volume: volume.into(),
        to_store: to.into(),
    };
    let r = long_call(client, request, None, json)?;
    Output { json }.emit(&r, || match &r {
        Response::Moved {
            volume,
            from_store,
            to_store,
            path,
            bytes,
        } => format!(
            "moved {volume} from store {from_store} to store {to_store} ({} copied): {path}",
            human(*bytes)
        ),
        other => format!("{other:?}"),
    })
}

pub fn reencrypt(client: &mut Client, volume: &str, force: bool, json: bool) -> Result<()> {
    let r = long_call(
        client,
        Request::Reencrypt {
            volume: volume.into(),
            force,
        },
        None,
        json,
    )?;
    Output { json }.emit(&r, || match &r {
        Response::Reencrypted {
            volume,
            bytes,
            recovery_removed,
            reattached,
        } => {
            let mut s = format!(
                "re-encrypted {volume} under a new data key ({} rewritten)",
                human(*bytes)
            );
            if !recovery_removed.is_empty() {
                s.push_str(&format!(
                    "; recovery keyslot(s) {recovery_removed:?} held the old key and were \
                     removed: add a new one with 'cryptnbdctl recovery add'"
                ));
            }
            if *reattached {
                s.push_str("; re-attached");
            }
            s
        }
        other => format!("{other:?}"),
    })
}

/// `recovery add|remove`.
pub fn recovery(client: &mut Client, cmd: &RecoveryCommand, json: bool) -> Result<()> {
    let r = match cmd {
        RecoveryCommand::Add {
            volume,
            passphrase_file,
        } => {
            let bytes = std::fs::read(passphrase_file).with_context(|| {
                format!(
                    "cannot read the passphrase file {}",
                    passphrase_file.display()
                )
            })?;
            let bytes = zeroize::Zeroizing::new(bytes);
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| CliError::usage("the passphrase file is not UTF-8 text"))?;
            let pass = text.strip_suffix('\n').unwrap_or(text);
            let pass = pass.strip_suffix('\r').unwrap_or(pass);
            client.call(Request::RecoveryAdd {
                volume: volume.clone(),
                passphrase: Secret(pass.to_owned()),
            })?
        }
        RecoveryCommand::Remove { volume, keyslot } => client.call(Request::RecoveryRemove {
            volume: volume.clone(),
            keyslot: *keyslot,
        })?,
    };
    Output { json }.emit(&r, || match &r {
        Response::RecoveryAdded { volume, keyslot } => format!(
            "recovery keyslot {keyslot} added to {volume}: 'cryptsetup open' accepts the \
             passphrase. Keep it offline; remove it with 'cryptnbdctl recovery remove {volume} \
             --keyslot {keyslot}'"
        ),
        Response::RecoveryRemoved { volume, keyslots } if keyslots.is_empty() => {
            format!("volume {volume} has no recovery keyslot")
        }
        Response::RecoveryRemoved { volume, keyslots } => {
            format!("removed recovery keyslot(s) {keyslots:?} from {volume} (areas overwritten)")
        }
        other => format!("{other:?}"),
    })
}

/// Creates an output file the caller may create, mode 0600, refusing an existing one.
fn create_output(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::AlreadyExists {
                crate::exit::CONFLICT
            } else {
                crate::exit::IO
            };
            CliError::new(code, format!("cannot create {}: {e}", path.display())).into()
        })
}

/// `export --plaintext`.
pub fn export(
    client: &mut Client,
    volume: &str,
    to: &Path,
    plaintext: bool,
    json: bool,
) -> Result<()> {
    if !plaintext {
        return Err(CliError::usage(
            "export writes the volume decrypted, readable by anyone who can read the file: \
             add --plaintext to confirm",
        )
        .into());
    }
    let file = create_output(to)?;
    let fd: OwnedFd = file.into();
    let r = long_call(
        client,
        Request::Export(ExportRequest {
            volume: volume.into(),
            to: to.display().to_string(),
            plaintext,
        }),
        Some(&fd),
        json,
    );
    if r.is_err() {
        // Nothing half-written stays behind.
        let _ = std::fs::remove_file(to);
    }
    let r = r?;
    Output { json }.emit(&r, || match &r {
        Response::Exported {
            volume,
            bytes,
            sha256,
        } => format!(
            "exported {volume} decrypted to {} ({}, sha256 {sha256})",
            to.display(),
            human(*bytes)
        ),
        other => format!("{other:?}"),
    })
}

/// `header backup|restore`.
pub fn header(client: &mut Client, cmd: &HeaderCommand, json: bool) -> Result<()> {
    let r = match cmd {
        HeaderCommand::Backup { volume, to } => {
            let fd: OwnedFd = create_output(to)?.into();
            let r = client.call_with(
                Request::HeaderBackup {
                    volume: volume.clone(),
                    to: to.display().to_string(),
                },
                Some(fd.as_fd()),
                None,
            );
            if r.is_err() {
                let _ = std::fs::remove_file(to);
            }
            r?
        }
        HeaderCommand::Restore {
            volume,
            from,
            force,
        } => {
            let file = File::open(from)
                .with_context(|| format!("cannot open the header backup {}", from.display()))?;
            client.call_with(
                Request::HeaderRestore {
                    volume: volume.clone(),
                    from: from.display().to_string(),
                    force: *force,
                },
                Some(file.as_fd()),
                None,
            )?
        }
    };
    Output { json }.emit(&r, || match &r {
        Response::HeaderBackedUp { volume, bytes } => format!(
            "header of {volume} backed up ({} bytes); it holds the wrapped key: keep it as safe \
             as the volume",
            bytes
        ),
        Response::HeaderRestored { volume } => format!("header of {volume} restored"),
        other => format!("{other:?}"),
    })
}

/// `cancel` and `operations`.
pub fn cancel(client: &mut Client, volume: &str, json: bool) -> Result<()> {
    let r = client.call(Request::Cancel {
        volume: volume.into(),
    })?;
    Output { json }.emit(&r, || match &r {
        Response::Cancelled { operation } => format!(
            "asked {} (operation {}) on {} to stop; it cleans up and changes nothing",
            operation.operation, operation.id, operation.volume
        ),
        other => format!("{other:?}"),
    })
}

/// `operations`.
pub fn operations(client: &mut Client, json: bool) -> Result<()> {
    let r = client.call(Request::Operations)?;
    Output { json }.emit(&r, || match &r {
        Response::Operations { operations } if operations.is_empty() => {
            "no operation is running".into()
        }
        Response::Operations { operations } => operations
            .iter()
            .map(|o| {
                format!(
                    "{} {} on {} (uid {}, since {}): {} {}/{}",
                    o.id,
                    o.operation,
                    o.volume,
                    o.caller_uid,
                    o.since,
                    o.phase,
                    human(o.done),
                    human(o.total)
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        other => format!("{other:?}"),
    })
}

/// The `create` request for `args` (`from_image`: the image passed with it, if any).
pub(crate) fn create_request(
    args: &CreateArgs,
    from_image: Option<control_api::ImageSource>,
) -> Result<control_api::CreateRequest> {
    control_api::paths::validate_name(&args.name).map_err(CliError::usage)?;
    let context = args
        .context
        .iter()
        .map(|p| context::parse_pair(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(control_api::CreateRequest {
        name: args.name.clone(),
        size: args.size.unwrap_or(0),
        sector_size: args.sector_size,
        kms_key: args.kms_key.clone(),
        sid: args.sid.clone(),
        directory: args.directory.clone(),
        context,
        volume_id: args.volume_id.clone(),
        sid_directory_key: Some(args.context_keys().sid_directory),
        volume_id_key: Some(args.context_keys().volume_id),
        from_image,
        record_base: args.record_base,
        store: args.store.clone(),
    })
}
