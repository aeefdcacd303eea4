//! Volumes served by the kernel's dm-crypt instead of NBD (`cryptnbdctl open VOLUME
//! --dm-crypt NAME`, `cryptnbdctl close NAME`; docs/control-api.md, "dm-crypt").
//!
//! The daemon never runs cryptsetup: the client (root) does, and the daemon hands the volume
//! key to it through a pipe. The open, step by step:
//! 1. `open-dm-crypt`, with the write end of a pipe whose read end cryptsetup will read: the
//!    daemon checks the caller is root, the volume is neither attached through NBD nor mapped
//!    by dm-crypt already and the name is free; it takes the volume as an operation
//!    (`open-dm-crypt`, so attach, delete and the other operations are refused meanwhile),
//!    unwraps the key exactly as `attach` does (same identity checks, same KMS call with the
//!    stored context, verified against the header's digest), writes its 64 bytes into the
//!    pipe, closes it, wipes its copy and audits `open-dm-crypt`.
//! 2. The client runs `cryptsetup open --volume-key-file` on the pipe and reports with
//!    `dm-crypt-opened` (audited with cryptsetup's outcome).
//! 3. The volume stays held until its mapping exists in the kernel, the client reports, the
//!    operation is cancelled, or [`HOLD_FOR`] passes (audited: the key was handed out but no
//!    mapping appeared). From then on the kernel's own state says whether the volume is open:
//!    there is no marker to go stale.
//!
//! "Is the volume open through dm-crypt?" is answered from sysfs: cryptsetup names the
//! device-mapper UUID of a LUKS2 mapping `CRYPT-LUKS2-<header UUID without dashes>-<NAME>`
//! ([`Mapping::luks2_uuid`]); a mapping of another file with the same header UUID (a snapshot,
//! a copy) is told apart by the loop device's backing file ([`serves`]). Attach, delete,
//! rebuild, snapshot, reencrypt, export and header restore are refused while a mapping of the
//! volume exists ([`Daemon::refuse_while_dm_open`]).

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_api::{
    DmCryptMapping, ErrorCode, OpenDmCryptRequest, Request, Response, validate_dm_name,
};
use volume::lifecycle::Cancel;
use volume::token::KmsToken;
use volume::{OpenOptions, VolumeError, VolumeErrorKind, VolumeInfo};

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::error::{Error, api};
use crate::ops::OpGuard;
use crate::request::RequestContext;
use crate::state::Pending;
use statedir::audit::{AuditLog, AuditRecord};

/// Where the kernel lists block devices.
pub const SYS_BLOCK: &str = "/sys/block";
/// The start of the device-mapper UUID cryptsetup gives a LUKS2 mapping.
const LUKS2_DM_UUID_PREFIX: &str = "CRYPT-LUKS2-";
/// How long a volume stays held after its key was handed out, when neither the mapping nor
/// the client's report comes (`cryptsetup open` with a volume key takes well under a second;
/// this covers a slow udev).
pub const HOLD_FOR: Duration = Duration::from_secs(120);
/// How often a held volume's mapping is looked for.
const POLL: Duration = Duration::from_millis(100);
/// Operations (docs/cli.md, "Lifecycle verbs") refused while the volume is mapped by
/// dm-crypt: they replace the file under the kernel, read content the kernel is changing, or
/// rewrite the header's UUID and digest. Rekey and recovery keyslots change only the header's
/// token and keyslots, which the kernel never reads after the open.
const REFUSED_WHILE_MAPPED: &[&str] = &[
    "rebuild",
    "snapshot",
    "reencrypt",
    "export",
    "header-restore",
];

/// A device-mapper device, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Its name (`/dev/mapper/NAME`).
    pub name: String,
    /// Its device-mapper UUID (empty when it has none).
    pub uuid: String,
    /// Mapped read-only.
    pub read_only: bool,
    /// The backing files of the loop devices it sits on (cryptsetup sets one up for a
    /// volume file), as the kernel recorded their paths.
    pub backing: Vec<PathBuf>,
}

impl Mapping {
    /// The LUKS2 header UUID (32 hex digits, no dashes) when cryptsetup made this mapping for
    /// a LUKS2 device (`CRYPT-LUKS2-<UUID>-<NAME>`).
    pub fn luks2_uuid(&self) -> Option<&str> {
        let rest = self.uuid.strip_prefix(LUKS2_DM_UUID_PREFIX)?;
        let (uuid, _name) = rest.split_once('-')?;
        (uuid.len() == 32 && uuid.bytes().all(|b| b.is_ascii_hexdigit())).then_some(uuid)
    }

    /// `/dev/mapper/NAME`.
    pub fn device(&self) -> String {
        device(&self.name)
    }
}

fn device(name: &str) -> String {
    format!("/dev/mapper/{name}")
}

/// Every device-mapper device under `sys_block` (normally [`SYS_BLOCK`]), by name; none
/// when it cannot be read (no sysfs: no mappings can be seen, and none made by us exist).
pub fn scan(sys_block: &Path) -> Vec<Mapping> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim_end_matches('\n').to_owned())
    };
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut mappings = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("dm-") {
            continue;
        }
        let dir = entry.path();
        let Some(name) = read(&dir.join("dm/name")) else {
            continue;
        };
        let backing = std::fs::read_dir(dir.join("slaves"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|s| read(&s.path().join("loop/backing_file")))
            .map(|b| PathBuf::from(b.strip_suffix(" (deleted)").unwrap_or(&b)))
            .collect();
        mappings.push(Mapping {
            name,
            uuid: read(&dir.join("dm/uuid")).unwrap_or_default(),
            read_only: read(&dir.join("ro")).as_deref() == Some("1"),
            backing,
        });
    }
    mappings.sort_by(|a, b| a.name.cmp(&b.name));
    mappings
}

/// Whether `m` maps the volume file `path` whose LUKS2 header UUID is `uuid`: the header
/// UUID matches, and the mapping does not sit on a loop device backed by another existing
/// file (a snapshot or copy shares the UUID). When the backing file cannot be told (not a
/// loop device, or the file is gone), the UUID decides: a mapping is never missed.
pub fn serves(m: &Mapping, uuid: &str, path: &Path) -> bool {
    let compact: String = uuid.chars().filter(|&c| c != '-').collect();
    if !m
        .luks2_uuid()
        .is_some_and(|u| u.eq_ignore_ascii_case(&compact))
    {
        return false;
    }
    let Ok(ours) = std::fs::metadata(path) else {
        return true;
    };
    m.backing.is_empty()
        || m.backing.iter().any(|b| {
            std::fs::metadata(b).map_or(true, |f| f.dev() == ours.dev() && f.ino() == ours.ino())
        })
}

/// The one of `mappings` that maps the volume file `path` (LUKS2 UUID `uuid`), if any.
fn serving<'a>(mappings: &'a [Mapping], uuid: &str, path: &Path) -> Option<&'a Mapping> {
    mappings.iter().find(|m| serves(m, uuid, path))
}

/// The kernel's mapping `name` of the volume file `path` (LUKS2 UUID `uuid`), if it exists.
fn mapping_named(name: &str, uuid: &str, path: &Path) -> Option<Mapping> {
    scan(Path::new(SYS_BLOCK))
        .into_iter()
        .find(|m| m.name == name && serves(m, uuid, path))
}

/// The LUKS2 UUID of the volume file `path`, when one of `mappings` could map it: None
/// when none of them is a LUKS2 mapping (the header is then not read at all) or when the
/// header cannot be read.
fn uuid_if_luks2_mapped(path: &Path, mappings: &[Mapping]) -> Option<String> {
    if mappings.iter().all(|m| m.luks2_uuid().is_none()) {
        return None;
    }
    volume::inspect(path).ok().map(|i| i.uuid)
}

/// Refuses a device-mapper name cryptsetup would not take.
fn check_dm_name(name: &str) -> Result<(), Error> {
    validate_dm_name(name).map_err(|m| api(ErrorCode::InvalidRequest, m))
}

/// The answer that describes the mapping `name` of `volume` (file `path`, header `info`).
fn dm_mapping(
    volume: &str,
    name: &str,
    path: &Path,
    info: VolumeInfo,
    read_only: bool,
) -> DmCryptMapping {
    DmCryptMapping {
        volume: volume.into(),
        name: name.into(),
        device: device(name),
        path: path.display().to_string(),
        uuid: info.uuid,
        sector_size: info.sector_size,
        size: info.size,
        read_only,
    }
}

/// The refusal of an attach (or another operation) of `volume` that `m` maps.
fn mapped_refusal(volume: &str, m: &Mapping) -> Error {
    api(
        ErrorCode::Conflict,
        format!(
            "volume {volume} is open through dm-crypt as {}; run 'cryptnbdctl close {}' first",
            m.device(),
            m.name
        ),
    )
}

/// Whether `operation` is refused while the volume is mapped by dm-crypt.
fn refused_while_mapped(operation: &str) -> bool {
    matches!(operation, "attach" | "delete") || REFUSED_WHILE_MAPPED.contains(&operation)
}

/// Refuses when one of `mappings` maps the volume file `path` (LUKS2 UUID `uuid`).
fn check_not_mapped(
    volume: &str,
    uuid: &str,
    path: &Path,
    mappings: &[Mapping],
) -> Result<(), Error> {
    match serving(mappings, uuid, path) {
        Some(m) => Err(mapped_refusal(volume, m)),
        None => Ok(()),
    }
}

fn require_root(caller: Caller, what: &str) -> Result<(), Error> {
    if caller.uid == 0 {
        return Ok(());
    }
    Err(api(
        ErrorCode::PermissionDenied,
        format!(
            "only root may {what} (uid {} asked): it hands the volume key to the kernel's \
             dm-crypt; run cryptnbdctl as root",
            caller.uid
        ),
    ))
}

/// The pipe passed with `open-dm-crypt`, checked to be a pipe (the key never goes into a
/// file) and made non-blocking (a full pipe is an error, not a hang).
fn take_pipe(ctx: &mut RequestContext) -> Result<File, Error> {
    let not_pipe = || {
        api(
            ErrorCode::InvalidRequest,
            "open-dm-crypt needs the write end of a pipe passed with the request (SCM_RIGHTS): \
             the volume key is written only into a pipe, never into a file; cryptnbdctl open \
             --dm-crypt does this",
        )
    };
    let file = ctx.fd.take().map(File::from).ok_or_else(not_pipe)?;
    if !file.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
        return Err(not_pipe());
    }
    let flags = rustix::fs::fcntl_getfl(&file)
        .and_then(|f| rustix::fs::fcntl_setfl(&file, f | rustix::fs::OFlags::NONBLOCK));
    flags.map_err(|e| api(ErrorCode::Io, format!("cannot set up the key pipe: {e}")))?;
    Ok(file)
}

impl Daemon {
    /// The four dm-crypt requests.
    pub(crate) async fn dm_crypt(
        &self,
        request: Request,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        match request {
            Request::OpenDmCrypt(r) => {
                require_root(caller, "open a volume with dm-crypt")?;
                // The device-mapper name too: two volumes must not be given one name.
                let _g = (self.state.locks)
                    .lock(&[
                        crate::locks::volume(&r.volume),
                        crate::locks::dm_name(&r.name),
                    ])
                    .await;
                self.open_dm_crypt(r, caller, ctx).await
            }
            Request::DmCryptOpened {
                volume,
                name,
                error,
            } => {
                require_root(caller, "report a dm-crypt open")?;
                self.dm_crypt_opened(&volume, &name, error, caller)
            }
            Request::CloseDmCrypt { name } => {
                require_root(caller, "close a dm-crypt mapping")?;
                self.close_dm_crypt(&name)
            }
            Request::DmCryptClosed {
                volume,
                name,
                error,
            } => {
                require_root(caller, "report a dm-crypt close")?;
                self.dm_crypt_closed(&volume, &name, error, caller)
            }
            other => Err(api(
                ErrorCode::Internal,
                format!(
                    "not a dm-crypt request: {:?}",
                    std::mem::discriminant(&other)
                ),
            )),
        }
    }

    /// Refuses `operation` on `volume` (at `path`) while the volume is mapped by dm-crypt:
    /// `attach`, `delete`, and the operations in [`REFUSED_WHILE_MAPPED`]. A volume whose
    /// header cannot be read is let through: the operation reports that itself.
    pub(crate) fn refuse_while_dm_open(
        &self,
        volume: &str,
        path: &Path,
        operation: &str,
    ) -> Result<(), Error> {
        if !refused_while_mapped(operation) {
            return Ok(());
        }
        let mappings = scan(Path::new(SYS_BLOCK));
        let Some(uuid) = uuid_if_luks2_mapped(path, &mappings) else {
            return Ok(());
        };
        check_not_mapped(volume, &uuid, path, &mappings)
    }

    /// The dm-crypt device of a volume, for `list` (None when not mapped).
    pub(crate) fn dm_crypt_device(&self, path: &Path, mappings: &[Mapping]) -> Option<String> {
        let uuid = uuid_if_luks2_mapped(path, mappings)?;
        serving(mappings, &uuid, path).map(Mapping::device)
    }

    /// The volume a client's report (`dm-crypt-opened`, `dm-crypt-closed`) names, with its
    /// header: refused for a bad name or no such volume.
    fn reported_volume(&self, volume: &str, name: &str) -> Result<(PathBuf, VolumeInfo), Error> {
        check_dm_name(name)?;
        let path = self.existing_volume(volume)?;
        let info = self.inspect_volume(volume).map_err(Error::from)?;
        Ok((path, info))
    }

    /// Audits a client's report on `volume`, naming its key and context.
    fn audit_report(
        &self,
        operation: &str,
        volume: &str,
        caller: Caller,
        started: Instant,
        outcome: &Result<(), String>,
    ) {
        let token = self.token(volume).ok();
        self.audit_token(operation, volume, token.as_ref(), caller, started, outcome);
    }

    /// `open-dm-crypt` (under the locks of the volume and of the device-mapper name): see the module documentation.
    async fn open_dm_crypt(
        &self,
        r: OpenDmCryptRequest,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        check_dm_name(&r.name)?;
        let path = self.existing_volume(&r.volume)?;
        self.refuse_if_detaching(&r.volume)?;
        if let Some(a) = self.state.registry.get(&r.volume) {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {} is attached through NBD (export {}): detach it first \
                     ('cryptnbdctl detach {}'); a volume is served by NBD or by dm-crypt, not both",
                    r.volume, a.export_name, r.volume
                ),
            ));
        }
        let info = self.inspect_volume(&r.volume).map_err(Error::from)?;
        let mappings = scan(Path::new(SYS_BLOCK));
        if let Some(m) = serving(&mappings, &info.uuid, &path) {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {} is already open through dm-crypt as {}",
                    r.volume,
                    m.device()
                ),
            ));
        }
        if let Some(m) = mappings.iter().find(|m| m.name == r.name) {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "the device-mapper name {} is in use ({}): choose another name",
                    r.name,
                    m.device()
                ),
            ));
        }
        if let Some(other) = self.state.dm_crypt.holder_of(&r.name) {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "the device-mapper name {} is being given to volume {other} now: choose \
                     another name",
                    r.name
                ),
            ));
        }
        let pipe = take_pipe(ctx)?;
        let cancel = Cancel::default();
        let guard = self.state.ops.begin(
            &r.volume,
            "open-dm-crypt",
            caller.uid,
            Arc::clone(&ctx.progress),
            cancel.clone(),
        )?;
        // What the audit record names, read before the KMS call (as attach does).
        let token = self.token(&r.volume).ok();
        let opts = OpenOptions {
            read_only: r.read_only,
            expect_sid: r.sid.clone(),
            expect_directory: r.directory.clone(),
        };
        let handed = async {
            let key = volume::unwrap_key(&path, &opts, &self.services.kms).await?;
            use std::io::Write as _;
            (&pipe).write_all(key.expose()).map_err(|e| {
                let why = match e.kind() {
                    std::io::ErrorKind::BrokenPipe => "nothing reads the pipe".into(),
                    std::io::ErrorKind::WouldBlock => "the pipe is full".into(),
                    _ => e.to_string(),
                };
                VolumeError::new(
                    VolumeErrorKind::Io,
                    format!("cannot write the volume key into the pipe: {why}"),
                )
            })
            // `key` is dropped here: its bytes are wiped.
        }
        .await;
        drop(pipe);
        self.audited(
            "open-dm-crypt",
            &r.volume,
            token.as_ref(),
            caller,
            started,
            handed,
        )?;
        tracing::info!(volume = %r.volume, name = %r.name, "volume key handed to cryptsetup for dm-crypt");
        self.hold(&r.volume, &r.name, guard, cancel, &info.uuid, &path, token);
        Ok(Response::DmCryptKeySent(dm_mapping(
            &r.volume,
            &r.name,
            &path,
            info,
            r.read_only,
        )))
    }

    /// Holds `volume` (its key was just handed out for the mapping `name`) until its
    /// mapping exists, the client reports, the hold is cancelled, or [`HOLD_FOR`] passes.
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &self,
        volume: &str,
        name: &str,
        guard: OpGuard,
        cancel: Cancel,
        uuid: &str,
        path: &Path,
        token: Option<KmsToken>,
    ) {
        let id = guard.running().id;
        let pending = Arc::clone(&self.state.dm_crypt.pending);
        pending.lock().unwrap_or_else(|p| p.into_inner()).insert(
            volume.into(),
            Pending {
                id,
                name: name.into(),
                guard,
            },
        );
        let (volume, name, uuid, path) = (
            volume.to_owned(),
            name.to_owned(),
            uuid.to_owned(),
            path.to_owned(),
        );
        let audit = Arc::clone(&self.services.audit);
        let backend = kms_client::Kms::backend_name(&self.services.kms).to_owned();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(POLL).await;
                let mapped = mapping_named(&name, &uuid, &path).is_some();
                let expired = started.elapsed() >= HOLD_FOR;
                if !(mapped || expired || cancel.is_cancelled()) {
                    continue;
                }
                let mut map = pending.lock().unwrap_or_else(|p| p.into_inner());
                if map.get(&volume).is_none_or(|p| p.id != id) {
                    // The client reported first.
                    return;
                }
                map.remove(&volume);
                drop(map);
                if !mapped {
                    let why = if expired {
                        format!("no report from cryptnbdctl within {} s", HOLD_FOR.as_secs())
                    } else {
                        "cancelled".into()
                    };
                    tracing::warn!(volume = %volume, name = %name, "the volume key was handed out but no dm-crypt mapping appeared ({why}); the volume is free again");
                    let held_for = started.elapsed();
                    record_unmapped(
                        &audit,
                        &backend,
                        &volume,
                        &name,
                        token.as_ref(),
                        &why,
                        held_for,
                    );
                }
                return;
            }
        });
    }

    /// `dm-crypt-opened`: the client's report of `cryptsetup open`, checked against the
    /// kernel and audited; ends the hold.
    fn dm_crypt_opened(
        &self,
        volume: &str,
        name: &str,
        error: Option<String>,
        caller: Caller,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let (path, info) = self.reported_volume(volume, name)?;
        let held = self.state.dm_crypt.release(volume, name);
        let mapping = mapping_named(name, &info.uuid, &path);
        if !held && mapping.is_none() {
            return Err(api(
                ErrorCode::NotFound,
                format!(
                    "no open of volume {volume} as {name} is under way, and no such mapping \
                     exists (a report must follow 'open-dm-crypt' within {} s)",
                    HOLD_FOR.as_secs()
                ),
            ));
        }
        let outcome = match (&mapping, &error) {
            (Some(_), _) => Ok(()),
            (None, Some(e)) => Err(format!("cryptsetup open failed: {e}")),
            (None, None) => Err(format!(
                "cryptsetup reported success but the kernel has no mapping {name} of this volume"
            )),
        };
        self.audit_report("dm-crypt-opened", volume, caller, started, &outcome);
        match (mapping, outcome) {
            (Some(m), _) => {
                tracing::info!(volume, device = %m.device(), "open through dm-crypt");
                Ok(Response::DmCryptOpened(dm_mapping(
                    volume,
                    name,
                    &path,
                    info,
                    m.read_only,
                )))
            }
            (None, outcome) => Err(api(
                ErrorCode::Io,
                format!(
                    "{}; the volume is free again",
                    outcome.err().unwrap_or_default()
                ),
            )),
        }
    }

    /// `close-dm-crypt`: which volume of this daemon the mapping `name` serves. Refused for
    /// mappings that are not LUKS2 dm-crypt ones or not of a volume here.
    fn close_dm_crypt(&self, name: &str) -> Result<Response, Error> {
        check_dm_name(name)?;
        let m = scan(Path::new(SYS_BLOCK))
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                api(
                    ErrorCode::NotFound,
                    format!(
                        "there is no device-mapper device {name} ({} does not exist; see \
                         'cryptnbdctl list' for the volumes open through dm-crypt)",
                        device(name)
                    ),
                )
            })?;
        if m.luks2_uuid().is_none() {
            return Err(api(
                ErrorCode::InvalidRequest,
                format!(
                    "{} is not a LUKS2 dm-crypt mapping (device-mapper UUID '{}'): cryptnbdctl \
                     closes only the mappings of its volumes",
                    m.device(),
                    m.uuid
                ),
            ));
        }
        let volumes = statedir::summary::scan_volumes(&*self.services.catalog, |_| false)
            .map_err(|e| api(ErrorCode::Io, format!("cannot list the volumes: {e}")))?;
        for v in volumes {
            let path = PathBuf::from(&v.path);
            let Ok(info) = self.inspect_volume(&v.name) else {
                continue;
            };
            if serves(&m, &info.uuid, &path) {
                return Ok(Response::DmCryptMapping(dm_mapping(
                    &v.name,
                    name,
                    &path,
                    info,
                    m.read_only,
                )));
            }
        }
        Err(api(
            ErrorCode::NotFound,
            format!(
                "{} maps a LUKS2 device that is not a volume of this cryptnbd: close it with \
                 'cryptsetup close {name}'",
                m.device()
            ),
        ))
    }

    /// `dm-crypt-closed`: the client's report of `cryptsetup close`, checked against the
    /// kernel and audited.
    fn dm_crypt_closed(
        &self,
        volume: &str,
        name: &str,
        error: Option<String>,
        caller: Caller,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let (path, info) = self.reported_volume(volume, name)?;
        let still = mapping_named(name, &info.uuid, &path).is_some();
        let outcome = match (still, &error) {
            (false, None) => Ok(()),
            (_, Some(e)) => Err(format!("cryptsetup close failed: {e}")),
            (true, None) => Err(format!(
                "cryptsetup reported success but {} still exists",
                device(name)
            )),
        };
        self.audit_report("close-dm-crypt", volume, caller, started, &outcome);
        match outcome {
            Ok(()) => {
                tracing::info!(volume, name, "dm-crypt mapping closed");
                Ok(Response::DmCryptClosed {
                    volume: volume.into(),
                    name: name.into(),
                })
            }
            Err(e) => Err(api(ErrorCode::Io, e)),
        }
    }
}

/// The audit record of a key handed out for a mapping that never appeared, after the
/// volume was held for `held_for` (all of [`HOLD_FOR`], or less when cancelled).
fn record_unmapped(
    audit: &AuditLog,
    backend: &str,
    volume: &str,
    name: &str,
    token: Option<&KmsToken>,
    why: &str,
    held_for: Duration,
) {
    audit.record(&AuditRecord::about_volume(
        "dm-crypt-opened",
        backend,
        volume,
        token.map(|t| t.key_id.as_str()),
        token.map(|t| t.context.pairs()),
        None,
        held_for,
        &Err(format!("no mapping {name} appeared ({why})")),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0b6ad0e6-5a43-4b5e-9a36-6a1ff3cf7f0e";
    const DM_UUID: &str = "CRYPT-LUKS2-0b6ad0e65a434b5e9a366a1ff3cf7f0e-home";

    fn mapping(name: &str, uuid: &str, backing: Vec<PathBuf>) -> Mapping {
        Mapping {
            name: name.into(),
            uuid: uuid.into(),
            read_only: false,
            backing,
        }
    }

    /// A fake `/sys/block` with one dm device on a loop device.
    fn fake_sys(dir: &Path, backing_file: &str) -> PathBuf {
        let sys = dir.join("block");
        let write = |p: PathBuf, s: &str| {
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, s).expect("write");
        };
        write(
            sys.join("loop3/loop/backing_file"),
            &format!("{backing_file}\n"),
        );
        write(sys.join("dm-0/dm/name"), "home\n");
        write(sys.join("dm-0/dm/uuid"), &format!("{DM_UUID}\n"));
        write(sys.join("dm-0/ro"), "1\n");
        std::fs::create_dir_all(sys.join("dm-0/slaves")).expect("mkdir");
        std::os::unix::fs::symlink("../../loop3", sys.join("dm-0/slaves/loop3")).expect("link");
        write(sys.join("dm-1/dm/name"), "vg-root\n");
        write(sys.join("dm-1/dm/uuid"), "LVM-abc\n");
        write(sys.join("dm-1/ro"), "0\n");
        write(sys.join("vda/ro"), "0\n");
        sys
    }

    #[test]
    fn luks2_uuid_of_cryptsetup_names() {
        let m = mapping("home", DM_UUID, vec![]);
        assert_eq!(m.luks2_uuid(), Some("0b6ad0e65a434b5e9a366a1ff3cf7f0e"));
        for other in [
            "",
            "LVM-xyz",
            "CRYPT-LUKS1-0b6ad0e65a434b5e9a366a1ff3cf7f0e-home",
            "CRYPT-PLAIN-home",
            "CRYPT-LUKS2-0b6ad0e6-home",
            "CRYPT-LUKS2-zz6ad0e65a434b5e9a366a1ff3cf7f0e-home",
        ] {
            assert_eq!(mapping("x", other, vec![]).luks2_uuid(), None, "{other}");
        }
        assert_eq!(m.device(), "/dev/mapper/home");
    }

    #[test]
    fn scan_reads_names_uuids_and_loop_backing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = fake_sys(dir.path(), "/var/lib/cryptnbd/volumes/home.luks (deleted)");
        let found = scan(&sys);
        assert_eq!(
            found,
            vec![
                Mapping {
                    name: "home".into(),
                    uuid: DM_UUID.into(),
                    read_only: true,
                    backing: vec![PathBuf::from("/var/lib/cryptnbd/volumes/home.luks")],
                },
                mapping("vg-root", "LVM-abc", vec![]),
            ]
        );
        assert!(scan(&dir.path().join("none")).is_empty());
    }

    #[test]
    fn serves_tells_copies_with_the_same_uuid_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("v.luks");
        let snap = dir.path().join("snap.luks");
        std::fs::write(&vol, b"v").expect("write");
        std::fs::write(&snap, b"s").expect("write");
        let upper = UUID.to_uppercase();
        // On this file, or on a device that is not a loop device: it is this volume.
        assert!(serves(
            &mapping("home", DM_UUID, vec![vol.clone()]),
            UUID,
            &vol
        ));
        assert!(serves(&mapping("home", DM_UUID, vec![]), &upper, &vol));
        // On a loop device whose file is gone: the UUID decides.
        let gone = dir.path().join("gone.luks");
        assert!(serves(&mapping("home", DM_UUID, vec![gone]), UUID, &vol));
        // On a snapshot of it: not this volume.
        assert!(!serves(&mapping("home", DM_UUID, vec![snap]), UUID, &vol));
        // Another UUID, or not LUKS2.
        assert!(!serves(
            &mapping("home", DM_UUID, vec![vol.clone()]),
            "11111111-5a43-4b5e-9a36-6a1ff3cf7f0e",
            &vol
        ));
        assert!(!serves(
            &mapping("home", "LVM-x", vec![vol.clone()]),
            UUID,
            &vol
        ));
        let m = mapping("home", DM_UUID, vec![]);
        let e = mapped_refusal("v", &m);
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert_eq!(
            e.message(),
            "volume v is open through dm-crypt as /dev/mapper/home; run 'cryptnbdctl close home' first"
        );
    }

    #[test]
    fn what_a_mapping_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("v.luks");
        std::fs::write(&vol, b"v").expect("write");
        for op in [
            "attach",
            "delete",
            "rebuild",
            "snapshot",
            "reencrypt",
            "export",
            "header-restore",
        ] {
            assert!(refused_while_mapped(op), "{op}");
        }
        for op in [
            "import",
            "rekey",
            "recovery-add",
            "recovery-remove",
            "header-backup",
        ] {
            assert!(!refused_while_mapped(op), "{op}");
        }
        let other = mapping(
            "x",
            "CRYPT-LUKS2-11111111111111111111111111111111-x",
            vec![],
        );
        let lvm = mapping("vg-root", "LVM-abc", vec![]);
        let home = mapping("home", DM_UUID, vec![vol.clone()]);
        assert!(check_not_mapped("v", UUID, &vol, &[other.clone(), lvm.clone()]).is_ok());
        let e = check_not_mapped("v", UUID, &vol, &[other, lvm, home]).expect_err("mapped");
        assert!(e.message().contains("as /dev/mapper/home"), "{e}");
    }

    #[test]
    fn only_root_may_hand_out_keys() {
        let e = require_root(
            Caller {
                uid: 1000,
                gid: 1000,
            },
            "open a volume with dm-crypt",
        )
        .expect_err("uid 1000 refused");
        assert_eq!(e.code(), ErrorCode::PermissionDenied);
        assert!(
            e.message().contains("only root") && e.message().contains("uid 1000"),
            "{e}"
        );
        assert!(require_root(Caller { uid: 0, gid: 0 }, "x").is_ok());
    }

    #[test]
    fn only_pipes_receive_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::create(dir.path().join("f")).expect("create");
        let mut ctx = RequestContext {
            fd: Some(file.into()),
            ..RequestContext::default()
        };
        let e = take_pipe(&mut ctx).expect_err("a file is refused");
        assert_eq!(e.code(), ErrorCode::InvalidRequest);
        assert!(e.message().contains("never into a file"), "{e}");
        let mut none = RequestContext::default();
        assert!(take_pipe(&mut none).is_err());
        let (_reader, writer) = std::io::pipe().expect("pipe");
        let mut ctx = RequestContext {
            fd: Some(writer.into()),
            ..RequestContext::default()
        };
        assert!(take_pipe(&mut ctx).is_ok());
    }
}
