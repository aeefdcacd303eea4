//! [`Stores`]: the catalogs of one daemon side by side (its volume directory, an RBD pool),
//! seen as one catalog.
//!
//! - A volume name is unique across the stores: a lookup finds the one store that holds the
//!   name, and a new volume goes to the store asked for, or the default one.
//! - A staged store goes back to the catalog that made it: [`Stores`] remembers which one
//!   staged (or found as a leftover) each staged location, so publishing, discarding and
//!   cloning into it reach the right engine.
//! - Whole-volume changes of one volume (rebuild, reencrypt, restore) stage in the store that
//!   holds it, so they never move a volume between stores.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::BackingStore;
use crate::catalog::{Catalog, Staged};
use crate::copy::{CloneMethod, Watch};
use crate::durable::Existing;
use crate::file::{Access, OpenError};

/// Named catalogs, one of them the default for new volumes.
pub struct Stores {
    members: Vec<(String, Arc<dyn Catalog>)>,
    default: usize,
    /// Which member made each staged location.
    staged: Mutex<HashMap<PathBuf, usize>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("members", &self.names())
            .field("default", &self.default_store())
            .finish()
    }
}

impl Stores {
    /// The `members` (name and catalog, in the order lookups try them), with `default` the
    /// one new volumes go to. `Err` names a default that is not a member.
    pub fn new(members: Vec<(String, Arc<dyn Catalog>)>, default: &str) -> Result<Self, String> {
        let default = members
            .iter()
            .position(|(n, _)| n == default)
            .ok_or_else(|| {
                format!(
                    "no store {default:?} is configured (stores: {})",
                    members
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        Ok(Self {
            members,
            default,
            staged: Mutex::default(),
        })
    }

    /// The names of the stores, in lookup order.
    pub fn names(&self) -> Vec<&str> {
        self.members.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The store new volumes go to when none is asked for.
    pub fn default_store(&self) -> &str {
        &self.members[self.default].0
    }

    /// The catalog of store `name`, if configured.
    pub fn member(&self, name: &str) -> Option<&Arc<dyn Catalog>> {
        self.index(name).map(|i| &self.members[i].1)
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|(n, _)| n == name)
    }

    /// The store that holds volume `volume`, if any.
    pub fn store_of(&self, volume: &str) -> Option<&str> {
        self.holder(volume).map(|i| self.members[i].0.as_str())
    }

    fn holder(&self, volume: &str) -> Option<usize> {
        self.members.iter().position(|(_, c)| c.exists(volume))
    }

    /// The member that holds `volume`, else the default.
    fn home(&self, volume: &str) -> usize {
        self.holder(volume).unwrap_or(self.default)
    }

    /// Where volume `name` would be in store `store` (None: the default).
    pub fn location_in(&self, store: Option<&str>, name: &str) -> io::Result<PathBuf> {
        Ok(self.members[self.pick(store)?].1.location(name))
    }

    /// A new store staged in store `store` (None: where `name` lives, else the default).
    pub fn stage_in(&self, store: Option<&str>, name: &str, operation: &str) -> io::Result<Staged> {
        let i = match store {
            Some(_) => self.pick(store)?,
            None => self.home(name),
        };
        let staged = self.members[i].1.stage(name, operation)?;
        self.remember(&staged, i);
        Ok(staged)
    }

    /// Publishes `staged`, made by [`stage_in`](Self::stage_in) with a store named, as a new
    /// volume of that store although the name is a volume of another one: the durable step
    /// of a move, after which the caller removes the volume from the store it leaves. Until
    /// then lookups find the name in the store that comes first.
    pub fn publish_moved(&self, staged: Staged) -> io::Result<()> {
        let maker = Arc::clone(self.maker(&staged)?);
        let handle = staged.handle();
        maker.publish(staged, Existing::Keep)?;
        self.forget(&handle);
        Ok(())
    }

    /// Every volume and the store it is found in (the first that holds it, as lookups do):
    /// one listing per store, for callers that would otherwise ask [`store_of`](Self::store_of)
    /// once per volume.
    pub fn homes(&self) -> io::Result<std::collections::BTreeMap<String, &str>> {
        let mut homes = std::collections::BTreeMap::new();
        for (store, c) in &self.members {
            for name in c.list()? {
                homes.entry(name).or_insert(store.as_str());
            }
        }
        Ok(homes)
    }

    /// Which stores hold volume `volume` (two only while a move is under way or was cut
    /// short by a crash).
    pub fn stores_of(&self, volume: &str) -> Vec<&str> {
        self.members
            .iter()
            .filter(|(_, c)| c.exists(volume))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn pick(&self, store: Option<&str>) -> io::Result<usize> {
        match store {
            None => Ok(self.default),
            Some(s) => self.index(s).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no store {s:?} is configured (stores: {})",
                        self.names().join(", ")
                    ),
                )
            }),
        }
    }

    fn remember(&self, staged: &Staged, member: usize) {
        self.staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(staged.location.clone(), member);
    }

    /// The member that made `staged`.
    fn maker(&self, staged: &Staged) -> io::Result<&Arc<dyn Catalog>> {
        let i = self
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&staged.location)
            .copied()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: not staged by this daemon", staged.location.display()),
                )
            })?;
        Ok(&self.members[i].1)
    }

    fn forget(&self, staged: &Staged) {
        self.staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&staged.location);
    }
}

impl Catalog for Stores {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut all = Vec::new();
        for (_, c) in &self.members {
            all.extend(c.list()?);
        }
        all.sort();
        all.dedup();
        Ok(all)
    }

    fn location(&self, name: &str) -> PathBuf {
        self.members[self.home(name)].1.location(name)
    }

    fn exists(&self, name: &str) -> bool {
        self.holder(name).is_some()
    }

    fn open(&self, name: &str, access: Access) -> Result<Box<dyn BackingStore>, OpenError> {
        self.members[self.home(name)].1.open(name, access)
    }

    fn take_over(
        &self,
        name: &str,
        force: bool,
        watch: &dyn Watch,
    ) -> Result<Box<dyn BackingStore>, OpenError> {
        self.members[self.home(name)]
            .1
            .take_over(name, force, watch)
    }

    fn stage(&self, name: &str, operation: &str) -> io::Result<Staged> {
        self.stage_in(None, name, operation)
    }

    fn label(&self, name: &str, labels: &[(&str, String)]) -> io::Result<()> {
        self.members[self.home(name)].1.label(name, labels)
    }

    fn publish(
        &self,
        staged: Staged,
        existing: Existing,
    ) -> io::Result<Option<Box<dyn BackingStore>>> {
        let maker = Arc::clone(self.maker(&staged)?);
        if existing == Existing::Keep
            && let Some(other) = self.store_of(&staged.name)
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("volume {} exists in store {other}", staged.name),
            ));
        }
        let handle = staged.handle();
        let published = maker.publish(staged, existing)?;
        self.forget(&handle);
        Ok(published)
    }

    fn open_staged(&self, staged: &Staged) -> io::Result<Box<dyn BackingStore>> {
        self.maker(staged)?.open_staged(staged)
    }

    /// A location this daemon never staged, or published already, has nothing to discard.
    fn discard(&self, staged: Staged) -> io::Result<()> {
        let Ok(maker) = self.maker(&staged).map(Arc::clone) else {
            return Ok(());
        };
        let handle = staged.handle();
        maker.discard(staged)?;
        self.forget(&handle);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.members[self.home(name)].1.remove(name)
    }

    fn check_remove(&self, name: &str) -> io::Result<()> {
        self.members[self.home(name)].1.check_remove(name)
    }

    fn leftovers(&self) -> io::Result<Vec<Staged>> {
        let mut all = Vec::new();
        for (i, (_, c)) in self.members.iter().enumerate() {
            for s in c.leftovers()? {
                self.remember(&s, i);
                all.push(s);
            }
        }
        Ok(all)
    }

    fn modified(&self, name: &str) -> io::Result<SystemTime> {
        self.members[self.home(name)].1.modified(name)
    }

    fn snapshots(&self, name: &str) -> io::Result<Arc<dyn Catalog>> {
        self.members[self.home(name)].1.snapshots(name)
    }

    fn clone_store(
        &self,
        source: &dyn BackingStore,
        staged: &Staged,
        watch: &dyn Watch,
    ) -> io::Result<CloneMethod> {
        self.maker(staged)?.clone_store(source, staged, watch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::MemCatalog;

    fn two() -> (Stores, Arc<MemCatalog>, Arc<MemCatalog>) {
        let (a, b) = (Arc::new(MemCatalog::new()), Arc::new(MemCatalog::new()));
        let stores = Stores::new(
            vec![
                ("file".into(), Arc::clone(&a) as Arc<dyn Catalog>),
                ("rbd".into(), Arc::clone(&b) as Arc<dyn Catalog>),
            ],
            "file",
        )
        .expect("stores");
        (stores, a, b)
    }

    #[test]
    fn stores_keep_the_catalog_contract() {
        crate::catalog::check(&two().0);
    }

    #[test]
    fn a_volume_lives_in_the_store_asked_for_and_its_name_is_unique_across_stores() {
        let (stores, file, rbd) = two();
        let staged = stores
            .stage_in(Some("rbd"), "v", "creating")
            .expect("stage");
        stores.publish(staged, Existing::Keep).expect("publish");
        assert!(rbd.exists("v") && !file.exists("v"));
        assert_eq!(stores.store_of("v"), Some("rbd"));
        assert_eq!(stores.list().expect("list"), ["v"]);

        // The same name in the other store is refused.
        let again = stores
            .stage_in(Some("file"), "v", "creating")
            .expect("stage");
        let e = stores
            .publish(again.handle(), Existing::Keep)
            .expect_err("a second v");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains("store rbd"), "{e}");
        stores.discard(again).expect("discard");

        // A replace stays in the volume's store.
        let rebuilt = stores.stage("v", "rebuilding").expect("stage");
        stores.publish(rebuilt, Existing::Replace).expect("replace");
        assert!(rbd.exists("v") && !file.exists("v"));

        let e = Stores::new(vec![], "rbd").expect_err("no such default");
        assert!(e.contains("no store \"rbd\""), "{e}");
        let e = stores
            .stage_in(Some("nfs"), "w", "creating")
            .expect_err("no such store");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
