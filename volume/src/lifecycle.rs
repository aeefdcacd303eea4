//! Building blocks of the long volume operations (import, export, snapshot, rebuild,
//! re-encryption, rekey): progress and cancellation, streaming an image into a volume and a
//! volume out to a raw image, cloning a volume in its catalog (reflink or sparse copy), rewriting the
//! header's token, and replacing a file atomically.
//!
//! Every loop here checks its [`Cancel`] between steps of at most [`STEP`] bytes and reports
//! to its [`Progress`]; a cancelled step returns [`VolumeErrorKind::Cancelled`] and the caller
//! removes what it was building. Nothing here touches the file it replaces until the new one
//! is complete and synced.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::crash::crash_point;
use store::BackingStore;
use store::catalog::{Catalog, Staged};
use store::file::{Access, FileStore};

use crate::header;
use crate::token::{KmsToken, TOKEN_TYPE};
use crate::volume::Volume;
use crate::{VolumeError, VolumeErrorKind};

/// Largest piece a long operation moves between two cancellation checks.
pub const STEP: usize = 1 << 20;

/// How far an operation is: a phase name and bytes done of a total (0 = unknown). Shared
/// between the worker and whoever reports it.
#[derive(Debug)]
pub struct Progress {
    phase: Mutex<&'static str>,
    done: AtomicU64,
    total: AtomicU64,
}

/// Phase `starting`, nothing done: what a client sees before the first step (never an
/// empty phase name).
impl Default for Progress {
    fn default() -> Self {
        Self {
            phase: Mutex::new("starting"),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }
}

impl Progress {
    /// A new progress in phase `starting`.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Enters a phase with `total` bytes to do (0 when unknown); done restarts at 0.
    pub fn phase(&self, phase: &'static str, total: u64) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    /// Adds bytes done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// `(phase, done, total)` now.
    pub fn get(&self) -> (&'static str, u64, u64) {
        (
            *self.phase.lock().unwrap_or_else(|p| p.into_inner()),
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// A cancellation flag: set by the canceller, checked by the worker between steps.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Asks the worker to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// `Err(Cancelled)` once cancelled.
    pub fn check(&self, what: &str) -> Result<(), VolumeError> {
        if self.is_cancelled() {
            Err(VolumeError::new(
                VolumeErrorKind::Cancelled,
                format!("{what} was cancelled; nothing was changed"),
            ))
        } else {
            Ok(())
        }
    }
}

/// Reads until `buf` is full or the source ends; returns how much was read.
fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match src.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams exactly `len` bytes of `src` (a raw image: a file or a converter's pipe) into the
/// start of `vol`, encrypting as it goes, and returns the SHA-256 of those bytes (hex).
/// Refuses an image that ends early or goes on past `len` (it changed while read, or the
/// size was wrong) and one larger than the volume. The volume is flushed at the end.
pub fn fill_from(
    vol: &Volume,
    src: &mut dyn Read,
    len: u64,
    what: &str,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<String, VolumeError> {
    if len > vol.size() {
        return Err(VolumeError::new(
            VolumeErrorKind::InvalidArgument,
            format!(
                "{what} is {len} bytes, larger than the volume ({} bytes): it does not fit; \
                 nothing was changed",
                vol.size()
            ),
        ));
    }
    let ss = u64::from(vol.sector_size());
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; STEP];
    let mut at = 0u64;
    progress.phase("copying", len);
    while at < len {
        cancel.check(what)?;
        let want = (len - at).min(STEP as u64) as usize;
        let got = read_full(src, &mut buf[..want])
            .map_err(|e| VolumeError::io(vol.path(), &format!("reading {what}"), e))?;
        if got < want {
            return Err(VolumeError::new(
                VolumeErrorKind::InvalidArgument,
                format!(
                    "{what} ended after {} bytes, but {len} were expected: it changed while it \
                     was read, or its size is wrong; nothing was changed",
                    at + got as u64
                ),
            ));
        }
        hasher.update(&buf[..got]);
        // Whole sectors are encrypted in place; a last partial sector is padded with zeros.
        let padded = (got as u64).div_ceil(ss) * ss;
        let padded = padded.min(vol.size() - at) as usize;
        buf[got..padded].fill(0);
        vol.write_at_mut(&mut buf[..padded], at)?;
        at += got as u64;
        progress.add(got as u64);
        crash_point("fill-step");
    }
    let mut probe = [0u8; 1];
    if read_full(src, &mut probe)
        .map_err(|e| VolumeError::io(vol.path(), &format!("reading {what}"), e))?
        != 0
    {
        return Err(VolumeError::new(
            VolumeErrorKind::InvalidArgument,
            format!(
                "{what} is longer than the {len} bytes expected: it changed while it was read; \
                 nothing was changed"
            ),
        ));
    }
    progress.phase("syncing", 0);
    vol.flush()?;
    Ok(hex(hasher.finish().as_ref()))
}

/// Decrypts the whole of `vol` into `dst` as a raw image and returns the SHA-256 of what was
/// written (hex). Does not sync `dst`: the caller owns it.
pub fn export_to(
    vol: &Volume,
    dst: &mut dyn Write,
    what: &str,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<String, VolumeError> {
    let len = vol.size();
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; STEP];
    let mut at = 0u64;
    progress.phase("copying", len);
    while at < len {
        cancel.check(what)?;
        let n = (len - at).min(STEP as u64) as usize;
        vol.read_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .map_err(|e| VolumeError::io(vol.path(), &format!("writing {what}"), e))?;
        at += n as u64;
        progress.add(n as u64);
    }
    dst.flush()
        .map_err(|e| VolumeError::io(vol.path(), &format!("writing {what}"), e))?;
    Ok(hex(hasher.finish().as_ref()))
}

pub use store::copy::CloneMethod;

/// Fills `staged` (new and empty, of `catalog`) with a clone of `source`, the catalog's
/// cheapest way (a reflink between files, else a sparse copy), reporting to `progress` and
/// stopping when `cancel`led. The clone is durable when this returns; `source` must not
/// change meanwhile (the caller pauses writes to an attached volume).
pub fn clone_in(
    catalog: &dyn Catalog,
    source: &dyn BackingStore,
    staged: &Staged,
    what: &str,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<CloneMethod, VolumeError> {
    Watched {
        progress,
        cancel,
        what,
    }
    .run(
        |watch| catalog.clone_store(source, staged, watch),
        |e| VolumeError::io(&catalog.location(&staged.name), "cloning", e),
    )
}

/// Opens volume `name` of `catalog` for writing, taken from the host that holds it (see
/// [`Catalog::take_over`]): waiting for that host to be gone, with progress, unless `force`.
pub fn take_over_in(
    catalog: &dyn Catalog,
    name: &str,
    force: bool,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<Box<dyn BackingStore>, VolumeError> {
    Watched {
        progress,
        cancel,
        what: "the take-over",
    }
    .run(
        |watch| catalog.take_over(name, force, watch),
        |e| crate::volume::open_error(&catalog.location(name), e),
    )
}

/// A long operation's progress and cancel flag, as a copy's watch.
struct Watched<'a> {
    progress: &'a Progress,
    cancel: &'a Cancel,
    what: &'a str,
}

impl Watched<'_> {
    /// Runs `op` under this watch; its error becomes `failed(error)`, or the cancellation
    /// when the operation was stopped.
    fn run<T, E>(
        &self,
        op: impl FnOnce(&Self) -> Result<T, E>,
        failed: impl FnOnce(E) -> VolumeError,
    ) -> Result<T, VolumeError> {
        op(self).map_err(|e| match self.cancel.check(self.what) {
            Err(cancelled) => cancelled,
            Ok(()) => failed(e),
        })
    }
}

impl store::copy::Watch for Watched<'_> {
    fn phase(&self, phase: &'static str, total: u64) {
        self.progress.phase(phase, total);
    }
    fn add(&self, bytes: u64) {
        self.progress.add(bytes);
    }
    fn check(&self) -> std::io::Result<()> {
        self.cancel
            .check(self.what)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::Interrupted, e.to_string()))
    }
}

/// Opens a volume file read-write (or read-only) under its lock, for header operations on a
/// volume that is not attached. Refuses a volume another process holds.
pub fn open_locked(path: &Path, read_only: bool) -> Result<FileStore, VolumeError> {
    let access = if read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    crate::volume::open_file_store(path, access)
}

/// Rewrites the `cryptnbd-kms` token of the volume in `store` with `edit` and writes both
/// header copies with the next sequence id (primary first, each synced): a crash leaves the
/// old or the new header, both valid. Returns the token as written.
pub fn rewrite_token(
    store: &dyn BackingStore,
    edit: impl FnOnce(&mut KmsToken),
) -> Result<KmsToken, VolumeError> {
    let path = store.location();
    let headers = header::read_headers(store)?;
    let mut metadata = headers.active.metadata.clone();
    let (id, obj) = metadata.token(TOKEN_TYPE).ok_or_else(|| {
        VolumeError::new(
            VolumeErrorKind::Unsupported,
            format!("{} has no {TOKEN_TYPE} token", path.display()),
        )
    })?;
    let mut token = KmsToken::from_json(obj).map_err(|e| {
        VolumeError::new(VolumeErrorKind::Corrupt, format!("{}: {e}", path.display()))
    })?;
    edit(&mut token);
    metadata.set_token(id, token.to_json()).map_err(|e| {
        VolumeError::new(
            VolumeErrorKind::InvalidArgument,
            format!("{}: {e}", path.display()),
        )
    })?;
    crash_point("token-before-header-write");
    header::write_headers(
        store,
        &headers.active.binary,
        headers.active.binary.seqid + 1,
        &metadata,
    )?;
    crash_point("token-after-header-write");
    Ok(token)
}

/// Reads the `cryptnbd-kms` token of a volume file (no lock, no KMS; works on an attached
/// volume).
pub fn read_token(path: &Path) -> Result<KmsToken, VolumeError> {
    read_token_in(&crate::volume::open_file_store(path, Access::Inspect)?)
}

/// Reads the `cryptnbd-kms` token of the volume in `store` (no KMS).
pub fn read_token_in(store: &dyn BackingStore) -> Result<KmsToken, VolumeError> {
    let headers = header::read_headers(store)?;
    crate::volume::token_of(&headers, store.location())
}

/// The extra context pairs of a token: its context without the two identity pairs.
pub fn extra_context(token: &KmsToken) -> Vec<(String, String)> {
    token
        .context
        .pairs()
        .iter()
        .filter(|(k, _)| {
            **k != token.context_keys.sid_directory && **k != token.context_keys.volume_id
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_starts_in_a_named_phase() {
        // The daemon reports a default `Progress` before the operation's first step.
        assert_eq!(Progress::default().get(), ("starting", 0, 0));
        assert_eq!(Progress::new().get(), ("starting", 0, 0));
        let p = Progress::default();
        p.phase("copying", 10);
        p.add(4);
        assert_eq!(p.get(), ("copying", 4, 10));
    }
}
