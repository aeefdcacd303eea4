//! Catalogs: where volumes live, by name, and how a volume changes as a whole.
//!
//! A [`Catalog`] maps names to backing stores and makes the whole-volume changes atomic: a
//! new or rebuilt volume is built in a *staged* store under a hidden name and appears under
//! its own name only when [`publish`](Catalog::publish)ed, so a crash leaves the old volume
//! or the new one, never a half-built one under the real name. Staged stores left by a crash
//! are found again with [`leftovers`](Catalog::leftovers).
//!
//! Snapshots and clones go through the catalog too: [`clone_store`](Catalog::clone_store)
//! fills a staged store with a copy of a volume, the cheapest way the engine has (a reflink
//! between files, a sparse copy otherwise), and [`snapshots`](Catalog::snapshots) is the
//! catalog a volume's snapshots live in. A snapshot is taken by staging in that catalog,
//! cloning the volume into it and publishing; a rebuild from a snapshot clones the other
//! way and replaces the volume.
//!
//! Engines: [`DirCatalog`] (a directory of `NAME.luks` files: hidden temporary files, fsync,
//! link or rename, directory fsync, flock through the file engine, FICLONE) and
//! [`MemCatalog`] (memory, for tests). Both pass [`check`].
//!
//! A catalog knows nothing of the volume format: wiping a header before a discard, say, is
//! the caller's (it opens the staged store first).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::BackingStore;
use crate::copy::{self, CloneMethod, Watch};
use crate::durable::{Existing, sync_dir};
use crate::file::{Access, FileIo, FileStore, OpenError};
use crate::memory::MemStore;

/// A store being built to become volume `name`, under a hidden name of its own.
#[derive(Debug)]
pub struct Staged {
    /// The volume it becomes.
    pub name: String,
    /// Where it is while staged (a hidden file for [`DirCatalog`]); its store names the
    /// volume it becomes in messages.
    pub location: PathBuf,
    store: Option<Box<dyn BackingStore>>,
}

impl Staged {
    /// A staged store of another crate's catalog: volume `name`, staged at `location`, with
    /// its store (None when the engine makes it later, as an RBD snapshot is).
    pub fn new(name: &str, location: PathBuf, store: Option<Box<dyn BackingStore>>) -> Self {
        Self {
            name: name.to_owned(),
            location,
            store,
        }
    }

    /// The staged store, to format or fill (taken once; a volume then owns it).
    pub fn take_store(&mut self) -> Option<Box<dyn BackingStore>> {
        self.store.take()
    }

    /// The staged store, while it has not been taken.
    pub fn store(&self) -> Option<&dyn BackingStore> {
        self.store.as_deref()
    }

    /// Another handle on the same staged store, without the store itself: to wipe and
    /// discard it when a publish of this one fails.
    pub fn handle(&self) -> Staged {
        Staged {
            name: self.name.clone(),
            location: self.location.clone(),
            store: None,
        }
    }
}

/// Where volumes live, by name, and their whole-volume changes.
pub trait Catalog: Send + Sync + fmt::Debug {
    /// The names of the volumes, sorted (staged stores are not volumes).
    fn list(&self) -> io::Result<Vec<String>>;

    /// Where volume `name` lives (or would), for messages and `status`.
    fn location(&self, name: &str) -> PathBuf;

    /// Whether volume `name` exists.
    fn exists(&self, name: &str) -> bool;

    /// Opens volume `name` (a file engine takes the lock `access` asks for; a volume held
    /// elsewhere is [`OpenError::Locked`], or [`OpenError::Held`] naming the holder).
    fn open(&self, name: &str, access: Access) -> Result<Box<dyn BackingStore>, OpenError>;

    /// Opens volume `name` for writing, taking it from the host that holds it: once that
    /// host is gone (the engine waits a while for it to be, following `watch`), or at once
    /// with `force`; the old holder is fenced so that it can never write again. Engines
    /// whose locks end with their holder (files) have nothing to take over: `Unsupported`.
    fn take_over(
        &self,
        name: &str,
        force: bool,
        watch: &dyn Watch,
    ) -> Result<Box<dyn BackingStore>, OpenError> {
        let _ = (force, watch);
        Err(OpenError::Io(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: a lock on a local file ends with the process that held it; there is nothing to take over",
                self.location(name).display()
            ),
        )))
    }

    /// A new, empty store that will become volume `name` when published; `operation` names
    /// the hidden store (`creating`, `rebuilding`, ...). A staged store of the same name and
    /// operation left over is replaced.
    fn stage(&self, name: &str, operation: &str) -> io::Result<Staged>;

    /// Makes `staged` volume `name`, durably: as a new volume (`Existing::Keep`: refused with
    /// `AlreadyExists` if the name is taken) or in place of the old one (`Existing::Replace`,
    /// atomic: a crash leaves the old volume or the new one). A replaced volume's store is
    /// handed back, still open for reading and writing until dropped, so the caller can wipe
    /// what must not linger in the space it frees (a header with a wrapped key).
    fn publish(
        &self,
        staged: Staged,
        existing: Existing,
    ) -> io::Result<Option<Box<dyn BackingStore>>>;

    /// Opens a staged store again (to wipe it before a discard).
    fn open_staged(&self, staged: &Staged) -> io::Result<Box<dyn BackingStore>>;

    /// Removes a staged store.
    fn discard(&self, staged: Staged) -> io::Result<()>;

    /// Removes volume `name` (the caller wipes what must not linger first, having asked
    /// [`check_remove`](Self::check_remove)).
    fn remove(&self, name: &str) -> io::Result<()>;

    /// Whether volume `name` may be removed: `Err` says why not (a device the catalog was
    /// given is not its to erase), before the caller wipes anything.
    fn check_remove(&self, name: &str) -> io::Result<()> {
        let _ = name;
        Ok(())
    }

    /// Records `labels` (name, value) on volume `name` where the engine keeps such things
    /// beside the bytes, for tools that look at the store without reading the volume (RBD
    /// image metadata, `rbd image-meta list`). The default keeps nothing: a file's header is
    /// its only record.
    fn label(&self, name: &str, labels: &[(&str, String)]) -> io::Result<()> {
        let _ = (name, labels);
        Ok(())
    }

    /// Whether this catalog's volumes can never be written (RBD snapshots): there is nothing
    /// a caller can wipe before [`remove`](Self::remove), which drops the bytes itself.
    fn immutable(&self) -> bool {
        false
    }

    /// Staged stores that a crash left behind, to wipe and discard.
    fn leftovers(&self) -> io::Result<Vec<Staged>>;

    /// When volume `name` last changed (for a snapshot, never written once taken: when it
    /// was taken).
    fn modified(&self, name: &str) -> io::Result<SystemTime>;

    /// The catalog that volume `name`'s snapshots live in: each a volume of its own there,
    /// a whole copy of `name` as it was. They are not volumes of this catalog, and they do
    /// not go with `name`: the caller removes them first. `Unsupported` in a catalog of
    /// snapshots.
    fn snapshots(&self, name: &str) -> io::Result<Arc<dyn Catalog>>;

    /// Fills `staged` (new and empty, of this catalog) with a copy of `source` (of this
    /// catalog or any other, which must not change during the call) and makes it durable,
    /// the cheapest way the engine has. `watch` follows it and may stop it; a stopped or
    /// failed clone leaves `staged` for the caller to discard. The default is a sparse copy
    /// ([`copy::sparse`]), which works between any two engines.
    fn clone_store(
        &self,
        source: &dyn BackingStore,
        staged: &Staged,
        watch: &dyn Watch,
    ) -> io::Result<CloneMethod> {
        let mut opened = None;
        let dst = staged_store(self, staged, &mut opened)?;
        copy::sparse(source, dst, watch, None)?;
        Ok(CloneMethod::Copy)
    }
}

/// `NAME.luks` files in one directory (created 0700 on the first stage).
#[derive(Debug, Clone)]
pub struct DirCatalog {
    dir: PathBuf,
    /// Where the snapshot directories are (`ROOT/NAME/SNAPSHOT.luks`); None in a catalog of
    /// snapshots.
    snapshots: Option<PathBuf>,
    /// How the volumes it opens for I/O move data (snapshots and staged files: buffered).
    io: FileIo,
}

const SUFFIX: &str = ".luks";

impl DirCatalog {
    /// The catalog of the files in `dir`, whose snapshots live in `snapshots/NAME/`.
    pub fn new(dir: &Path, snapshots: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            snapshots: Some(snapshots.to_path_buf()),
            io: FileIo::Buffered,
        }
    }

    /// This catalog, opening volumes for reading and writing with `io`.
    pub fn with_io(mut self, io: FileIo) -> Self {
        self.io = io;
        self
    }

    /// A catalog of snapshots: the files in `dir`, a directory that goes when its last
    /// snapshot does.
    fn of_snapshots(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            snapshots: None,
            io: FileIo::Buffered,
        }
    }

    /// The directory of a catalog of snapshots goes once empty (the error of a directory
    /// that still holds something is ignored).
    fn prune(&self) {
        if self.snapshots.is_none() {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    fn staged_path(&self, name: &str, operation: &str) -> PathBuf {
        self.dir.join(format!(".{name}.{operation}{SUFFIX}"))
    }
}

impl Catalog for DirCatalog {
    fn list(&self) -> io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.strip_suffix(SUFFIX)?.to_owned();
                (!n.is_empty() && !n.starts_with('.')).then_some(n)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    fn location(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{SUFFIX}"))
    }

    fn exists(&self, name: &str) -> bool {
        self.location(name).is_file()
    }

    fn open(&self, name: &str, access: Access) -> Result<Box<dyn BackingStore>, OpenError> {
        let store = FileStore::open(&self.location(name), access)?;
        Ok(Box::new(with_io(store, access, self.io)?))
    }

    fn stage(&self, name: &str, operation: &str) -> io::Result<Staged> {
        crate::durable::create_private_dir(&self.dir)?;
        let location = self.staged_path(name, operation);
        let _ = std::fs::remove_file(&location);
        let file = crate::durable::create_locked(&location)?;
        // Messages about the store name the volume it becomes, not the hidden file.
        let store = FileStore::from_file(file, &self.location(name))?;
        Ok(Staged {
            name: name.to_owned(),
            location,
            store: Some(Box::new(store)),
        })
    }

    fn publish(
        &self,
        staged: Staged,
        existing: Existing,
    ) -> io::Result<Option<Box<dyn BackingStore>>> {
        let target = self.location(&staged.name);
        if let Some(store) = &staged.store {
            store.flush()?;
        }
        if existing == Existing::Keep {
            crate::durable::link_new(&staged.location, &target)?;
            return Ok(None);
        }
        // Kept open across the rename: the caller wipes it once it is unlinked.
        let replaced = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .ok()
            .and_then(|f| FileStore::from_file(f, &target).ok())
            .map(|s| Box::new(s) as Box<dyn BackingStore>);
        crate::crash::crash_point("replace-before-rename");
        std::fs::rename(&staged.location, &target)?;
        crate::crash::crash_point("replace-after-rename");
        sync_dir(&self.dir)?;
        Ok(replaced)
    }

    fn open_staged(&self, staged: &Staged) -> io::Result<Box<dyn BackingStore>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&staged.location)?;
        Ok(Box::new(FileStore::from_file(file, &staged.location)?))
    }

    fn discard(&self, staged: Staged) -> io::Result<()> {
        match std::fs::remove_file(&staged.location) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => {
                self.prune();
                Ok(())
            }
        }
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.location(name))?;
        sync_dir(&self.dir)?;
        self.prune();
        Ok(())
    }

    fn leftovers(&self) -> io::Result<Vec<Staged>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            // `.NAME.OPERATION.luks`, and `.NAME.luks.creating-PID` from `Volume::create`.
            let Some(hidden) = file.strip_prefix('.') else {
                continue;
            };
            let name = if let Some(rest) = hidden.strip_suffix(SUFFIX) {
                rest.rsplit_once('.').map(|(n, _)| n.to_owned())
            } else {
                hidden
                    .split_once(".luks.creating-")
                    .map(|(n, _)| n.to_owned())
            };
            if let Some(name) = name {
                out.push(Staged {
                    name,
                    location: e.path(),
                    store: None,
                });
            }
        }
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    fn modified(&self, name: &str) -> io::Result<SystemTime> {
        std::fs::metadata(self.location(name))?.modified()
    }

    fn snapshots(&self, name: &str) -> io::Result<Arc<dyn Catalog>> {
        match &self.snapshots {
            Some(root) => Ok(Arc::new(Self::of_snapshots(&root.join(name)))),
            None => Err(no_nested_snapshots(&self.location(name))),
        }
    }

    /// A reflink (FICLONE) when both are files on a filesystem that shares blocks (XFS with
    /// reflink, btrfs); else a sparse copy, each piece by `copy_file_range` where the kernel
    /// can, by read and write otherwise.
    fn clone_store(
        &self,
        source: &dyn BackingStore,
        staged: &Staged,
        watch: &dyn Watch,
    ) -> io::Result<CloneMethod> {
        let mut opened = None;
        let dst = staged_store(self, staged, &mut opened)?;
        let (Some(from), Some(to)) = (
            source.as_any().downcast_ref::<FileStore>(),
            dst.as_any().downcast_ref::<FileStore>(),
        ) else {
            copy::sparse(source, dst, watch, None)?;
            return Ok(CloneMethod::Copy);
        };
        let len = source.len()?;
        watch.phase("cloning", len);
        match rustix::fs::ioctl_ficlone(to.file(), from.file()) {
            Ok(()) => {
                watch.add(len);
                watch.phase("syncing", 0);
                dst.flush()?;
                return Ok(CloneMethod::Reflink);
            }
            // This filesystem, or this pair of files, cannot share blocks: copy.
            Err(
                rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOTTY
                | rustix::io::Errno::PERM,
            ) => {}
            Err(e) => return Err(e.into()),
        }
        let piece = |at: u64, n: usize| -> io::Result<usize> {
            let (mut off_in, mut off_out) = (at, at);
            match rustix::fs::copy_file_range(
                from.file(),
                Some(&mut off_in),
                to.file(),
                Some(&mut off_out),
                n,
            ) {
                Ok(c) => Ok(c),
                // Not between these files: read and write.
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::NOSYS,
                ) => Ok(0),
                Err(e) => Err(e.into()),
            }
        };
        copy::sparse(source, dst, watch, Some(&piece))?;
        Ok(CloneMethod::Copy)
    }
}

/// The store of `staged`: its own while not taken, else opened again through `catalog`
/// (into `opened`).
fn staged_store<'a, C: Catalog + ?Sized>(
    catalog: &C,
    staged: &'a Staged,
    opened: &'a mut Option<Box<dyn BackingStore>>,
) -> io::Result<&'a dyn BackingStore> {
    if let Some(s) = staged.store() {
        return Ok(s);
    }
    Ok(&**opened.insert(catalog.open_staged(staged)?))
}

fn no_nested_snapshots(location: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "{}: a snapshot has no snapshots of its own",
            location.display()
        ),
    )
}

/// Volumes in memory, for tests: names to [`MemStore`]s, published by moving the staged
/// store under its name. Locks are not modelled: every open succeeds.
#[derive(Debug)]
pub struct MemCatalog {
    /// Each volume's store, and when it was published.
    volumes: Mutex<BTreeMap<String, (Arc<MemStore>, SystemTime)>>,
    staged: Mutex<BTreeMap<PathBuf, Arc<MemStore>>>,
    /// The catalogs of snapshots, by volume (None in a catalog of snapshots).
    snapshots: Option<Mutex<BTreeMap<String, Arc<MemCatalog>>>>,
}

impl Default for MemCatalog {
    fn default() -> Self {
        Self::new()
    }
}

impl MemCatalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self {
            volumes: Mutex::default(),
            staged: Mutex::default(),
            snapshots: Some(Mutex::default()),
        }
    }

    fn of_snapshots() -> Self {
        Self {
            snapshots: None,
            ..Self::new()
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Catalog for MemCatalog {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(Self::lock(&self.volumes).keys().cloned().collect())
    }

    fn location(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("memory:{name}"))
    }

    fn exists(&self, name: &str) -> bool {
        Self::lock(&self.volumes).contains_key(name)
    }

    fn open(&self, name: &str, _access: Access) -> Result<Box<dyn BackingStore>, OpenError> {
        match Self::lock(&self.volumes).get(name) {
            Some((s, _)) => Ok(Box::new(Arc::clone(s))),
            None => Err(OpenError::Io(io::Error::new(
                io::ErrorKind::NotFound,
                format!("memory:{name}: no such volume"),
            ))),
        }
    }

    fn stage(&self, name: &str, operation: &str) -> io::Result<Staged> {
        let location = PathBuf::from(format!("memory:.{name}.{operation}"));
        let store = Arc::new(MemStore::at(&location));
        Self::lock(&self.staged).insert(location.clone(), Arc::clone(&store));
        Ok(Staged {
            name: name.to_owned(),
            location,
            store: Some(Box::new(store)),
        })
    }

    fn publish(
        &self,
        staged: Staged,
        existing: Existing,
    ) -> io::Result<Option<Box<dyn BackingStore>>> {
        let store = Self::lock(&self.staged)
            .remove(&staged.location)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such staged store"))?;
        let mut volumes = Self::lock(&self.volumes);
        if existing == Existing::Keep && volumes.contains_key(&staged.name) {
            Self::lock(&self.staged).insert(staged.location, store);
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("memory:{}: exists", staged.name),
            ));
        }
        Ok(volumes
            .insert(staged.name, (store, SystemTime::now()))
            .map(|(old, _)| Box::new(old) as Box<dyn BackingStore>))
    }

    fn open_staged(&self, staged: &Staged) -> io::Result<Box<dyn BackingStore>> {
        Self::lock(&self.staged)
            .get(&staged.location)
            .map(|s| Box::new(Arc::clone(s)) as Box<dyn BackingStore>)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such staged store"))
    }

    fn discard(&self, staged: Staged) -> io::Result<()> {
        Self::lock(&self.staged).remove(&staged.location);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        Self::lock(&self.volumes)
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("memory:{name}")))
    }

    fn leftovers(&self) -> io::Result<Vec<Staged>> {
        Ok(Self::lock(&self.staged)
            .keys()
            .map(|location| Staged {
                name: location
                    .to_string_lossy()
                    .trim_start_matches("memory:.")
                    .rsplit_once('.')
                    .map_or_else(String::new, |(n, _)| n.to_owned()),
                location: location.clone(),
                store: None,
            })
            .collect())
    }

    fn modified(&self, name: &str) -> io::Result<SystemTime> {
        Self::lock(&self.volumes)
            .get(name)
            .map(|(_, t)| *t)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("memory:{name}")))
    }

    fn snapshots(&self, name: &str) -> io::Result<Arc<dyn Catalog>> {
        let Some(all) = &self.snapshots else {
            return Err(no_nested_snapshots(&self.location(name)));
        };
        let catalog = Arc::clone(
            Self::lock(all)
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(Self::of_snapshots())),
        );
        Ok(catalog)
    }
}

/// The contract every catalog keeps, checked on a fresh, empty one (panics with what broke).
pub fn check(catalog: &dyn Catalog) {
    assert_eq!(catalog.list().expect("list"), Vec::<String>::new());
    assert!(!catalog.exists("a"));

    // A staged store is no volume until published.
    let mut staged = catalog.stage("a", "creating").expect("stage");
    let store = staged.take_store().expect("the staged store");
    store.write_at(b"first", 0).expect("write");
    assert!(!catalog.exists("a"), "a staged store shows as a volume");
    assert_eq!(catalog.list().expect("list"), Vec::<String>::new());
    let replaced = catalog.publish(staged, Existing::Keep).expect("publish");
    assert!(replaced.is_none(), "a new volume replaced something");
    // The store goes on as the volume's (a file engine keeps its lock until it is dropped).
    drop(store);
    assert!(catalog.exists("a"));
    assert_eq!(catalog.list().expect("list"), ["a"]);
    let read = |name: &str| {
        let s = catalog.open(name, Access::ReadOnly).expect("open");
        let mut buf = vec![0u8; 5];
        s.read_at(&mut buf, 0).expect("read");
        buf
    };
    assert_eq!(read("a"), b"first");

    // Publishing a new volume never replaces one; the staged store stays until discarded.
    let mut again = catalog.stage("a", "creating").expect("stage");
    again
        .take_store()
        .expect("store")
        .write_at(b"other", 0)
        .expect("write");
    let loc = again.location.clone();
    let err = catalog
        .publish(again, Existing::Keep)
        .expect_err("the name is taken");
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(read("a"), b"first");
    let left = catalog.leftovers().expect("leftovers");
    assert!(
        left.iter().any(|s| s.location == loc && s.name == "a"),
        "{left:?}"
    );
    for s in left {
        catalog.open_staged(&s).expect("open a leftover");
        catalog.discard(s).expect("discard");
    }
    assert!(catalog.leftovers().expect("leftovers").is_empty());

    // Replacing swaps the whole volume, and hands back the old store, still usable.
    let mut rebuilt = catalog.stage("a", "rebuilding").expect("stage");
    let store = rebuilt.take_store().expect("store");
    store.write_at(b"newer", 0).expect("write");
    drop(store);
    let old = catalog
        .publish(rebuilt, Existing::Replace)
        .expect("replace")
        .expect("the replaced store");
    let mut buf = [0u8; 5];
    old.read_at(&mut buf, 0).expect("read the replaced store");
    assert_eq!(&buf, b"first");
    old.write_at(b"wiped", 0).expect("write the replaced store");
    drop(old);
    assert_eq!(read("a"), b"newer");
    assert_eq!(catalog.list().expect("list"), ["a"]);

    // Removal.
    catalog.remove("a").expect("remove");
    assert!(!catalog.exists("a"));
    assert!(catalog.open("a", Access::ReadOnly).is_err());
    assert!(catalog.remove("a").is_err());

    check_clones(catalog);
}

/// Snapshots and clones: a snapshot is a whole, sparse copy in the volume's catalog of
/// snapshots, and a volume can be rebuilt from it.
fn check_clones(catalog: &dyn Catalog) {
    const MIB: u64 = 1 << 20;
    let mut staged = catalog.stage("b", "creating").expect("stage");
    let store = staged.take_store().expect("store");
    store.set_len(8 * MIB).expect("size");
    store.write_at(b"head", 0).expect("write");
    store.write_at(b"tail", 6 * MIB + 5).expect("write");
    catalog.publish(staged, Existing::Keep).expect("publish");
    drop(store);
    let modified = catalog.modified("b").expect("when b changed");
    assert!(modified <= SystemTime::now());

    let snaps = catalog
        .snapshots("b")
        .expect("the catalog of b's snapshots");
    assert_eq!(snaps.list().expect("list"), Vec::<String>::new());
    let source = catalog.open("b", Access::ReadOnly).expect("open b");
    let snap = snaps.stage("s1", "taking").expect("stage a snapshot");
    snaps
        .clone_store(&*source, &snap, &copy::Unwatched)
        .expect("clone b");
    snaps.publish(snap, Existing::Keep).expect("publish s1");
    drop(source);
    assert_eq!(snaps.list().expect("list"), ["s1"]);
    assert_eq!(
        catalog.list().expect("list"),
        ["b"],
        "a snapshot shows as a volume"
    );
    assert!(snaps.modified("s1").is_ok());
    assert!(
        snaps.snapshots("s1").is_err(),
        "a snapshot has snapshots of its own"
    );
    let read = |c: &dyn Catalog, name: &str, at: u64| {
        let s = c.open(name, Access::ReadOnly).expect("open");
        let mut buf = vec![0u8; 4];
        s.read_at(&mut buf, at).expect("read");
        (
            buf,
            s.len().expect("len"),
            s.extents(0, 8 * MIB).expect("map"),
        )
    };
    let (tail, len, map) = read(&*snaps, "s1", 6 * MIB + 5);
    assert_eq!((tail.as_slice(), len), (&b"tail"[..], 8 * MIB));
    assert!(
        map.iter().any(|e| !e.allocated),
        "the snapshot of a sparse volume has no holes: {map:?}"
    );

    // The volume changes; a rebuild from the snapshot brings back what it was.
    catalog
        .open("b", Access::ReadWrite)
        .expect("open")
        .write_at(b"HEAD", 0)
        .expect("write");
    let source = snaps.open("s1", Access::ReadOnly).expect("open s1");
    let rebuilt = catalog.stage("b", "rebuilding").expect("stage");
    catalog
        .clone_store(&*source, &rebuilt, &copy::Unwatched)
        .expect("clone s1");
    drop(source);
    catalog
        .publish(rebuilt, Existing::Replace)
        .expect("replace b");
    assert_eq!(read(catalog, "b", 0).0, b"head");

    // A clone that is stopped leaves a staged store to discard, and no volume.
    let source = catalog.open("b", Access::ReadOnly).expect("open b");
    let stopped = snaps.stage("s2", "taking").expect("stage");
    struct Stop;
    impl Watch for Stop {
        fn phase(&self, _: &'static str, _: u64) {}
        fn add(&self, _: u64) {}
        fn check(&self) -> io::Result<()> {
            Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"))
        }
    }
    let err = snaps
        .clone_store(&*source, &stopped, &Stop)
        .expect_err("a stopped clone");
    assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    snaps.discard(stopped).expect("discard");
    drop(source);
    assert_eq!(snaps.list().expect("list"), ["s1"]);

    snaps.remove("s1").expect("remove s1");
    assert_eq!(snaps.list().expect("list"), Vec::<String>::new());
    catalog.remove("b").expect("remove b");
}

/// `store` with `io` when it is opened for I/O (an inspection reads a header: buffered).
pub(crate) fn with_io(store: FileStore, access: Access, io: FileIo) -> io::Result<FileStore> {
    match access {
        Access::Inspect => Ok(store),
        Access::ReadWrite | Access::ReadOnly => store.with_io(io),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_catalog_keeps_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        check(&DirCatalog::new(
            &dir.path().join("volumes"),
            &dir.path().join("snapshots"),
        ));
        // A volume's snapshot directory goes with its last snapshot.
        assert!(!dir.path().join("snapshots").join("b").exists());
    }

    #[test]
    fn the_memory_catalog_keeps_the_contract() {
        check(&MemCatalog::new());
    }

    #[test]
    fn directory_leftovers_include_interrupted_creates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cat = DirCatalog::new(dir.path(), &dir.path().join("snapshots"));
        for f in [
            ".v.luks.creating-123",
            ".w.rebuilding.luks",
            "x.luks",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(f), b"x").expect("write");
        }
        let left: Vec<String> = cat
            .leftovers()
            .expect("leftovers")
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(left, ["v", "w"]);
        assert_eq!(cat.list().expect("list"), ["x"]);
    }

    #[test]
    fn a_directory_catalog_clones_any_engine_s_store() {
        // The copy works between engines: a memory store into a file.
        let dir = tempfile::tempdir().expect("tempdir");
        let cat = DirCatalog::new(&dir.path().join("v"), &dir.path().join("s"));
        let source = MemStore::new("test");
        source.set_len(3 << 20).expect("size");
        source.write_at(b"memory", (2 << 20) + 1).expect("write");
        let staged = cat.stage("m", "importing").expect("stage");
        let method = cat
            .clone_store(&source, &staged, &copy::Unwatched)
            .expect("clone");
        assert_eq!(method, CloneMethod::Copy);
        cat.publish(staged, Existing::Keep).expect("publish");
        let s = cat.open("m", Access::ReadOnly).expect("open");
        let mut buf = [0u8; 6];
        s.read_at(&mut buf, (2 << 20) + 1).expect("read");
        assert_eq!((&buf, s.len().expect("len")), (b"memory", 3 << 20));
    }
}
