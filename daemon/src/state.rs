//! What the daemon holds while it runs, apart from the services it uses (services.rs):
//! attached volumes, long operations in flight, volumes whose forced detach is not finished,
//! keys handed to dm-crypt and not yet mapped, and the per-volume locks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::locks::NamedLocks;
use crate::ops::{OpGuard, Operations};
use crate::registry::Registry;

/// The daemon's state.
pub struct State {
    /// Attached volumes.
    pub registry: Arc<Registry>,
    /// Long operations in flight, one per volume.
    pub ops: Arc<Operations>,
    /// Per-volume exclusion of the short lifecycle steps (create, attach, detach, delete):
    /// never one lock for all volumes, so a slow KMS call holds up only its own volume.
    pub locks: NamedLocks,
    /// Serializes writes of the saved attachments (each writes the registry as it is then).
    pub saving: Mutex<()>,
    /// Volumes held while cryptsetup opens them with dm-crypt.
    pub dm_crypt: DmCryptState,
    /// Volumes detached with `--force` whose requests are still stuck in the backing store:
    /// when the detach started. Their key is wiped when the requests return.
    pub detaching: Arc<Mutex<BTreeMap<String, SystemTime>>>,
}

/// A volume whose key was handed out, held until its mapping appears.
pub struct Pending {
    /// The operation's id (a later hold of the same volume has another).
    pub id: u64,
    /// The device-mapper name the client said it would use.
    pub name: String,
    /// Holds the volume in [`crate::ops::Operations`].
    pub guard: OpGuard,
}

/// The volumes held by `open-dm-crypt`, by volume name.
#[derive(Default)]
pub struct DmCryptState {
    /// Holds by volume name.
    pub pending: Arc<Mutex<HashMap<String, Pending>>>,
}

impl DmCryptState {
    /// The volume held for an open as `name`, if any.
    pub fn holder_of(&self, name: &str) -> Option<String> {
        let map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .find(|(_, p)| p.name == name)
            .map(|(v, _)| v.clone())
    }

    /// Ends the hold of `volume` by an open as `name`, if there is one; returns whether there
    /// was.
    pub fn release(&self, volume: &str, name: &str) -> bool {
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(volume).is_some_and(|p| p.name == name) {
            map.remove(volume);
            true
        } else {
            false
        }
    }
}
