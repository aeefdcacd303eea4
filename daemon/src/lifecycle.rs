//! The volume lifecycle operations (docs/cli.md): import at create, rebuild, snapshots,
//! rekey, re-encryption, recovery keyslots, plaintext export, header backup and restore.
//!
//! Rules every operation here follows:
//! - One operation per volume at a time ([`crate::ops::Operations`]); attach, detach and
//!   delete of a busy volume are refused too.
//! - Files the caller names are opened by the caller (`cryptnbdctl`) and passed as a
//!   descriptor: the daemon, often root, never opens a path on a caller's behalf.
//! - New content is built in a hidden temporary file next to the target (`.NAME.*.luks`),
//!   synced, and renamed over the target: a crash leaves the old file or the new one, whole.
//!   Leftover temporaries are wiped at start ([`Daemon::clean_leftovers`]).
//! - Long loops run on blocking threads, report progress and stop at the next step when
//!   cancelled (a closed control connection cancels too); the temporary is then wiped.
//! - Every operation writes one audit record with its outcome.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use control_api::paths::validate_name;
use control_api::{
    AttachRequest, BaseImage, DetachRequest, ErrorCode, ExportRequest, ImageSource, RebuildRequest,
    RebuildSource, RekeyRequest, Response, SnapshotInfo,
};
use kms_client::{EncryptionContext, Kms};
use store::BackingStore;
use store::catalog::{Catalog, Staged};
use store::file::Access;
use volume::lifecycle::{self, Cancel, Progress};
use volume::token::KmsToken;
use volume::{CreateOptions, OpenOptions, Volume, VolumeError, VolumeErrorKind};

use statedir::stamp::rfc3339;

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::error::{Error, api, chain};
use crate::request::RequestContext;
use crate::staging::{DiscardOnDrop, discard_in, publish_new_in, publish_replacing_in, stage_in};

/// A volume file to change the header of (see [`Daemon::header_file`]).
enum HeaderFile {
    /// The attached volume's descriptor.
    Attached(Arc<Volume>),
    /// Opened (and locked) for this change, through the catalog.
    Own(Box<dyn BackingStore>),
}

impl HeaderFile {
    fn get(&self) -> &dyn BackingStore {
        match self {
            HeaderFile::Attached(v) => v.store(),
            HeaderFile::Own(f) => &**f,
        }
    }
}

/// Runs blocking volume work on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, VolumeError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(VolumeError::new(
            VolumeErrorKind::Io,
            format!("the operation's worker failed: {e}"),
        ))
    })
}

pub use statedir::summary::base_image_of;

/// Size of a passed image: the file's size for a regular file (it must agree with a size the
/// client gave), else the client's size.
fn image_size(file: &File, src: &ImageSource) -> Result<u64, Error> {
    let meta = file
        .metadata()
        .map_err(|e| api(ErrorCode::Io, format!("cannot stat {}: {e}", src.path)))?;
    if meta.is_file() {
        if let Some(s) = src.size
            && s != meta.len()
        {
            return Err(api(
                ErrorCode::InvalidRequest,
                format!("{} is {} bytes, not {s}", src.path, meta.len()),
            ));
        }
        return Ok(meta.len());
    }
    src.size.ok_or_else(|| {
        api(
            ErrorCode::InvalidRequest,
            format!("{} is a stream: its size must be given with it", src.path),
        )
    })
}

/// `bytes` in MiB with one decimal, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// The directory a file lives in, for messages.
fn dir_of(path: &Path) -> String {
    path.parent()
        .map_or_else(|| path.display().to_string(), |d| d.display().to_string())
}

/// A full filesystem said in the words of the operation that hit it: what needed the room,
/// where, and that nothing changed (`explain`); the low-level error stays as the cause.
/// Other errors pass through unchanged.
fn explain_no_space(e: VolumeError, explain: impl FnOnce() -> String) -> VolumeError {
    if e.kind() == VolumeErrorKind::NoSpace {
        VolumeError::new(VolumeErrorKind::NoSpace, explain()).with_source(e)
    } else {
        e
    }
}

/// What `snapshots` tells of snapshot `name` (of `volume`, in its catalog of snapshots).
fn snapshot_info(snaps: &dyn Catalog, volume: &str, name: &str) -> SnapshotInfo {
    SnapshotInfo {
        volume: volume.into(),
        name: name.into(),
        path: snaps.location(name).display().to_string(),
        created: snaps.modified(name).map(rfc3339).unwrap_or_default(),
        size: volume::open_in(snaps, name, Access::Inspect)
            .and_then(|s| volume::inspect_store(&*s))
            .map(|i| i.size)
            .unwrap_or(0),
        method: None,
    }
}

impl Daemon {
    /// Takes `volume` for a long operation. Under the volume's lock, so that an attach,
    /// detach or delete that checked the volume idle cannot interleave.
    pub(crate) async fn begin(
        &self,
        volume: &str,
        operation: &'static str,
        caller: Caller,
        ctx: &RequestContext,
    ) -> Result<crate::ops::OpGuard, Error> {
        let _g = self.state.locks.lock(&[crate::locks::volume(volume)]).await;
        self.refuse_if_detaching(volume)?;
        self.refuse_while_dm_open(volume, &self.services.layout.volume_file(volume), operation)?;
        self.state.ops.begin(
            volume,
            operation,
            caller.uid,
            Arc::clone(&ctx.progress),
            ctx.cancel.clone(),
        )
    }

    /// A new store staged in the volumes catalog (see [`stage_in`]).
    fn stage(&self, name: &str, operation: &str) -> Result<Staged, VolumeError> {
        stage_in(&*self.services.catalog, name, operation)
    }

    /// Wipes and discards a staged store of the volumes catalog (see [`discard_in`]).
    fn discard_staged(&self, staged: Staged) {
        discard_in(&*self.services.catalog, staged);
    }

    /// Publishes `staged` as a new volume (see [`publish_new_in`]).
    fn publish_new(&self, staged: Staged) -> Result<(), VolumeError> {
        publish_new_in(&*self.services.catalog, staged)
    }

    /// Swaps `staged` in for its volume (see [`publish_replacing_in`]).
    fn publish_replacing(&self, staged: Staged) -> Result<(), VolumeError> {
        publish_replacing_in(&*self.services.catalog, staged)
    }

    /// Where volume `name` is, refused when the catalog has no such volume.
    pub(crate) fn existing_volume(&self, name: &str) -> Result<PathBuf, Error> {
        let path = self.volume_path(name)?;
        if !self.services.catalog.exists(name) {
            // A store that cannot be asked (a cluster that does not answer) is not "no such
            // volume".
            if let Err(e) = self.services.catalog.list() {
                return Err(api(
                    ErrorCode::Io,
                    format!("cannot look up volume {name}: {e}"),
                ));
            }
            return Err(api(
                ErrorCode::NotFound,
                format!("no volume {name}: see 'cryptnbdctl list'"),
            ));
        }
        Ok(path)
    }

    /// The `cryptnbd-kms` token of volume `name`, read through the catalog (no lock, no KMS).
    pub(crate) fn token(&self, name: &str) -> Result<KmsToken, Error> {
        volume::open_in(&*self.services.catalog, name, Access::Inspect)
            .and_then(|store| lifecycle::read_token_in(&*store))
            .map_err(Error::from)
    }

    /// Audits the outcome of an operation and maps its error for the API: the one way every
    /// lifecycle operation ends.
    pub(crate) fn audited<T>(
        &self,
        operation: &str,
        volume: &str,
        token: Option<&KmsToken>,
        caller: Caller,
        started: Instant,
        result: Result<T, VolumeError>,
    ) -> Result<T, Error> {
        let outcome = result.as_ref().map(|_| ()).map_err(|e| chain(e));
        self.audit_token(operation, volume, token, caller, started, &outcome);
        result.map_err(Error::from)
    }

    /// Audits `outcome`, naming the key and context of `token` (when it could be read).
    pub(crate) fn audit_token(
        &self,
        operation: &str,
        volume: &str,
        token: Option<&KmsToken>,
        caller: Caller,
        started: Instant,
        outcome: &Result<(), String>,
    ) {
        self.audit_record(
            operation,
            volume,
            token.map(|t| t.key_id.as_str()),
            token.map(|t| t.context.pairs()),
            Some(caller),
            started,
            outcome,
        );
    }

    /// Wipes the temporaries a crash left behind (`.NAME.*.luks` and `.NAME.luks.creating-*`
    /// in the volume and snapshot directories). Called at start, before anything is attached.
    pub fn clean_leftovers(&self) {
        let volumes = &self.services.catalog;
        let mut catalogs: Vec<Arc<dyn Catalog>> = vec![Arc::clone(volumes) as Arc<dyn Catalog>];
        catalogs.extend(
            volumes
                .list()
                .unwrap_or_default()
                .iter()
                .filter_map(|name| volumes.snapshots(name).ok()),
        );
        for catalog in catalogs {
            for left in catalog.leftovers().unwrap_or_default() {
                tracing::warn!(path = %left.location.display(), "removing the leftover of an interrupted operation");
                // It may hold a header with a wrapped key: wiped before it goes.
                if let Ok(store) = catalog.open_staged(&left) {
                    let _ = volume::wipe_header_area(&*store);
                }
                if let Err(e) = catalog.discard(left) {
                    tracing::warn!(error = %e, "cannot remove a leftover");
                }
            }
        }
    }

    /// `create --from-image`: a new volume filled from the passed image, linked into place
    /// only when complete.
    pub(crate) async fn create_from_image(
        &self,
        opts: CreateOptions,
        r: &control_api::CreateRequest,
        path: &Path,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<(), VolumeError> {
        let (name, record_base) = (r.name.as_str(), r.record_base);
        let src = r
            .from_image
            .as_ref()
            .ok_or_else(|| VolumeError::new(VolumeErrorKind::InvalidArgument, "no image given"))?;
        let file = ctx
            .take_fd("--from-image")
            .map_err(|e| VolumeError::new(VolumeErrorKind::InvalidArgument, e.message()))?;
        let len = image_size(&file, src)
            .map_err(|e| VolumeError::new(VolumeErrorKind::InvalidArgument, e.message()))?;
        let mut opts = opts;
        let ss = u64::from(opts.sector_size);
        if opts.size == 0 {
            opts.size = len.div_ceil(ss).max(1) * ss;
        }
        // Before any KMS call or file: a --size too small for the image.
        if len > opts.size {
            return Err(VolumeError::new(
                VolumeErrorKind::InvalidArgument,
                format!(
                    "the image {} is {len} bytes, larger than the --size of {} bytes: give \
                     --size {} or more, or leave --size out to use the image's size; nothing \
                     was created",
                    src.path,
                    opts.size,
                    len.div_ceil(ss) * ss
                ),
            ));
        }
        let _guard = self
            .begin(name, "import", caller, ctx)
            .await
            .map_err(|e| VolumeError::new(VolumeErrorKind::InUse, e.message()))?;
        self.refuse_existing(name)?;
        let mut staged = self
            .services
            .catalog
            .stage_in(r.store.as_deref(), name, "importing")
            .map_err(|e| VolumeError::io(path, "creating the new volume", e))?;
        let handle = staged.handle();
        let store = staged.take_store();
        let built = self
            .build_from_image(store, &opts, file, len, src, ctx)
            .await;
        let result = (|| -> Result<_, VolumeError> {
            let (vol, sha256) = built?;
            if record_base {
                let base = BaseImage {
                    path: src.path.clone(),
                    size: len,
                    sha256,
                    format: src.format.clone(),
                };
                lifecycle::rewrite_token(vol.store(), |t| {
                    t.extra.insert(
                        "base_image".into(),
                        serde_json::to_value(&base).unwrap_or_default(),
                    );
                })?;
            }
            drop(vol);
            self.publish_new(staged)
        })();
        if result.is_err() {
            self.discard_staged(handle);
        }
        result.map_err(|e| {
            explain_no_space(e, || {
                format!(
                    "importing {} into the new volume {name} needs up to {} (the volume's \
                     size) in {}, and that filesystem is full: free space there and retry; \
                     nothing was created",
                    src.path,
                    mib(opts.size),
                    dir_of(path)
                )
            })
        })
    }

    /// A new volume formatted on the staged `store` (a fresh data key per `opts`) filled with
    /// `len` bytes of the image `file`; returns it with the image's SHA-256. On error the
    /// staged store remains: the caller discards it.
    async fn build_from_image(
        &self,
        store: Option<Box<dyn BackingStore>>,
        opts: &CreateOptions,
        file: File,
        len: u64,
        src: &ImageSource,
        ctx: &RequestContext,
    ) -> Result<(Arc<Volume>, String), VolumeError> {
        let store = store.ok_or_else(|| {
            VolumeError::new(VolumeErrorKind::Io, "the staged store was already taken")
        })?;
        let vol = Arc::new(Volume::create_on(store, opts, &self.services.kms).await?);
        let (progress, cancel) = (Arc::clone(&ctx.progress), ctx.cancel.clone());
        let what = format!("the image {}", src.path);
        let v = Arc::clone(&vol);
        let sha = blocking(move || {
            let mut file = file;
            lifecycle::fill_from(&v, &mut file, len, &what, &progress, &cancel)
        })
        .await?;
        Ok((vol, sha))
    }

    /// Detaches `name` for an operation that needs the file to itself (`force`), or refuses.
    /// Returns how to re-attach it.
    async fn detach_for(
        &self,
        name: &str,
        force: bool,
        what: &str,
        caller: Caller,
    ) -> Result<Option<(AttachRequest, u32)>, Error> {
        let _g = self.state.locks.lock(&[crate::locks::volume(name)]).await;
        let Some(a) = self.state.registry.get(name) else {
            return Ok(None);
        };
        if !force {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {name} is attached: detach it first, or use --force to detach it \
                     (draining clients), {what} and re-attach it under the same export"
                ),
            ));
        }
        let mut request = a.request.clone();
        // Re-attached with the allow-list in force, which `tls allow` may have changed.
        request.allow_certs = a.allow_certs();
        let saved = (request, a.owner_uid);
        drop(a);
        let detached = self
            .detach(
                DetachRequest {
                    volume: name.into(),
                    force: true,
                },
                Some(caller),
            )
            .await?;
        if let Response::Detached {
            pending: Some(p), ..
        } = detached
        {
            // The old volume is still open under the stuck requests: replacing its file now
            // would lose what they write.
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {name} was detached, but not finished ({p}); nothing else was done: retry once 'cryptnbdctl status' no longer lists it as detaching"
                ),
            ));
        }
        Ok(Some(saved))
    }

    async fn reattach(&self, saved: Option<(AttachRequest, u32)>, caller: Caller) -> bool {
        let Some((request, owner)) = saved else {
            return false;
        };
        let volume = request.volume.clone();
        let _g = self
            .state
            .locks
            .lock(&[crate::locks::volume(&volume)])
            .await;
        match self
            .attach_as(request, Some(caller), Some(owner), None)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(volume = %volume, error = %e.message(), "cannot re-attach after the operation");
                false
            }
        }
    }

    /// Checks that the KMS still unwraps the volume's key under its context (a disabled or
    /// pending-deletion master key, or a changed context, stops the operation here).
    async fn check_unwrap(&self, path: &Path, token: &KmsToken) -> Result<(), VolumeError> {
        let wrapped = token.wrapped_in(path)?;
        self.services
            .kms
            .decrypt(&wrapped, &token.context, &token.key_id)
            .await
            .map(drop)
            .map_err(|e| VolumeError::kms(path, "unwrap the current volume key", e))
    }

    fn create_options_like(
        token: &KmsToken,
        size: u64,
        sector_size: u32,
        path: &Path,
    ) -> Result<CreateOptions, VolumeError> {
        let identity = token.identity_in(path)?;
        Ok(CreateOptions {
            size,
            sector_size,
            key_id: token.key_id.clone(),
            identity,
            context_keys: token.context_keys.clone(),
            extra_context: lifecycle::extra_context(token),
        })
    }

    /// `rebuild`.
    pub(crate) async fn rebuild(
        &self,
        r: RebuildRequest,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let path = self.existing_volume(&r.volume)?;
        let _guard = self.begin(&r.volume, "rebuild", caller, ctx).await?;
        let token = self.token(&r.volume)?;
        let source_name = match &r.source {
            RebuildSource::BaseImage(s) | RebuildSource::Image(s) => format!("image {}", s.path),
            RebuildSource::Snapshot { name } => format!("snapshot {name}"),
        };
        let result = self.rebuild_inner(&r, &path, &token, caller, ctx).await;
        let outcome = result.as_ref().map(|_| ()).map_err(|e| e.message().clone());
        self.audit_token(
            "rebuild",
            &r.volume,
            Some(&token),
            caller,
            started,
            &outcome,
        );
        let (bytes, reattached) = result?;
        tracing::info!(volume = %r.volume, source = %source_name, "rebuilt");
        self.label_volume(&r.volume);
        Ok(Response::Rebuilt {
            volume: r.volume,
            source: source_name,
            bytes,
            reattached,
        })
    }

    async fn rebuild_inner(
        &self,
        r: &RebuildRequest,
        path: &Path,
        token: &KmsToken,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<(u64, bool), Error> {
        // Attached without --force: refused now, not after building a whole new copy (the
        // swap would refuse it then anyway).
        if !r.force && self.state.registry.get(&r.volume).is_some() {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {} is attached: detach it first, or use --force to detach it \
                     (draining clients), rebuild it and re-attach it under the same export; \
                     nothing was changed",
                    r.volume
                ),
            ));
        }
        // The KMS first: nothing is touched if it refuses.
        self.check_unwrap(path, token).await.map_err(Error::from)?;
        let info = self.inspect_volume(&r.volume).map_err(Error::from)?;
        let mut staged = self.stage(&r.volume, "rebuilding").map_err(Error::from)?;
        // Every way out before the swap (a refused image, a failed build, a cancel) discards
        // the staged file.
        let _cleanup = DiscardOnDrop {
            catalog: &*self.services.catalog,
            staged: Some(staged.handle()),
        };
        // Build the new file completely while the volume may still be attached.
        let built: Result<u64, VolumeError> = match &r.source {
            RebuildSource::BaseImage(src) | RebuildSource::Image(src) => {
                let base = matches!(r.source, RebuildSource::BaseImage(_))
                    .then(|| base_image_of(&token.extra))
                    .flatten();
                if matches!(r.source, RebuildSource::BaseImage(_)) && base.is_none() {
                    return Err(api(
                        ErrorCode::InvalidRequest,
                        format!(
                            "volume {} has no recorded base image: give --from-image or \
                             --from-snapshot",
                            r.volume
                        ),
                    ));
                }
                let file = ctx.take_fd("rebuild from an image")?;
                let len = image_size(&file, src)?;
                // A rebuild keeps the volume's size: refused before any KMS call or file.
                if len > info.size {
                    return Err(api(
                        ErrorCode::InvalidRequest,
                        format!(
                            "the image {} is {len} bytes, larger than volume {} ({} bytes): a \
                             rebuild keeps the volume's size, so use an image of at most {} \
                             bytes, or import this one as a new volume with 'cryptnbdctl \
                             create NAME --from-image {}'; nothing was changed",
                            src.path, r.volume, info.size, info.size, src.path
                        ),
                    ));
                }
                if let Some(b) = &base
                    && b.size != len
                {
                    return Err(api(
                        ErrorCode::Conflict,
                        format!(
                            "the base image {} is {len} bytes now but was {} when recorded: it \
                             changed; rebuild with --from-image to use it as it is",
                            src.path, b.size
                        ),
                    ));
                }
                let opts = Self::create_options_like(token, info.size, info.sector_size, path)
                    .map_err(Error::from)?;
                match self
                    .build_from_image(staged.take_store(), &opts, file, len, src, ctx)
                    .await
                {
                    Ok((vol, sha)) => {
                        if let Some(b) = &base
                            && b.sha256 != sha
                        {
                            drop(vol);
                            return Err(api(
                                ErrorCode::Conflict,
                                format!(
                                    "the base image {} changed since it was recorded (SHA-256 \
                                     {sha}, recorded {}); nothing was changed: rebuild with \
                                     --from-image to use it as it is",
                                    src.path, b.sha256
                                ),
                            ));
                        }
                        // Keep what the old token recorded beyond the key (the base image).
                        let extra = token.extra.clone();
                        let kept = lifecycle::rewrite_token(vol.store(), |t| {
                            t.extra = extra;
                        });
                        kept.map(|_| len)
                    }
                    Err(e) => Err(e),
                }
            }
            RebuildSource::Snapshot { name } => {
                self.restore_snapshot_into(&r.volume, name, token, &staged, ctx)
                    .await
            }
        };
        let bytes = match built {
            Ok(b) => b,
            Err(e) => {
                let e = explain_no_space(e, || {
                    format!(
                        "rebuilding volume {} needs room for a second copy of it (up to {}) \
                         in {} until the swap, and that filesystem is full: free space there \
                         and retry; volume {} is unchanged",
                        r.volume,
                        mib(info.size),
                        dir_of(path),
                        r.volume
                    )
                });
                return Err(Error::from(e));
            }
        };
        if let Err(e) = ctx.cancel.check("the rebuild") {
            return Err(Error::from(e));
        }
        let saved = match self
            .detach_for(&r.volume, r.force, "rebuild it", caller)
            .await
        {
            Ok(s) => s,
            Err(e) => return Err(e),
        };
        let swapped = self.publish_replacing(staged);
        let reattached = self.reattach(saved, caller).await;
        swapped.map_err(Error::from)?;
        Ok((bytes, reattached))
    }

    /// The length of volume `name`'s store (0 if it cannot be read), for messages.
    fn stored_len(&self, name: &str) -> u64 {
        volume::open_in(&*self.services.catalog, name, Access::Inspect)
            .ok()
            .and_then(|s| s.len().ok())
            .unwrap_or(0)
    }

    /// The catalog of `volume`'s snapshots.
    fn snapshots_of(&self, volume: &str) -> Result<Arc<dyn Catalog>, VolumeError> {
        self.services.catalog.snapshots(volume).map_err(|e| {
            VolumeError::io(
                &self.services.catalog.location(volume),
                "finding the snapshots",
                e,
            )
        })
    }

    /// Clones snapshot `name` into `staged` (empty, in the volumes catalog) and re-wraps its
    /// key under the volume's current master key and context (so a restore never undoes a
    /// rekey).
    async fn restore_snapshot_into(
        &self,
        volume: &str,
        name: &str,
        current: &KmsToken,
        staged: &Staged,
        ctx: &RequestContext,
    ) -> Result<u64, VolumeError> {
        let snaps = self.snapshots_of(volume)?;
        if validate_name(name).is_err() || !snaps.exists(name) {
            return Err(VolumeError::new(
                VolumeErrorKind::NotFound,
                format!(
                    "volume {volume} has no snapshot {name}: see 'cryptnbdctl snapshots {volume}'"
                ),
            ));
        }
        let snap = snaps.location(name);
        let src = volume::open_in(&*snaps, name, Access::ReadOnly)?;
        let snap_token = lifecycle::read_token_in(&*src)?;
        let wrapped = snap_token.wrapped_in(&snap)?;
        let rewrapped = self
            .services
            .kms
            .re_encrypt(
                &wrapped,
                &snap_token.context,
                &snap_token.key_id,
                &current.key_id,
                &current.context,
            )
            .await
            .map_err(|e| {
                VolumeError::kms(
                    &snap,
                    "re-wrap the snapshot's key under the volume's current key",
                    e,
                )
            })?;
        let (progress, cancel) = (Arc::clone(&ctx.progress), ctx.cancel.clone());
        let catalog = Arc::clone(&self.services.catalog);
        let (staged, current) = (staged.handle(), current.clone());
        blocking(move || {
            lifecycle::clone_in(&*catalog, &*src, &staged, "the rebuild", &progress, &cancel)?;
            let location = catalog.location(&staged.name);
            let dst = catalog
                .open_staged(&staged)
                .map_err(|e| VolumeError::io(&location, "opening the copy", e))?;
            let len = dst.len().unwrap_or(0);
            lifecycle::rewrite_token(&*dst, |t| {
                t.rewrap(
                    &rewrapped.key_id,
                    &rewrapped.wrapped,
                    current.context.clone(),
                );
                t.context_keys = current.context_keys.clone();
                // The volume's grant is the current one, not the snapshot's.
                t.set_grant(current.grant());
            })?;
            dst.flush()
                .map_err(|e| VolumeError::io(&location, "syncing", e))?;
            Ok(len)
        })
        .await
    }

    /// `snapshot`: a clone of the volume published in its catalog of snapshots (a reflink
    /// where the store can share blocks, else a sparse copy). An attached volume's writes
    /// wait while it is cloned.
    pub(crate) async fn snapshot(
        &self,
        volume: &str,
        name: Option<String>,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        self.existing_volume(volume)?;
        let name = name.unwrap_or_else(|| {
            let t = time::OffsetDateTime::now_utc();
            format!(
                "{:04}{:02}{:02}-{:02}{:02}{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        });
        validate_name(&name)
            .map_err(|m| api(ErrorCode::InvalidRequest, format!("snapshot name: {m}")))?;
        let _guard = self.begin(volume, "snapshot", caller, ctx).await?;
        let snaps = self.snapshots_of(volume).map_err(Error::from)?;
        if snaps.exists(&name) {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {volume} already has a snapshot {name}: choose another name or delete it first"
                ),
            ));
        }
        let token = self.token(volume).ok();
        let staged = stage_in(&*snaps, &name, "taking").map_err(Error::from)?;
        let handle = staged.handle();
        let attached = self
            .state
            .registry
            .get(volume)
            .map(|a| Arc::clone(a.device.volume()));
        let (progress, cancel) = (Arc::clone(&ctx.progress), ctx.cancel.clone());
        let (catalog, snaps2, volume2) = (
            Arc::clone(&self.services.catalog),
            Arc::clone(&snaps),
            volume.to_owned(),
        );
        let result = blocking(move || {
            let what = "the snapshot";
            let method = match &attached {
                Some(vol) => {
                    // Writes wait from here until the clone is done; what was acknowledged
                    // before is flushed into the store first.
                    let _paused = vol.pause_writes();
                    vol.flush()?;
                    lifecycle::clone_in(&*snaps2, vol.store(), &staged, what, &progress, &cancel)?
                }
                None => {
                    let src = volume::open_in(&*catalog, &volume2, Access::ReadOnly)?;
                    lifecycle::clone_in(&*snaps2, &*src, &staged, what, &progress, &cancel)?
                }
            };
            publish_new_in(&*snaps2, staged)?;
            Ok(method)
        })
        .await;
        if result.is_err() {
            discard_in(&*snaps, handle);
        }
        let result = result.map_err(|e| {
            explain_no_space(e, || {
                let size = self.stored_len(volume);
                format!(
                    "snapshot {name} of volume {volume} needs up to {} in {} (a copy: this \
                     filesystem cannot share blocks with a reflink), and that filesystem is \
                     full: free space there or delete old snapshots, and retry; no snapshot \
                     was made and the volume is unchanged",
                    mib(size),
                    dir_of(&snaps.location(&name))
                )
            })
        });
        let method = self.audited("snapshot", volume, token.as_ref(), caller, started, result)?;
        tracing::info!(volume, snapshot = %name, method = method.as_str(), "snapshot taken");
        let mut info = snapshot_info(&*snaps, volume, &name);
        info.method = Some(method.as_str().into());
        Ok(Response::SnapshotTaken(info))
    }

    /// The snapshots of `volume`, oldest first.
    pub fn snapshot_list(&self, volume: &str) -> Vec<SnapshotInfo> {
        let Ok(snaps) = self.snapshots_of(volume) else {
            return Vec::new();
        };
        let mut out: Vec<(std::time::SystemTime, SnapshotInfo)> = snaps
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|name| validate_name(name).is_ok())
            .filter_map(|name| {
                let t = snaps.modified(&name).ok()?;
                Some((t, snapshot_info(&*snaps, volume, &name)))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.name.cmp(&b.1.name)));
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// `snapshots`.
    pub(crate) fn snapshots(&self, volume: &str) -> Result<Response, Error> {
        self.existing_volume(volume)?;
        Ok(Response::Snapshots {
            volume: volume.into(),
            snapshots: self.snapshot_list(volume),
        })
    }

    /// `delete-snapshot`.
    pub(crate) async fn delete_snapshot(
        &self,
        volume: &str,
        name: &str,
        caller: Caller,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        validate_name(volume).map_err(|m| api(ErrorCode::InvalidRequest, m))?;
        validate_name(name)
            .map_err(|m| api(ErrorCode::InvalidRequest, format!("snapshot name: {m}")))?;
        let snaps = self.snapshots_of(volume).map_err(Error::from)?;
        if !snaps.exists(name) {
            return Err(api(
                ErrorCode::NotFound,
                format!(
                    "volume {volume} has no snapshot {name}: see 'cryptnbdctl snapshots {volume}'"
                ),
            ));
        }
        let _g = self.state.locks.lock(&[crate::locks::volume(volume)]).await;
        self.state.ops.check_idle(volume)?;
        let result = self.delete_snapshot_in(&*snaps, volume, name, caller, started);
        result.map_err(Error::from)?;
        Ok(Response::SnapshotDeleted {
            volume: volume.into(),
            name: name.into(),
        })
    }

    /// Wipes and removes snapshot `name` from `snaps` (the catalog of `volume`'s snapshots),
    /// with its audit record.
    pub(crate) fn delete_snapshot_in(
        &self,
        snaps: &dyn Catalog,
        volume: &str,
        name: &str,
        caller: Caller,
        started: Instant,
    ) -> Result<(), VolumeError> {
        let token = volume::open_in(snaps, name, Access::Inspect)
            .and_then(|s| lifecycle::read_token_in(&*s))
            .ok();
        let result = volume::wipe_and_remove_in(snaps, name);
        let outcome = result.as_ref().map(|_| ()).map_err(|e| chain(e));
        self.audit_token(
            "delete-snapshot",
            volume,
            token.as_ref(),
            caller,
            started,
            &outcome,
        );
        result
    }

    /// `rekey`: KMS ReEncrypt of the wrapped key to the new master key and context, then one
    /// header rewrite (both copies, next seqid). Works attached or not.
    pub(crate) async fn rekey(
        &self,
        r: RekeyRequest,
        caller: Caller,
        ctx: &RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let path = self.existing_volume(&r.volume)?;
        let _guard = self.begin(&r.volume, "rekey", caller, ctx).await?;
        let old = self.token(&r.volume)?;
        let result = self.rekey_inner(&r, &path, &old).await;
        let outcome = result.as_ref().map(|_| ()).map_err(|e| chain(e));
        // The record names the new keying (the old one is in the message on failure).
        let new_token = result.as_ref().ok();
        self.audit_token(
            "rekey",
            &r.volume,
            new_token.or(Some(&old)),
            caller,
            started,
            &outcome,
        );
        let token = result.map_err(Error::from)?;
        if let Some(a) = self.state.registry.get(&r.volume) {
            *a.keying.lock().unwrap_or_else(|p| p.into_inner()) = crate::registry::Keying {
                key_id: token.key_id.clone(),
                context: token.context.pairs().clone(),
            };
        }
        tracing::info!(volume = %r.volume, old_key = %old.key_id, key = %token.key_id, "rekeyed");
        self.label_volume(&r.volume);
        Ok(Response::Rekeyed {
            volume: r.volume,
            old_key_id: old.key_id,
            key_id: token.key_id.clone(),
            context: token.context.pairs().clone(),
        })
    }

    async fn rekey_inner(
        &self,
        r: &RekeyRequest,
        path: &Path,
        old: &KmsToken,
    ) -> Result<KmsToken, VolumeError> {
        let invalid = |m: String| VolumeError::new(VolumeErrorKind::InvalidArgument, m);
        let identity = old.identity_in(path)?;
        let extra = r
            .context
            .clone()
            .unwrap_or_else(|| lifecycle::extra_context(old));
        let new_context: EncryptionContext = identity
            .to_context(&old.context_keys, &extra)
            .map_err(|e| invalid(e.to_string()))?;
        let wrapped = old.wrapped_in(path)?;
        let rewrapped = self
            .services
            .kms
            .re_encrypt(
                &wrapped,
                &old.context,
                &old.key_id,
                &r.kms_key,
                &new_context,
            )
            .await
            .map_err(|e| VolumeError::kms(path, "re-wrap the volume key (ReEncrypt)", e))?;
        // A grant on the new key first (when grants are on), so the header never names a
        // key the daemon cannot use; the old grant is retired once the header is written.
        let old_grant = old.grant();
        let new_grant = if old_grant
            .as_ref()
            .is_some_and(|g| kms_client::aws::same_key(&g.key_id, &rewrapped.key_id))
        {
            old_grant.clone()
        } else {
            self.make_grant(
                path,
                &rewrapped.key_id,
                old,
                &rewrapped.wrapped,
                &new_context,
            )
            .await?
        };
        let file = self.header_file(&r.volume)?;
        let written = lifecycle::rewrite_token(file.get(), |t| {
            t.rewrap(&rewrapped.key_id, &rewrapped.wrapped, new_context);
            t.set_grant(new_grant.clone());
        });
        match (&written, &old_grant, &new_grant) {
            (Ok(_), Some(o), n) if n.as_ref() != Some(o) => self.retire(o).await,
            (Err(_), o, Some(n)) if o.as_ref() != Some(n) => self.retire(n).await,
            _ => {}
        }
        written
    }

    /// The volume file for a header change: the attached volume's own descriptor (it holds
    /// the lock), or the file opened under its lock when detached.
    fn header_file(&self, volume: &str) -> Result<HeaderFile, VolumeError> {
        Ok(match self.state.registry.get(volume) {
            Some(a) => HeaderFile::Attached(Arc::clone(a.device.volume())),
            None => HeaderFile::Own(volume::open_in(
                &*self.services.catalog,
                volume,
                Access::ReadWrite,
            )?),
        })
    }

    /// `reencrypt`: a new data key under the same master key and context, every allocated
    /// sector decrypted and re-encrypted into a new file, then an atomic swap.
    pub(crate) async fn reencrypt(
        &self,
        volume: &str,
        force: bool,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let path = self.existing_volume(volume)?;
        let _guard = self.begin(volume, "reencrypt", caller, ctx).await?;
        let token = self.token(volume)?;
        let recovery = self
            .inspect_volume(volume)
            .map(|i| i.keyslot_ids)
            .unwrap_or_default();
        let result = self
            .reencrypt_inner(volume, &path, &token, force, caller, ctx)
            .await;
        let outcome = result.as_ref().map(|_| ()).map_err(|e| e.message().clone());
        self.audit_token("reencrypt", volume, Some(&token), caller, started, &outcome);
        let (bytes, reattached) = result?;
        tracing::info!(volume, "re-encrypted under a new data key; old key wiped");
        self.label_volume(volume);
        Ok(Response::Reencrypted {
            volume: volume.into(),
            bytes,
            recovery_removed: recovery,
            reattached,
        })
    }

    async fn reencrypt_inner(
        &self,
        volume: &str,
        path: &Path,
        token: &KmsToken,
        force: bool,
        caller: Caller,
        ctx: &RequestContext,
    ) -> Result<(u64, bool), Error> {
        self.check_unwrap(path, token).await.map_err(Error::from)?;
        let saved = self
            .detach_for(volume, force, "re-encrypt it", caller)
            .await?;
        let mut staged = match self.stage(volume, "reencrypting") {
            Ok(s) => s,
            Err(e) => {
                self.reattach(saved, caller).await;
                return Err(Error::from(e));
            }
        };
        let handle = staged.handle();
        let store = staged.take_store();
        let built = async {
            let old = Arc::new(
                self.open_volume(
                    volume,
                    &OpenOptions {
                        read_only: true,
                        ..OpenOptions::default()
                    },
                )
                .await?,
            );
            let opts = Self::create_options_like(token, old.size(), old.sector_size(), path)?;
            let store = store.ok_or_else(|| {
                VolumeError::new(VolumeErrorKind::Io, "the staged store was already taken")
            })?;
            let new = Arc::new(Volume::create_on(store, &opts, &self.services.kms).await?);
            let (progress, cancel) = (Arc::clone(&ctx.progress), ctx.cancel.clone());
            let (o, n) = (Arc::clone(&old), Arc::clone(&new));
            let bytes = blocking(move || copy_allocated(&o, &n, &progress, &cancel)).await?;
            let extra = token.extra.clone();
            lifecycle::rewrite_token(new.store(), |t| t.extra = extra)?;
            Ok::<u64, VolumeError>(bytes)
        }
        .await;
        let result = match built {
            Ok(bytes) => match ctx.cancel.check("the re-encryption") {
                Ok(()) => self.publish_replacing(staged).map(|()| bytes),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.discard_staged(handle);
        }
        let result = result.map_err(|e| {
            explain_no_space(e, || {
                let size = self.stored_len(volume);
                format!(
                    "re-encrypting volume {volume} needs room for a second copy of it (up to \
                     {}) in {} until the swap, and that filesystem is full: free space there \
                     and retry; volume {volume} is unchanged",
                    mib(size),
                    dir_of(path)
                )
            })
        });
        let reattached = self.reattach(saved, caller).await;
        result.map(|b| (b, reattached)).map_err(Error::from)
    }

    /// `recovery add`: unwraps the key through the KMS, then adds an argon2id keyslot.
    pub(crate) async fn recovery_add(
        &self,
        volume: &str,
        passphrase: &control_api::Secret,
        caller: Caller,
        ctx: &RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let path = self.existing_volume(volume)?;
        if passphrase.0.len() < 8 {
            return Err(api(
                ErrorCode::InvalidRequest,
                "a recovery passphrase has at least 8 characters (use a long random one and keep it offline)",
            ));
        }
        let _guard = self.begin(volume, "recovery-add", caller, ctx).await?;
        let token = self.token(volume)?;
        let result = async {
            let wrapped = token.wrapped_in(&path)?;
            let key = self
                .services
                .kms
                .decrypt(&wrapped, &token.context, &token.key_id)
                .await
                .map_err(|e| VolumeError::kms(&path, "unwrap the volume key", e))?;
            let params = self.services.recovery_params;
            let pass = zeroize::Zeroizing::new(passphrase.0.clone().into_bytes());
            let file = self.header_file(volume)?;

            blocking(move || {
                volume::keyslot::add_recovery_keyslot(file.get(), key.expose(), &pass, &params)
            })
            .await
        }
        .await;
        let keyslot = self.audited(
            "recovery-add",
            volume,
            Some(&token),
            caller,
            started,
            result,
        )?;
        tracing::info!(volume, keyslot, "recovery keyslot added");
        Ok(Response::RecoveryAdded {
            volume: volume.into(),
            keyslot,
        })
    }

    /// `recovery remove`.
    pub(crate) async fn recovery_remove(
        &self,
        volume: &str,
        keyslot: Option<u32>,
        caller: Caller,
        ctx: &RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        self.existing_volume(volume)?;
        let _guard = self.begin(volume, "recovery-remove", caller, ctx).await?;
        let token = self.token(volume).ok();
        let ids: Vec<u32> = match keyslot {
            Some(id) => vec![id],
            None => self
                .inspect_volume(volume)
                .map(|i| i.keyslot_ids)
                .unwrap_or_default(),
        };
        let file = self.header_file(volume);
        let ids2 = ids.clone();
        let result = blocking(move || {
            let file = file?;
            for id in ids2 {
                volume::keyslot::remove_keyslot(file.get(), id)?;
            }
            Ok(())
        })
        .await;
        self.audited(
            "recovery-remove",
            volume,
            token.as_ref(),
            caller,
            started,
            result,
        )?;
        Ok(Response::RecoveryRemoved {
            volume: volume.into(),
            keyslots: ids,
        })
    }

    /// `export --plaintext`: the decrypted volume written to the passed descriptor.
    pub(crate) async fn export(
        &self,
        r: ExportRequest,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        if !r.plaintext {
            return Err(api(
                ErrorCode::InvalidRequest,
                "export writes the volume decrypted: say so with --plaintext",
            ));
        }
        self.existing_volume(&r.volume)?;
        let dst = ctx.take_fd("export")?;
        let _guard = self.begin(&r.volume, "export", caller, ctx).await?;
        let token = self.token(&r.volume).ok();
        let result = async {
            let vol = match self.state.registry.get(&r.volume) {
                Some(a) if a.device.read_only_export() => Arc::clone(a.device.volume()),
                Some(_) => {
                    return Err(VolumeError::new(
                        VolumeErrorKind::InUse,
                        format!(
                            "volume {} is attached read-write, so its content is changing: \
                             detach it (or attach it --read-only), or snapshot it and rebuild a \
                             detached copy",
                            r.volume
                        ),
                    ));
                }
                None => Arc::new(
                    self.open_volume(
                        &r.volume,
                        &OpenOptions {
                            read_only: true,
                            ..OpenOptions::default()
                        },
                    )
                    .await?,
                ),
            };
            let (progress, cancel) = (Arc::clone(&ctx.progress), ctx.cancel.clone());
            let what = format!("the export to {}", r.to);
            let size = vol.size();
            let explain = |e| {
                explain_no_space(e, || {
                    format!(
                        "exporting volume {} needs {} at {}, and that filesystem is full: free \
                         space there or export somewhere else; the partial file is removed",
                        r.volume,
                        mib(size),
                        r.to
                    )
                })
            };
            blocking(move || {
                let mut out = std::io::BufWriter::with_capacity(lifecycle::STEP, &dst);
                let sha = lifecycle::export_to(&vol, &mut out, &what, &progress, &cancel)?;
                drop(out);
                if dst.metadata().is_ok_and(|m| m.is_file()) {
                    dst.sync_all()
                        .map_err(|e| VolumeError::io(vol.path(), "syncing the export", e))?;
                }
                Ok((vol.size(), sha))
            })
            .await
            .map_err(explain)
        }
        .await;
        let (bytes, sha256) = self.audited(
            "export-plaintext",
            &r.volume,
            token.as_ref(),
            caller,
            started,
            result,
        )?;
        tracing::info!(volume = %r.volume, to = %r.to, bytes, "exported as plaintext");
        Ok(Response::Exported {
            volume: r.volume,
            bytes,
            sha256,
        })
    }

    /// `header backup`: the header area (both copies and the keyslot area, up to the data)
    /// written to the passed descriptor, byte for byte as on disk (the same file
    /// `cryptsetup luksHeaderBackup` writes).
    pub(crate) async fn header_backup(
        &self,
        volume: &str,
        to: &str,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let path = self.existing_volume(volume)?;
        let dst = ctx.take_fd("header backup")?;
        let token = self.token(volume).ok();
        let result = (|| -> Result<_, VolumeError> {
            let src = volume::open_in(&*self.services.catalog, volume, Access::Inspect)?;
            let info = volume::inspect_store(&*src)?;
            let mut buf = vec![0u8; info.data_offset as usize];
            src.read_at(&mut buf, 0)
                .map_err(|e| VolumeError::io(&path, "reading the header area", e))?;
            use std::io::Write as _;
            (&dst)
                .write_all(&buf)
                .map_err(|e| VolumeError::io(&path, &format!("writing {to}"), e))?;
            if dst.metadata().is_ok_and(|m| m.is_file()) {
                dst.sync_all()
                    .map_err(|e| VolumeError::io(&path, &format!("syncing {to}"), e))?;
            }
            Ok(buf.len() as u64)
        })();
        let bytes = self.audited(
            "header-backup",
            volume,
            token.as_ref(),
            caller,
            started,
            result,
        )?;
        Ok(Response::HeaderBackedUp {
            volume: volume.into(),
            bytes,
        })
    }

    /// `header restore`: checks the backup (both copies decode, one crypt segment at the same
    /// data offset, the same UUID unless `force`), then writes it over the header area.
    pub(crate) async fn header_restore(
        &self,
        volume: &str,
        from: &str,
        force: bool,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let path = self.existing_volume(volume)?;
        let src = ctx.take_fd("header restore")?;
        // Held first: while it is, the volume cannot be attached.
        let _guard = self.begin(volume, "header-restore", caller, ctx).await?;
        if self.state.registry.get(volume).is_some() {
            return Err(api(
                ErrorCode::Conflict,
                format!("volume {volume} is attached: detach it before restoring its header"),
            ));
        }
        let result = (|| -> Result<_, VolumeError> {
            use std::io::Read as _;
            let mut backup = Vec::new();
            (&src)
                .take(64 << 20)
                .read_to_end(&mut backup)
                .map_err(|e| VolumeError::io(&path, &format!("reading {from}"), e))?;
            let bad = |m: String| {
                VolumeError::new(VolumeErrorKind::InvalidArgument, format!("{from}: {m}"))
            };
            // Parsed exactly as a volume is, on the memory engine.
            let mem = store::memory::MemStore::at(Path::new(from));
            mem.write_at(&backup, 0)
                .map_err(|e| VolumeError::io(&path, "reading the backup into memory", e))?;
            let restored = volume::header::read_headers(&mem)?;
            let seg = restored
                .active
                .metadata
                .crypt_segment()
                .map_err(|e| bad(e.to_string()))?;
            if backup.len() as u64 != seg.offset {
                return Err(bad(format!(
                    "is {} bytes but its header puts the data at byte {}: not a header backup",
                    backup.len(),
                    seg.offset
                )));
            }
            let file = volume::open_in(&*self.services.catalog, volume, Access::ReadWrite)?;
            // The current header may be damaged beyond reading; compare when it can be read.
            if let Ok(current) = volume::inspect_store(&*file) {
                if current.data_offset != seg.offset {
                    return Err(bad(format!(
                        "puts the data at byte {} but this volume's data starts at byte {}",
                        seg.offset, current.data_offset
                    )));
                }
                if current.uuid != restored.active.binary.uuid && !force {
                    return Err(VolumeError::new(
                        VolumeErrorKind::InvalidArgument,
                        format!(
                            "{from} is the header of another volume (UUID {}, this one is {}): \
                             use --force only if you are sure",
                            restored.active.binary.uuid, current.uuid
                        ),
                    ));
                }
            }
            file.write_at(&backup, 0)
                .map_err(|e| VolumeError::io(&path, "writing the header area", e))?;
            file.flush()
                .map_err(|e| VolumeError::io(&path, "syncing the header area", e))?;
            Ok(())
        })();
        let token = self.token(volume).ok();
        self.audited(
            "header-restore",
            volume,
            token.as_ref(),
            caller,
            started,
            result,
        )?;
        Ok(Response::HeaderRestored {
            volume: volume.into(),
        })
    }

    /// The snapshot count and the dm-crypt device, for `list`.
    pub(crate) fn lifecycle_summary(&self, name: &str, summary: &mut control_api::VolumeSummary) {
        summary.snapshots = self.snapshot_list(name).len();
        let mappings = crate::dmcrypt::scan(Path::new(crate::dmcrypt::SYS_BLOCK));
        summary.dm_crypt = self.dm_crypt_device(Path::new(&summary.path), &mappings);
    }
}

/// Copies the allocated ranges of `old` into `new` (decrypting and re-encrypting); holes
/// stay holes. Returns the bytes copied.
fn copy_allocated(
    old: &Volume,
    new: &Volume,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<u64, VolumeError> {
    let size = old.size();
    let ranges = old.allocation(0, size)?;
    let total: u64 = ranges.iter().filter(|r| r.1).map(|r| r.0).sum();
    progress.phase("re-encrypting", total);
    let ss = u64::from(old.sector_size());
    let mut buf = vec![0u8; lifecycle::STEP];
    let mut at = 0u64;
    let mut copied = 0u64;
    for (len, allocated) in ranges {
        if allocated {
            // Whole sectors around the range (allocation follows filesystem blocks).
            let start = at / ss * ss;
            let end = ((at + len).div_ceil(ss) * ss).min(size);
            let mut pos = start;
            while pos < end {
                cancel.check("the re-encryption")?;
                let n = (end - pos).min(lifecycle::STEP as u64) as usize;
                old.read_at(&mut buf[..n], pos)?;
                new.write_at_mut(&mut buf[..n], pos)?;
                pos += n as u64;
                copied += n as u64;
                progress.add(n as u64);
                lifecycle::crash_point("reencrypt-step");
            }
        }
        at += len;
    }
    progress.phase("syncing", 0);
    new.flush()?;
    Ok(copied)
}
