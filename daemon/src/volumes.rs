//! Handlers of the volume verbs that need no long operation: `create`, `delete`, `list`,
//! `status`, and the name → path rules they share.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use control_api::paths::validate_name;
use control_api::{
    AttachmentStatus, CreateRequest, DetachingStatus, ErrorCode, Response, VolumeSummary,
};
use kms_client::{ContextKeys, IdentityContext};
use statedir::stamp::rfc3339;
use statedir::summary::{scan_volumes, volume_summary};
use store::catalog::Catalog;
use store::file::Access;
use volume::{CreateOptions, OpenOptions, Volume};

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::error::{Error, api, chain};
use crate::request::RequestContext;

impl Daemon {
    pub(crate) fn volume_path(&self, name: &str) -> Result<PathBuf, Error> {
        validate_name(name).map_err(|m| api(ErrorCode::InvalidRequest, m))?;
        Ok(self.services.catalog.location(name))
    }

    /// Reads the header of volume `name` through the catalog (no lock, no KMS).
    pub(crate) fn inspect_volume(
        &self,
        name: &str,
    ) -> Result<volume::VolumeInfo, volume::VolumeError> {
        let store = volume::open_in(&*self.services.catalog, name, Access::Inspect)?;
        volume::inspect_store(&*store)
    }

    /// Opens volume `name` through the catalog (under its lock: shared when read-only) and
    /// unwraps its key through the KMS.
    pub(crate) async fn open_volume(
        &self,
        name: &str,
        opts: &OpenOptions,
    ) -> Result<Volume, volume::VolumeError> {
        self.open_volume_taking(name, opts, None).await
    }

    /// [`open_volume`](Self::open_volume), taking the volume from the host that holds it
    /// when `take_over` says so (progress and cancel from the request's context).
    pub(crate) async fn open_volume_taking(
        &self,
        name: &str,
        opts: &OpenOptions,
        take_over: Option<(control_api::TakeOver, &RequestContext)>,
    ) -> Result<Volume, volume::VolumeError> {
        let access = if opts.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let store = match take_over {
            Some((how, ctx)) if !opts.read_only => {
                let catalog = Arc::clone(&self.services.catalog);
                let (name, progress, cancel) = (
                    name.to_owned(),
                    Arc::clone(&ctx.progress),
                    ctx.cancel.clone(),
                );
                let force = how == control_api::TakeOver::Force;
                crate::lifecycle::blocking(move || {
                    volume::lifecycle::take_over_in(&*catalog, &name, force, &progress, &cancel)
                })
                .await?
            }
            _ => volume::open_in(&*self.services.catalog, name, access)?,
        };
        Volume::open_store(store, opts, &self.services.kms).await
    }

    /// Creates volume `name` in the catalog: formatted (one KMS call) in a staged store that
    /// becomes the volume only when complete; on any failure the staged store is wiped and
    /// discarded, and an existing volume is never touched.
    async fn create_in_catalog(
        &self,
        name: &str,
        store: Option<&str>,
        opts: &CreateOptions,
    ) -> Result<(), volume::VolumeError> {
        use volume::{VolumeError, VolumeErrorKind};
        let catalog = &self.services.catalog;
        self.refuse_existing(name)?;
        let mut staged = catalog.stage_in(store, name, "creating").map_err(|e| {
            VolumeError::io(
                &catalog.location_in(store, name).unwrap_or_default(),
                "creating the new volume",
                e,
            )
        })?;
        let cleanup = crate::staging::DiscardOnDrop {
            catalog: &**catalog,
            staged: Some(staged.handle()),
        };
        let store = staged.take_store().ok_or_else(|| {
            VolumeError::new(VolumeErrorKind::Io, "the catalog gave no staged store")
        })?;
        let vol = Volume::create_on(store, opts, &self.services.kms).await?;
        drop(vol);
        let published = crate::staging::publish_new_in(&**catalog, staged);
        drop(cleanup);
        published
    }

    /// Refuses a new volume `name` that exists already, in whichever store it is.
    pub(crate) fn refuse_existing(&self, name: &str) -> Result<(), volume::VolumeError> {
        let stores = &self.services.catalog;
        match stores.store_of(name) {
            None => Ok(()),
            Some(store) => Err(volume::VolumeError::new(
                volume::VolumeErrorKind::AlreadyExists,
                format!(
                    "{} already exists (store {store}): choose another name or delete it first",
                    stores.location(name).display()
                ),
            )),
        }
    }

    pub(crate) async fn create(
        &self,
        r: CreateRequest,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        self.volume_path(&r.name)?;
        let path = self
            .services
            .catalog
            .location_in(r.store.as_deref(), &r.name)
            .map_err(|e| {
                api(
                    ErrorCode::InvalidRequest,
                    format!("--store: {e}; see [store] in docs/daemon.md"),
                )
            })?;
        let invalid = |m: String| api(ErrorCode::InvalidRequest, m);
        let volume_id = r
            .volume_id
            .clone()
            .unwrap_or_else(IdentityContext::generate_volume_id);
        let identity = IdentityContext::new(&r.sid, &r.directory, &volume_id)
            .map_err(|e| invalid(e.to_string()))?;
        let defaults = ContextKeys::default();
        let context_keys = ContextKeys {
            sid_directory: r
                .sid_directory_key
                .clone()
                .unwrap_or(defaults.sid_directory),
            volume_id: r.volume_id_key.clone().unwrap_or(defaults.volume_id),
        };
        let context = identity
            .to_context(&context_keys, &r.context)
            .map_err(|e| invalid(e.to_string()))?;
        make_private_dir(&self.services.layout.volumes())?;
        let opts = CreateOptions {
            size: r.size,
            sector_size: r.sector_size,
            key_id: r.kms_key.clone(),
            identity,
            context_keys,
            extra_context: r.context.clone(),
        };
        let result = match &r.from_image {
            Some(_) => self.create_from_image(opts, &r, &path, caller, ctx).await,
            None => {
                self.create_in_catalog(&r.name, r.store.as_deref(), &opts)
                    .await
            }
        };
        let result = match result {
            Ok(()) => match self.grant_new_volume(&r.name).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // A volume whose grant could not be made is not half-created.
                    let _ = volume::wipe_and_remove_in(&*self.services.catalog, &r.name);
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        let outcome = result.as_ref().map(|_| ()).map_err(|e| chain(e));
        self.audit_record(
            if r.from_image.is_some() {
                "create-from-image"
            } else {
                "create"
            },
            &r.name,
            Some(&r.kms_key),
            Some(context.pairs()),
            Some(caller),
            started,
            &outcome,
        );
        result.map_err(Error::from)?;
        self.label_volume(&r.name);
        Ok(Response::Created(self.summary(&r.name)))
    }

    pub(crate) fn summary(&self, name: &str) -> VolumeSummary {
        let mut s = volume_summary(
            &*self.services.catalog,
            name,
            self.state.registry.get(name).is_some(),
        );
        self.lifecycle_summary(name, &mut s);
        self.store_summary(&mut s, None);
        s
    }

    /// The store a volume lives in, and who holds it when another host does.
    /// `store`: where it lives (looked up when None).
    fn store_summary(&self, s: &mut VolumeSummary, store: Option<&str>) {
        let store = store.or_else(|| self.services.catalog.store_of(&s.name));
        s.store = store.unwrap_or("file").to_owned();
        if s.store == "rbd"
            && !s.attached
            && let Some(rbd) = &self.services.rbd
        {
            s.held_by = rbd.held_by(&s.name).ok().flatten();
        }
    }

    pub(crate) fn list(&self) -> Result<Response, Error> {
        let mut volumes = scan_volumes(&*self.services.catalog, |name| {
            self.state.registry.get(name).is_some()
        })
        .map_err(|e| {
            api(
                ErrorCode::Io,
                format!(
                    "cannot list {}: {e}",
                    self.services.layout.volumes().display()
                ),
            )
        })?;
        // One listing per store, not one lookup per volume.
        let homes = self.services.catalog.homes().unwrap_or_default();
        for v in &mut volumes {
            let name = v.name.clone();
            self.lifecycle_summary(&name, v);
            self.store_summary(v, homes.get(&name).copied());
        }
        Ok(Response::Volumes { volumes })
    }

    pub(crate) fn status(&self, volume: Option<&str>) -> Result<Response, Error> {
        let detaching: Vec<DetachingStatus> = self
            .state
            .detaching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(name, _)| volume.is_none_or(|v| v == name.as_str()))
            .map(|(name, since)| DetachingStatus {
                volume: name.clone(),
                since: rfc3339(*since),
            })
            .collect();
        let attachments: Vec<AttachmentStatus> = match volume {
            Some(v) => match self.state.registry.get(v) {
                Some(a) => vec![self.attachment_status(&a)],
                None if !detaching.is_empty() => Vec::new(),
                None => {
                    return Err(api(
                        ErrorCode::NotFound,
                        format!("volume {v} is not attached"),
                    ));
                }
            },
            None => self
                .state
                .registry
                .all()
                .iter()
                .map(|a| self.attachment_status(a))
                .collect(),
        };
        Ok(Response::Status {
            attachments,
            detaching,
        })
    }

    pub(crate) async fn delete(
        &self,
        name: &str,
        with_snapshots: bool,
        caller: Caller,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        self.volume_path(name)?;
        if self.state.registry.get(name).is_some() {
            return Err(api(
                ErrorCode::Conflict,
                format!("volume {name} is attached: detach it first ('cryptnbdctl detach {name}')"),
            ));
        }
        let snapshots = self.snapshot_list(name);
        if !snapshots.is_empty() && !with_snapshots {
            let names: Vec<&str> = snapshots.iter().map(|s| s.name.as_str()).collect();
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {name} has {} snapshot(s) ({}), each holding the same wrapped key: \
                     delete them first ('cryptnbdctl delete-snapshot {name} NAME') or use \
                     --with-snapshots",
                    names.len(),
                    names.join(", ")
                ),
            ));
        }
        if !snapshots.is_empty() {
            let snaps = self
                .services
                .catalog
                .snapshots(name)
                .map_err(|e| api(ErrorCode::Io, format!("volume {name}'s snapshots: {e}")))?;
            for s in &snapshots {
                self.delete_snapshot_in(&*snaps, name, &s.name, caller, started)
                    .map_err(Error::from)?;
            }
        }
        let token = self.token(name).ok();
        let grant = token.as_ref().and_then(|t| t.grant());
        let result = volume::wipe_and_remove_in(&*self.services.catalog, name);
        let outcome = result.as_ref().map(|_| ()).map_err(|e| chain(e));
        self.audit_token("delete", name, token.as_ref(), caller, started, &outcome);
        result.map_err(Error::from)?;
        if let Some(grant) = grant {
            self.retire(&grant).await;
        }
        tracing::info!(volume = name, "deleted (headers and keyslot area wiped)");
        Ok(Response::Deleted {
            volume: name.into(),
        })
    }
}

pub(crate) fn make_private_dir(dir: &Path) -> Result<(), Error> {
    store::durable::create_private_dir(dir).map_err(|e| {
        api(
            ErrorCode::Io,
            format!("cannot create {}: {e}", dir.display()),
        )
    })
}

impl Daemon {
    /// Records what the volume's header says of its keying where its store keeps labels
    /// (RBD image metadata: volume id, key id, context, creation), after a create or a
    /// change of the token. A failure is logged: the header stays the record.
    pub(crate) fn label_volume(&self, name: &str) {
        let Ok(token) = self.token(name) else {
            return;
        };
        let context = serde_json::to_string(token.context.pairs()).unwrap_or_default();
        let labels = [
            ("volume_id", token.volume_id.clone()),
            ("key_id", token.key_id.clone()),
            ("context", context),
            ("created", token.created.clone()),
        ];
        if let Err(e) = self.services.catalog.label(name, &labels) {
            tracing::warn!(volume = name, error = %e, "cannot record the volume's labels in its store");
        }
    }
}
