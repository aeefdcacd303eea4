//! [`RbdCatalog`]: the volumes of an RBD pool, one image per volume, named after it; and
//! [`RbdSnapshots`]: a volume's snapshots, which are RBD snapshots of its image.
//!
//! Every host connected to the pool sees the same volumes. Names in the pool:
//!
//! | image | what it is |
//! |---|---|
//! | `NAME` | volume `NAME` |
//! | `.NAME.OPERATION` | a volume being built (`creating`, `rebuilding`, ...), watched by its builder |
//! | `.NAME.replaced` | the volume a replace swapped out, removed once its header is wiped |
//! | `.NAME.snapshots-N` | a volume a replace swapped out that has snapshots: kept for them (its header wiped), removed with its last snapshot |
//!
//! **Atomic replace without rename-over.** RBD renames refuse an existing target, so a
//! replace takes three renames and a mark that makes them restartable:
//! 1. the staged image, flushed, gets the metadata `cryptnbd.publish = NAME` (it is whole);
//! 2. `NAME` becomes `.NAME.replaced`;
//! 3. `.NAME.OPERATION` becomes `NAME`, and the mark is removed.
//!
//! A crash after step 1 is rolled forward by [`RbdCatalog::leftovers`] (which every daemon
//! runs at start and before it stages a volume) and by [`Catalog::exists`] of the missing
//! name: a marked staged image is complete, so the renames are finished. A crash before step
//! 1 leaves the old volume and a staged image to discard. Either way the volume is the old
//! one or the new one, whole.
//!
//! **Snapshots outlive a replace.** RBD snapshots belong to an image, and a replace (a
//! rebuild from a snapshot, a re-encryption) makes a new image. The old one, if it has
//! snapshots, is kept under a hidden name for them, and [`RbdSnapshots`] lists the snapshots
//! of the volume's image and of every image kept so.
//!
//! **One writer across hosts.** A volume opened for writing holds its image's exclusive
//! lock in exclusive mode (librbd then hands it to nobody who asks), and the holder records
//! who it is in the image's metadata (`cryptnbd.holder.*`: host, state directory, daemon
//! instance). Another host's open is refused with [`OpenError::Held`], naming the lock owner
//! as librbd reports it and the holder's own record. The lock of the same daemon instance
//! (a restarted daemon, recognised by the instance id of its state directory, never by host
//! name) is broken and taken at once: that instance is dead. [`Catalog::take_over`] takes a
//! volume from a holder that is gone: it waits until nobody watches the image (a dead
//! client's watch lapses after `osd_client_watch_timeout`), or not at all with `force`,
//! then breaks the lock, which blocklists the old holder: it can never write again.
//!
//! **Who may touch what.** A staged image is created and opened (so watched) by its
//! builder; it is a leftover only once nobody watches it (its builder closed it or died and
//! its watch lapsed, `osd_client_watch_timeout`), so a daemon starting on another host never
//! takes away a volume that is being built.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use std::time::{Duration, Instant};
use store::BackingStore;
use store::catalog::{Catalog, Staged};
use store::copy::{CloneMethod, Watch};
use store::durable::Existing;
use store::file::{Access, OpenError};

use crate::{Image, Pool, RbdStore};

/// The metadata key that marks a staged image as complete and on its way to its name.
const PUBLISH_KEY: &str = "cryptnbd.publish";
/// The suffix of a volume that a replace swapped out.
const REPLACED: &str = "replaced";
/// The suffix (before a number) of a swapped-out volume kept for its snapshots.
const HOLDER: &str = "snapshots-";

/// What a hidden image of the pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hidden {
    /// A volume being built.
    Staged,
    /// A volume a replace swapped out.
    Replaced,
    /// A swapped-out volume kept for its snapshots.
    Holder,
}

/// The hidden images among `images`, the names a pool lists (any host may have made them):
/// (image, the volume it is for, what it is).
pub fn hidden(images: &[String]) -> Vec<(String, String, Hidden)> {
    images
        .iter()
        .filter_map(|image| {
            let (name, op) = image.strip_prefix('.')?.rsplit_once('.')?;
            let kind = if op == REPLACED {
                Hidden::Replaced
            } else if op.starts_with(HOLDER) {
                Hidden::Holder
            } else {
                Hidden::Staged
            };
            (!name.is_empty()).then(|| (image.clone(), name.to_owned(), kind))
        })
        .collect()
}

/// Retires image `image` that used to be volume `name`: removed if it has no snapshots, else
/// kept for them under a holder's name.
fn retire(pool: &Arc<Pool>, image: &str, name: &str) -> io::Result<()> {
    match keep_for_snapshots(pool, image, name)? {
        Some(_) => Ok(()),
        None => gone_is_fine(pool.remove_image(image)),
    }
}

/// Renames `image`, a swapped-out volume `name`, to a holder's name if it has snapshots:
/// the new name, or None if it has none.
fn keep_for_snapshots(pool: &Arc<Pool>, image: &str, name: &str) -> io::Result<Option<String>> {
    if pool.open_read_only(image, None)?.snapshots()?.is_empty() {
        return Ok(None);
    }
    let stamp = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let holder = format!(".{name}.{HOLDER}{stamp}");
    pool.rename_image(image, &holder)?;
    Ok(Some(holder))
}

/// Who holds a volume: recorded in its image's metadata while it does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holder {
    /// The host name.
    pub host: String,
    /// The daemon's state directory.
    pub state_dir: String,
    /// The daemon instance (kept in its state directory: the same across restarts).
    pub instance: String,
}

const HOLDER_KEYS: [&str; 3] = [
    "cryptnbd.holder.host",
    "cryptnbd.holder.state_dir",
    "cryptnbd.holder.instance",
];

impl Holder {
    /// The holder an image's metadata records, if any.
    pub fn of(image: &Image) -> io::Result<Option<Self>> {
        Self::from_metadata(|key| image.metadata_get(key))
    }

    /// The holder that metadata read with `get` (a key's value, None when unset) records, if
    /// any: none without an instance. The values come from the cluster, as any host wrote
    /// them.
    pub fn from_metadata(
        get: impl Fn(&str) -> io::Result<Option<String>>,
    ) -> io::Result<Option<Self>> {
        let get = |key: &str| get(key).map(Option::unwrap_or_default);
        let [host, state_dir, instance] = HOLDER_KEYS;
        let instance = get(instance)?;
        if instance.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            host: get(host)?,
            state_dir: get(state_dir)?,
            instance,
        }))
    }

    /// Records this holder on `image`, asking `in_time` before each key.
    fn record(&self, image: &Image, in_time: impl Fn() -> io::Result<()>) -> io::Result<()> {
        for (key, value) in
            HOLDER_KEYS
                .into_iter()
                .zip([&self.host, &self.state_dir, &self.instance])
        {
            in_time()?;
            image.metadata_set(key, value)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host {} (state directory {}, daemon instance {})",
            self.host, self.state_dir, self.instance
        )
    }
}

/// The volumes of one RBD pool.
#[derive(Debug, Clone)]
pub struct RbdCatalog {
    pool: Arc<Pool>,
    /// Who this client is, recorded on the volumes it opens for writing.
    me: Holder,
    /// When one of the catalog's Ceph operations last timed out.
    stalled: Arc<Mutex<Option<Instant>>>,
    /// How long after a timed-out operation the catalog answers at once that the cluster
    /// does not answer (the client's `rados_osd_op_timeout`): a command fails after one
    /// timeout, not after one per operation it would make.
    quiet: Duration,
}

impl RbdCatalog {
    /// The catalog of the images in `pool`, opened by nobody in particular (tests).
    pub fn new(pool: Arc<Pool>) -> Self {
        Self::with_holder(pool, Holder::default())
    }

    /// The catalog of the images in `pool` for the daemon `me`.
    pub fn with_holder(pool: Arc<Pool>, me: Holder) -> Self {
        let quiet = pool
            .cluster()
            .conf_get("rados_osd_op_timeout")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::ZERO, Duration::from_secs_f64);
        Self {
            pool,
            me,
            stalled: Arc::default(),
            quiet,
        }
    }

    /// Runs `op`, one of the catalog's calls to the cluster, unless an operation timed out
    /// less than [`quiet`](Self::quiet) ago: then it fails at once, saying so.
    fn ask<T, E: Stall>(&self, op: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let stalled = *self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = stalled
            && at.elapsed() < self.quiet
        {
            return Err(E::from(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "an operation on the Ceph cluster of pool {} timed out (each gives up \
                     after {}s) {}s ago, so it is not asked again for now: check the monitors \
                     and OSDs, then retry",
                    self.pool.name(),
                    self.quiet.as_secs(),
                    at.elapsed().as_secs()
                ),
            )));
        }
        let r = op();
        let mut stalled = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        match &r {
            Err(e) if e.timed_out() => *stalled = Some(Instant::now()),
            Ok(_) => *stalled = None,
            Err(_) => {}
        }
        r
    }

    /// Who holds volume `name` now: the lock owners librbd reports and the holder's record
    /// (None: nobody holds its lock).
    pub fn holder(&self, name: &str) -> io::Result<Option<(Vec<String>, Option<Holder>)>> {
        self.locked(name, |image, owners| Ok((owners, Holder::of(image)?)))
    }

    /// Who holds volume `name` now, as a sentence (the one a refused open gives); None:
    /// nobody holds its lock.
    pub fn held_by(&self, name: &str) -> io::Result<Option<String>> {
        self.locked(name, |image, owners| {
            Ok(describe(image, &owners, Holder::of(image)?.as_ref()))
        })
    }

    /// `then(image, lock owners)` when volume `name` is locked, else None.
    fn locked<T>(
        &self,
        name: &str,
        then: impl FnOnce(&Image, Vec<String>) -> io::Result<T>,
    ) -> io::Result<Option<T>> {
        self.ask(|| {
            // Lock owners are known to an open for writing only (it watches the image
            // briefly).
            let image = self.pool.open(name)?;
            let owners = image.lock_owners()?;
            if owners.is_empty() {
                return Ok(None);
            }
            then(&image, owners).map(Some)
        })
    }

    /// Whether this catalog knows which daemon instance it serves.
    fn mine_known(&self) -> bool {
        !self.me.instance.is_empty()
    }

    /// Whether `image` records this daemon instance as its holder or builder.
    fn is_mine(&self, image: &Image) -> io::Result<bool> {
        Ok(self.mine_known() && Holder::of(image)?.is_some_and(|h| h.instance == self.me.instance))
    }

    /// How long a dead client's watch lasts: the cluster's `osd_client_watch_timeout` as this
    /// client's configuration gives it (30 s by default), plus a margin.
    fn watch_lapse(&self) -> Duration {
        let secs = self
            .pool
            .cluster()
            .conf_get("osd_client_watch_timeout")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(30);
        Duration::from_secs(secs + 5)
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    fn spec(&self, image: &str) -> PathBuf {
        PathBuf::from(format!("rbd:{}/{image}", self.pool.name()))
    }

    /// The image under a staged store's location.
    fn image_of(staged: &Staged) -> io::Result<String> {
        image_name(&staged.location)
    }

    /// Finishes the replaces a crash interrupted after their staged image was marked
    /// complete (`only`: for that volume only).
    fn settle(&self, only: Option<&str>) -> io::Result<()> {
        let images = self.pool.images()?;
        for (image, name, kind) in hidden(&images) {
            if kind != Hidden::Staged || only.is_some_and(|o| o != name) {
                continue;
            }
            let marked = match self.pool.open_read_only(&image, None) {
                Ok(i) => i.metadata_get(PUBLISH_KEY)?.as_deref() == Some(name.as_str()),
                Err(_) => false,
            };
            if !marked {
                continue;
            }
            let aside = format!(".{name}.{REPLACED}");
            if images.contains(&name) {
                if images.contains(&aside) {
                    // Not a state a replace leaves: keep the volume, the staged image goes
                    // as a leftover.
                    continue;
                }
                self.pool.rename_image(&name, &aside)?;
            }
            self.pool.rename_image(&image, &name)?;
            self.pool.open(&name)?.metadata_remove(PUBLISH_KEY)?;
        }
        Ok(())
    }

    /// Opens image `image` for writing under its exclusive lock, and records this client
    /// as its holder: `Held` while another client holds the lock, alive or dead (librbd
    /// would break a dead holder's lock by itself; taking a volume from another host is
    /// for [`Catalog::take_over`] only). The lock of this same daemon instance, which is
    /// dead if it is not this process, is broken first.
    fn open_locked(&self, image: &str) -> Result<Image, OpenError> {
        // The steps together may take as long as one operation may: a cluster that answers
        // each step just before its timeout would otherwise hold an attach for several.
        let started = Instant::now();
        let in_time = || -> io::Result<()> {
            if !self.quiet.is_zero() && started.elapsed() >= self.quiet {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "opening RBD image {}/{image} timed out: its steps took longer than \
                         the {}s one operation may take; check the monitors and OSDs, then \
                         retry",
                        self.pool.name(),
                        self.quiet.as_secs()
                    ),
                ));
            }
            Ok(())
        };
        let opened = self.pool.open(image).map_err(OpenError::Io)?;
        in_time().map_err(OpenError::Io)?;
        let held = |opened: &Image, owners: &[String]| -> Result<(), OpenError> {
            let holder = Holder::of(opened).map_err(OpenError::Io)?;
            let mine = self.mine_known()
                && holder
                    .as_ref()
                    .is_some_and(|h| h.instance == self.me.instance);
            if !mine {
                return Err(OpenError::Held(describe(opened, owners, holder.as_ref())));
            }
            for owner in owners {
                opened.lock_break(owner).map_err(OpenError::Io)?;
            }
            Ok(())
        };
        let owners = opened.lock_owners().map_err(OpenError::Io)?;
        in_time().map_err(OpenError::Io)?;
        if !owners.is_empty() {
            held(&opened, &owners)?;
        }
        if let Err(e) = opened.lock_acquire() {
            // Taken by another host since the look above.
            let owners = opened.lock_owners().map_err(OpenError::Io)?;
            if owners.is_empty() {
                return Err(OpenError::Io(e));
            }
            held(&opened, &owners)?;
            opened.lock_acquire().map_err(OpenError::Io)?;
        }
        in_time().map_err(OpenError::Io)?;
        if self.mine_known() {
            self.me.record(&opened, in_time).map_err(OpenError::Io)?;
        }
        Ok(opened)
    }
}

/// An error the catalog's circuit breaker looks at: whether it is a timeout, and how a
/// refusal of its own is made.
trait Stall: From<io::Error> {
    fn timed_out(&self) -> bool;
}

impl Stall for io::Error {
    fn timed_out(&self) -> bool {
        self.kind() == io::ErrorKind::TimedOut
    }
}

impl Stall for OpenError {
    fn timed_out(&self) -> bool {
        matches!(self, OpenError::Io(e) if e.timed_out())
    }
}

/// A holder as a sentence: librbd's lock owners (their addresses), named as clients where
/// `image`'s watchers show which client has that address, and the holder's own record.
fn describe(image: &Image, owners: &[String], holder: Option<&Holder>) -> String {
    let watchers = image.watchers().unwrap_or_default();
    let owners = owners
        .iter()
        .map(|addr| match watchers.iter().find(|(_, a)| a == addr) {
            Some((id, _)) => format!("client.{id} at {addr}"),
            None => addr.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    match holder {
        Some(h) => format!("{h}, lock owner {owners}"),
        None => format!("lock owner {owners}"),
    }
}

/// The names that are volumes (or snapshots) and not hidden work in progress, sorted.
fn visible(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = names.into_iter().filter(|n| !n.starts_with('.')).collect();
    v.sort();
    v
}

/// The last component of an `rbd:POOL/IMAGE` location.
fn image_name(location: &Path) -> io::Result<String> {
    location
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not an RBD image", location.display()),
            )
        })
}

/// `Ok` for a result that failed only because the thing was already gone.
fn gone_is_fine(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

impl Catalog for RbdCatalog {
    fn list(&self) -> io::Result<Vec<String>> {
        self.ask(|| Ok(visible(self.pool.images()?)))
    }

    fn location(&self, name: &str) -> PathBuf {
        self.spec(name)
    }

    fn exists(&self, name: &str) -> bool {
        let there = || self.ask(|| io::Result::Ok(self.pool.images()?.iter().any(|n| n == name)));
        there().unwrap_or(false)
            || (self.ask(|| self.settle(Some(name))).is_ok() && there().unwrap_or(false))
    }

    fn open(&self, name: &str, access: Access) -> Result<Box<dyn BackingStore>, OpenError> {
        self.ask(|| {
            let image = match access {
                Access::ReadWrite => self.open_locked(name)?,
                // RBD has no shared lock: a reader does not keep a writer out.
                Access::ReadOnly | Access::Inspect => self.pool.open_read_only(name, None)?,
            };
            let store: Box<dyn BackingStore> = Box::new(RbdStore::new(image)?);
            Ok(store)
        })
    }

    /// Waits until nobody watches the image (`force`: not at all), then breaks its lock,
    /// which blocklists the old holder, and opens it under the lock.
    fn take_over(
        &self,
        name: &str,
        force: bool,
        watch: &dyn Watch,
    ) -> Result<Box<dyn BackingStore>, OpenError> {
        let io = OpenError::Io;
        // Lock owners are known to an open for writing only; its own watch is not counted.
        let look = self.pool.open(name).map_err(io)?;
        let me = self.pool.cluster().instance_id();
        let others = |image: &Image| -> io::Result<Vec<(i64, String)>> {
            let mut w = image.watchers()?;
            w.retain(|(id, _)| u64::try_from(*id).ok() != Some(me));
            Ok(w)
        };
        let owners = look.lock_owners().map_err(io)?;
        if !owners.is_empty() && !force {
            let lapse = self.watch_lapse();
            watch.phase("waiting for the holder's watch to lapse", lapse.as_secs());
            let start = Instant::now();
            let mut waited = 0;
            loop {
                let watchers = others(&look).map_err(io)?;
                if watchers.is_empty() {
                    break;
                }
                if start.elapsed() >= lapse {
                    let holder = Holder::of(&look).map_err(io)?;
                    let at: Vec<String> = watchers.iter().map(|(_, a)| a.clone()).collect();
                    return Err(OpenError::Held(format!(
                        "{}, which is alive: it still watches the image from {} after {}s; detach it there, or add --force to fence it anyway",
                        describe(&look, &owners, holder.as_ref()),
                        at.join(", "),
                        lapse.as_secs()
                    )));
                }
                watch.check().map_err(io)?;
                std::thread::sleep(Duration::from_millis(500));
                let now = start.elapsed().as_secs();
                if now > waited {
                    watch.add(now - waited);
                    waited = now;
                }
            }
        }
        for owner in look.lock_owners().map_err(io)? {
            look.lock_break(&owner).map_err(io)?;
        }
        drop(look);
        let image = self.open_locked(name)?;
        Ok(Box::new(RbdStore::new(image).map_err(io)?))
    }

    fn stage(&self, name: &str, operation: &str) -> io::Result<Staged> {
        let hidden = format!(".{name}.{operation}");
        // A leftover of the same name and operation goes (refused while someone uses it).
        gone_is_fine(self.pool.remove_image(&hidden))?;
        self.pool.create_image(&hidden, 0)?;
        // Not locked in exclusive mode: the builder may write it through several handles
        // (librbd passes the lock between them); its watch keeps other hosts away.
        let image = self.pool.open(&hidden)?;
        if self.mine_known() {
            // A restart of this daemon knows its dead builder's images by this. (Each
            // metadata write has its own timeout; a stage is not an attach a user waits on.)
            self.me.record(&image, || Ok(()))?;
        }
        let store = RbdStore::named(image, self.location(name))?;
        Ok(Staged::new(name, self.spec(&hidden), Some(Box::new(store))))
    }

    fn publish(
        &self,
        staged: Staged,
        existing: Existing,
    ) -> io::Result<Option<Box<dyn BackingStore>>> {
        let hidden = Self::image_of(&staged)?;
        let name = staged.name.as_str();
        let own = staged
            .store()
            .and_then(|s| s.as_any().downcast_ref::<RbdStore>())
            .map(RbdStore::image);
        let opened;
        let image = match own {
            Some(i) => {
                i.flush()?;
                i
            }
            // The store was taken: its owner flushes what it wrote (this handle wrote
            // nothing; the owner's holds the lock, which librbd hands the metadata change to).
            None => {
                opened = self.pool.open(&hidden)?;
                &opened
            }
        };
        if existing == Existing::Keep {
            return match self.pool.rename_image(&hidden, name) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists", self.location(name).display()),
                )),
                r => r.map(|()| None),
            };
        }
        let aside = format!(".{name}.{REPLACED}");
        image.metadata_set(PUBLISH_KEY, name)?;
        store::crash::crash_point("rbd-replace-marked");
        let had_old = match self.pool.rename_image(name, &aside) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        store::crash::crash_point("rbd-replace-old-aside");
        self.pool.rename_image(&hidden, name)?;
        store::crash::crash_point("rbd-replace-new-in-place");
        image.metadata_remove(PUBLISH_KEY)?;
        if !had_old {
            return Ok(None);
        }
        // Kept open until the caller has wiped its header, then removed; or kept for its
        // snapshots.
        let old = match keep_for_snapshots(&self.pool, &aside, name)? {
            Some(holder) => self.pool.open(&holder)?,
            None => self.pool.open(&aside)?.remove_when_closed(),
        };
        Ok(Some(Box::new(RbdStore::named(old, self.location(name))?)))
    }

    fn open_staged(&self, staged: &Staged) -> io::Result<Box<dyn BackingStore>> {
        let hidden = Self::image_of(staged)?;
        // Another handle of its builder, or a leftover: a dead builder's lock is broken here
        // if it was this daemon's dead previous instance (whose watch may not have lapsed
        // yet); librbd breaks an unwatched one by itself on the first write.
        let image = self.pool.open(&hidden)?;
        let owners = image.lock_owners()?;
        if !owners.is_empty() && self.is_mine(&image)? {
            // This process's own address: the watch of this open, by client id.
            let me = self.pool.cluster().instance_id();
            let here = image
                .watchers()?
                .into_iter()
                .find(|(id, _)| u64::try_from(*id).ok() == Some(me))
                .map(|(_, addr)| addr);
            for owner in owners.iter().filter(|o| Some(*o) != here.as_ref()) {
                image.lock_break(owner)?;
            }
        }
        Ok(Box::new(RbdStore::named(image, staged.location.clone())?))
    }

    /// A swapped-out volume that has snapshots is kept for them.
    fn discard(&self, staged: Staged) -> io::Result<()> {
        match retire(&self.pool, &Self::image_of(&staged)?, &staged.name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.pool.remove_image(name)
    }

    fn leftovers(&self) -> io::Result<Vec<Staged>> {
        self.ask(|| self.leftovers_now())
    }

    fn modified(&self, name: &str) -> io::Result<SystemTime> {
        self.ask(|| self.pool.open_read_only(name, None)?.modified())
    }

    /// Image metadata `cryptnbd.LABEL`, set through the image's lock holder if another
    /// handle (an attachment) holds it.
    fn label(&self, name: &str, labels: &[(&str, String)]) -> io::Result<()> {
        self.ask(|| {
            let image = self.pool.open(name)?;
            for (key, value) in labels {
                image.metadata_set(&format!("cryptnbd.{key}"), value)?;
            }
            Ok(())
        })
    }

    fn snapshots(&self, name: &str) -> io::Result<Arc<dyn Catalog>> {
        Ok(Arc::new(RbdSnapshots {
            pool: Arc::clone(&self.pool),
            volume: name.to_owned(),
        }))
    }
}

impl RbdCatalog {
    fn leftovers_now(&self) -> io::Result<Vec<Staged>> {
        self.settle(None)?;
        let mut out = Vec::new();
        for (image, name, kind) in hidden(&self.pool.images()?) {
            if kind == Hidden::Holder {
                continue;
            }
            // Still watched: its builder is alive, or died less than a watch timeout ago;
            // unless that builder was this daemon's dead previous instance.
            let live = match self.pool.open_read_only(&image, None) {
                Ok(i) => !i.watchers()?.is_empty() && !self.is_mine(&i)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if !live {
                out.push(Staged::new(&name, self.spec(&image), None));
            }
        }
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }
}

/// The snapshots of one RBD volume: RBD snapshots of its image, taken in the cluster (no
/// copy), read-only. A snapshot being taken is `.NAME.OPERATION` until published.
#[derive(Debug)]
pub struct RbdSnapshots {
    pool: Arc<Pool>,
    volume: String,
}

impl RbdSnapshots {
    fn spec(&self, snapshot: &str) -> PathBuf {
        PathBuf::from(format!(
            "rbd:{}/{}@{snapshot}",
            self.pool.name(),
            self.volume
        ))
    }

    /// The snapshot a staged location names (`rbd:POOL/VOLUME@SNAPSHOT`).
    fn snapshot_of(staged: &Staged) -> io::Result<String> {
        image_name(&staged.location)?
            .rsplit_once('@')
            .map(|(_, s)| s.to_owned())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not an RBD snapshot", staged.location.display()),
                )
            })
    }

    /// Every snapshot of the volume, with the image it is of and when it was taken: those
    /// of the volume's image first, then those of swapped-out images kept for them.
    fn all(&self) -> io::Result<Vec<(String, String, SystemTime)>> {
        let images = self.pool.images()?;
        let holders = hidden(&images)
            .into_iter()
            .filter(|(_, name, kind)| *kind == Hidden::Holder && *name == self.volume)
            .map(|(image, _, _)| image);
        let mut out = Vec::new();
        for image in std::iter::once(self.volume.clone()).chain(holders) {
            match self.pool.open_read_only(&image, None) {
                Ok(i) => out.extend(
                    i.snapshots()?
                        .into_iter()
                        .map(|(s, at)| (image.clone(), s, at)),
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The image snapshot `name` is of, or `NotFound`.
    fn image_of(&self, name: &str) -> io::Result<String> {
        self.all()?
            .into_iter()
            .find(|(_, s, _)| s == name)
            .map(|(image, _, _)| image)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no such snapshot", self.spec(name).display()),
                )
            })
    }

    /// The volume's image, opened to change its snapshots (librbd hands the change to the
    /// holder of the image's lock, if another client has it).
    fn head(&self) -> io::Result<Image> {
        self.pool.open(&self.volume)
    }

    fn read_only(&self, snapshot: &str) -> io::Result<RbdStore> {
        let image = self
            .pool
            .open_read_only(&self.image_of(snapshot)?, Some(snapshot))?;
        RbdStore::named(image, self.spec(snapshot))
    }

    /// Removes snapshot `name` wherever it is; a kept image goes with its last snapshot.
    fn remove_snapshot(&self, name: &str) -> io::Result<()> {
        let image = self.image_of(name)?;
        if image == self.volume {
            return self.head()?.snap_remove(name);
        }
        let held = self.pool.open(&image)?;
        held.snap_remove(name)?;
        let rest = held.snapshots()?;
        drop(held);
        if rest.is_empty() {
            gone_is_fine(self.pool.remove_image(&image))?;
        }
        Ok(())
    }
}

impl Catalog for RbdSnapshots {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(visible(self.all()?.into_iter().map(|(_, n, _)| n)))
    }

    fn location(&self, name: &str) -> PathBuf {
        self.spec(name)
    }

    fn exists(&self, name: &str) -> bool {
        self.all()
            .is_ok_and(|all| all.iter().any(|(_, n, _)| n == name))
    }

    /// A snapshot is read-only whatever `access` asks: its bytes never change.
    fn open(&self, name: &str, _access: Access) -> Result<Box<dyn BackingStore>, OpenError> {
        Ok(Box::new(self.read_only(name).map_err(OpenError::Io)?))
    }

    /// Nothing is made until [`clone_store`](Catalog::clone_store) takes the snapshot.
    fn stage(&self, name: &str, operation: &str) -> io::Result<Staged> {
        let hidden = format!(".{name}.{operation}");
        if self.exists(&hidden) {
            self.remove_snapshot(&hidden)?;
        }
        Ok(Staged::new(name, self.spec(&hidden), None))
    }

    fn publish(
        &self,
        staged: Staged,
        existing: Existing,
    ) -> io::Result<Option<Box<dyn BackingStore>>> {
        if existing == Existing::Replace {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: an RBD snapshot is never replaced",
                    staged.location.display()
                ),
            ));
        }
        let hidden = Self::snapshot_of(&staged)?;
        let taken = || {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists", self.location(&staged.name).display()),
            )
        };
        // A name taken on a kept image counts too: names are unique across them.
        if self.exists(&staged.name) {
            return Err(taken());
        }
        match self.head()?.snap_rename(&hidden, &staged.name) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(taken()),
            r => r.map(|()| None),
        }
    }

    fn open_staged(&self, staged: &Staged) -> io::Result<Box<dyn BackingStore>> {
        Ok(Box::new(self.read_only(&Self::snapshot_of(staged)?)?))
    }

    fn discard(&self, staged: Staged) -> io::Result<()> {
        gone_is_fine(self.remove_snapshot(&Self::snapshot_of(&staged)?))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.remove_snapshot(name)
    }

    /// Read-only: Ceph trims a removed snapshot's objects itself.
    fn immutable(&self) -> bool {
        true
    }

    fn leftovers(&self) -> io::Result<Vec<Staged>> {
        Ok(self
            .all()?
            .into_iter()
            .filter_map(|(_, snap, _)| {
                let (name, _) = snap.strip_prefix('.')?.rsplit_once('.')?;
                Some(Staged::new(name, self.spec(&snap), None))
            })
            .collect())
    }

    fn modified(&self, name: &str) -> io::Result<SystemTime> {
        self.all()?
            .into_iter()
            .find(|(_, n, _)| n == name)
            .map(|(_, _, at)| at)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: no such snapshot", self.spec(name).display()),
                )
            })
    }

    fn snapshots(&self, name: &str) -> io::Result<Arc<dyn Catalog>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: a snapshot has no snapshots of its own",
                self.spec(name).display()
            ),
        ))
    }

    /// Takes an RBD snapshot of the volume's own image, `source` (flushed first): nothing is
    /// copied. Any other source is refused.
    fn clone_store(
        &self,
        source: &dyn BackingStore,
        staged: &Staged,
        watch: &dyn Watch,
    ) -> io::Result<CloneMethod> {
        let ours = format!("{}/{}", self.pool.name(), self.volume);
        let Some(image) = source
            .as_any()
            .downcast_ref::<RbdStore>()
            .map(RbdStore::image)
            .filter(|i| i.spec() == ours)
        else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: a snapshot of an RBD volume is taken of its own image, not of {}",
                    staged.location.display(),
                    source.location().display()
                ),
            ));
        };
        watch.check()?;
        watch.phase("snapshotting", 0);
        // What the source's writer has cached goes to the cluster first; the snapshot is
        // taken through a handle of our own (the source may be read-only), and librbd has
        // the holder of the image's lock take it if another handle holds it.
        image.flush()?;
        self.head()?.snap_create(&Self::snapshot_of(staged)?)?;
        Ok(CloneMethod::Snapshot)
    }
}
