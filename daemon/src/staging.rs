//! Whole-volume changes through a catalog, as every handler makes them: a store staged
//! under a hidden name (leftovers of an earlier failure wiped first), published as a new
//! volume or in place of the old one (whose header is then wiped), or wiped and discarded on
//! every way out before that.

use store::catalog::{Catalog, Staged};
use store::durable::Existing;
use volume::{VolumeError, VolumeErrorKind};

use crate::error::chain;

/// A new store staged in `catalog` to become volume `name` by `operation`. Staged stores of
/// that name left by an earlier failure are wiped and discarded first (the volume's operation
/// guard keeps any other operation out).
pub(crate) fn stage_in(
    catalog: &dyn Catalog,
    name: &str,
    operation: &str,
) -> Result<Staged, VolumeError> {
    for left in catalog.leftovers().unwrap_or_default() {
        if left.name == name {
            discard_in(catalog, left);
        }
    }
    catalog
        .stage(name, operation)
        .map_err(|e| VolumeError::io(&catalog.location(name), "creating a new volume file", e))
}

/// Wipes (its header may hold a wrapped key) and removes a staged store that will not be
/// published.
pub(crate) fn discard_in(catalog: &dyn Catalog, staged: Staged) {
    if let Ok(store) = catalog.open_staged(&staged) {
        let _ = volume::wipe_header_area(&*store);
    }
    if let Err(e) = catalog.discard(staged) {
        tracing::debug!(error = %e, "cannot remove a staged volume file");
    }
}

/// Publishes `staged` as a new volume of `catalog` (refused if the name was taken meanwhile).
pub(crate) fn publish_new_in(catalog: &dyn Catalog, staged: Staged) -> Result<(), VolumeError> {
    let path = catalog.location(&staged.name);
    match catalog.publish(staged, Existing::Keep) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(VolumeError::new(
            VolumeErrorKind::AlreadyExists,
            format!(
                "{} already exists: choose another name or delete it first",
                path.display()
            ),
        )),
        Err(e) => Err(VolumeError::io(
            &path,
            "linking the new volume into place",
            e,
        )),
    }
}

/// Swaps `staged` in for its volume, atomically (a crash leaves the old volume or the new
/// one), then wipes the header of the replaced store so its freed blocks do not keep the old
/// wrapped key.
pub(crate) fn publish_replacing_in(
    catalog: &dyn Catalog,
    staged: Staged,
) -> Result<(), VolumeError> {
    let path = catalog.location(&staged.name);
    let old = catalog
        .publish(staged, Existing::Replace)
        .map_err(|e| VolumeError::io(&path, "replacing the volume file", e))?;
    if let Some(old) = old
        && let Err(e) = volume::wipe_header_area(&*old)
    {
        tracing::warn!(volume = %path.display(), error = %chain(&e), "could not wipe the replaced file's header");
    }
    Ok(())
}

/// Discards a staged store when dropped: after a publish there is nothing left to discard
/// (the hidden name is gone), so it only acts on the ways out before one.
pub(crate) struct DiscardOnDrop<'a> {
    /// Where it was staged.
    pub(crate) catalog: &'a dyn Catalog,
    /// What to discard.
    pub(crate) staged: Option<Staged>,
}

impl Drop for DiscardOnDrop<'_> {
    fn drop(&mut self) {
        // After a publish the hidden name is gone and this finds nothing to wipe or remove.
        if let Some(staged) = self.staged.take() {
            discard_in(self.catalog, staged);
        }
    }
}
