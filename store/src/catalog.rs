//! Catalogs: where volumes live, by name, and how a volume changes as a whole.
//!
//! A [`Catalog`] maps names to backing stores and makes the whole-volume changes atomic: a
//! new or rebuilt volume is built in a *staged* store under a hidden name and appears under
//! its own name only when [`publish`](Catalog::publish)ed, so a crash leaves the old volume
//! or the new one, never a half-built one under the real name. Staged stores left by a crash
//! are found again with [`leftovers`](Catalog::leftovers).
//!
//! Engines: [`DirCatalog`] (a directory of `NAME.luks` files: hidden temporary files, fsync,
//! link or rename, directory fsync, flock through the file engine) and [`MemCatalog`]
//! (memory, for tests). Both pass [`check`].
//!
//! A catalog knows nothing of the volume format: wiping a header before a discard, say, is
//! the caller's (it opens the staged store first).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::BackingStore;
use crate::durable::{Existing, sync_dir};
use crate::file::{Access, FileStore, OpenError};
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
    /// The staged store, to format or fill (taken once; a volume then owns it).
    pub fn take_store(&mut self) -> Option<Box<dyn BackingStore>> {
        self.store.take()
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
    /// elsewhere is [`OpenError::Locked`]).
    fn open(&self, name: &str, access: Access) -> Result<Box<dyn BackingStore>, OpenError>;

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

    /// Removes volume `name` (the caller wipes what must not linger first).
    fn remove(&self, name: &str) -> io::Result<()>;

    /// Staged stores that a crash left behind, to wipe and discard.
    fn leftovers(&self) -> io::Result<Vec<Staged>>;
}

/// `NAME.luks` files in one directory (created 0700 on the first stage).
#[derive(Debug, Clone)]
pub struct DirCatalog {
    dir: PathBuf,
}

const SUFFIX: &str = ".luks";

impl DirCatalog {
    /// The catalog of the files in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
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
        Ok(Box::new(FileStore::open(&self.location(name), access)?))
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
            _ => Ok(()),
        }
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.location(name))?;
        sync_dir(&self.dir)
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
}

/// Volumes in memory, for tests: names to [`MemStore`]s, published by moving the staged
/// store under its name. Locks are not modelled: every open succeeds.
#[derive(Debug, Default)]
pub struct MemCatalog {
    volumes: Mutex<BTreeMap<String, Arc<MemStore>>>,
    staged: Mutex<BTreeMap<PathBuf, Arc<MemStore>>>,
}

impl MemCatalog {
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
            Some(s) => Ok(Box::new(Arc::clone(s))),
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
            .insert(staged.name, store)
            .map(|old| Box::new(old) as Box<dyn BackingStore>))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_catalog_keeps_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        check(&DirCatalog::new(&dir.path().join("volumes")));
    }

    #[test]
    fn the_memory_catalog_keeps_the_contract() {
        check(&MemCatalog::default());
    }

    #[test]
    fn directory_leftovers_include_interrupted_creates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cat = DirCatalog::new(dir.path());
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
}
