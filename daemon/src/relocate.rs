//! `move VOLUME --to-store STORE`: a detached volume copied into another store (the state
//! directory's files, the RBD pool) and swapped in, crash-safe.
//!
//! The steps, each durable before the next:
//! 1. a note `STATE_DIR/moving/NAME` says where the volume goes;
//! 2. a staged copy is built in the target store (a sparse copy, with progress), the source
//!    held under its lock for writing all along, so no other host attaches it meanwhile;
//! 3. the copy is published under the volume's name in the target store: from here on the
//!    move is done, and the volume is in both stores;
//! 4. the source's header is wiped and the source removed; the note goes.
//!
//! A crash before step 3 leaves the volume where it was (the staged copy is a leftover that
//! the next start wipes and removes); after it, the next start finishes step 4
//! ([`Daemon::finish_moves`]). The bytes are copied as they are: the same header, key and
//! ciphertext, so a move needs no KMS call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use control_api::{ErrorCode, Response};
use store::catalog::Catalog;
use store::file::Access;
use volume::VolumeError;

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::error::{Error, api, chain};
use crate::request::RequestContext;

impl Daemon {
    /// Where the note of a move of `volume` is.
    fn move_note(&self, volume: &str) -> PathBuf {
        self.services.layout.state_dir.join("moving").join(volume)
    }

    /// `move`.
    pub(crate) async fn move_volume(
        &self,
        volume: &str,
        to: &str,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        self.existing_volume(volume)?;
        let stores = Arc::clone(&self.services.catalog);
        let from = stores.store_of(volume).unwrap_or("file").to_owned();
        if stores.member(to).is_none() {
            return Err(api(
                ErrorCode::InvalidRequest,
                format!(
                    "no store {to:?} is configured (stores: {}): see [store] in docs/daemon.md",
                    stores.names().join(", ")
                ),
            ));
        }
        if from == crate::stores::DEVICES || to == crate::stores::DEVICES {
            // A device is neither emptied nor filled by a move: it holds one volume, given.
            return Err(api(
                ErrorCode::InvalidRequest,
                format!(
                    "volume {volume} cannot move {} the block devices of [store.devices], \
                     which cryptnbd neither empties nor fills: copy it instead (export \
                     --plaintext, then create --from-image); nothing was changed",
                    if from == crate::stores::DEVICES {
                        "out of"
                    } else {
                        "onto"
                    }
                ),
            ));
        }
        if from == to {
            return Err(api(
                ErrorCode::InvalidRequest,
                format!("volume {volume} is in store {to} already; nothing was changed"),
            ));
        }
        if self.state.registry.get(volume).is_some() {
            return Err(api(
                ErrorCode::Conflict,
                format!("volume {volume} is attached: detach it first; nothing was changed"),
            ));
        }
        let snapshots = self.snapshot_list(volume).len();
        if snapshots > 0 {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {volume} has {snapshots} snapshot(s), which do not move with it: \
                     delete them first ('cryptnbdctl snapshots {volume}'); nothing was changed"
                ),
            ));
        }
        let _guard = self.begin(volume, "move", caller, ctx).await?;
        let token = self.token(volume).ok();
        let result = self.move_inner(volume, &from, to, ctx).await;
        let outcome = result.as_ref().map(|_| ()).map_err(|e| chain(e));
        self.audit_token("move", volume, token.as_ref(), caller, started, &outcome);
        let bytes = result.map_err(Error::from)?;
        tracing::info!(volume, from = %from, to, bytes, "moved");
        self.label_volume(volume);
        Ok(Response::Moved {
            volume: volume.into(),
            from_store: from,
            to_store: to.into(),
            path: stores.location(volume).display().to_string(),
            bytes,
        })
    }

    async fn move_inner(
        &self,
        volume: &str,
        from: &str,
        to: &str,
        ctx: &RequestContext,
    ) -> Result<u64, VolumeError> {
        let stores = Arc::clone(&self.services.catalog);
        let note = self.move_note(volume);
        let io = |what: &'static str| {
            let note = note.clone();
            move |e: std::io::Error| VolumeError::io(&note, what, e)
        };
        if let Some(dir) = note.parent() {
            store::durable::create_private_dir(dir).map_err(io("recording the move"))?;
        }
        store::durable::write_atomic(
            &note,
            format!("{from} {to}\n").as_bytes(),
            store::durable::Existing::Replace,
        )
        .map_err(io("recording the move"))?;
        let (progress, cancel) = (Arc::clone(&ctx.progress), ctx.cancel.clone());
        let (name, from, to) = (volume.to_owned(), from.to_owned(), to.to_owned());
        let copied = crate::lifecycle::blocking(move || {
            let source_catalog = Arc::clone(stores.member(&from).expect("the volume's store"));
            // Held for writing: no other host attaches it while it is copied.
            let source = volume::open_in(&*source_catalog, &name, Access::ReadWrite)?;
            let location = stores.location_in(Some(&to), &name).unwrap_or_default();
            let staged = stores
                .stage_in(Some(&to), &name, "moving")
                .map_err(|e| VolumeError::io(&location, "creating the copy", e))?;
            let mut cleanup = crate::staging::DiscardOnDrop {
                catalog: &*stores,
                staged: Some(staged.handle()),
            };
            // The bytes that hold data (holes are not copied).
            let bytes: u64 = source
                .len()
                .and_then(|len| source.extents(0, len))
                .map(|runs| runs.iter().filter(|r| r.allocated).map(|r| r.len).sum())
                .unwrap_or(0);
            volume::lifecycle::clone_in(
                &*stores, &*source, &staged, "the move", &progress, &cancel,
            )?;
            store::crash::crash_point("move-before-publish");
            stores
                .publish_moved(staged)
                .map_err(|e| VolumeError::io(&location, "publishing the copy", e))?;
            cleanup.staged = None;
            store::crash::crash_point("move-after-publish");
            drop(source);
            volume::wipe_and_remove_in(&*source_catalog, &name)?;
            Ok(bytes)
        })
        .await?;
        let _ = std::fs::remove_file(&note);
        Ok(copied)
    }

    /// Finishes the moves a crash cut short (called at start, before anything is attached):
    /// a volume published in its new store loses its old copy; one that was not stays where
    /// it was (its staged copy is a leftover).
    pub fn finish_moves(&self) {
        let dir = self.services.layout.state_dir.join("moving");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let note = std::fs::read_to_string(&path).unwrap_or_default();
            let mut parts = note.split_whitespace();
            let (Some(from), Some(to)) = (parts.next(), parts.next()) else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let stores = &self.services.catalog;
            let held = stores.stores_of(&name);
            if held.contains(&from) && held.contains(&to) {
                tracing::warn!(volume = %name, from, to, "finishing a move a crash interrupted");
                let Some(source) = stores.member(from) else {
                    continue;
                };
                if let Err(e) = volume::wipe_and_remove_in(&**source, &name) {
                    tracing::error!(volume = %name, error = %chain(&e), "cannot remove the old copy of a moved volume; the move is finished at the next start");
                    continue;
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}
