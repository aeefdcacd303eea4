//! Per-name exclusion for the short lifecycle steps (create, attach, detach, delete, the start
//! and end of a long operation, a dm-crypt open).
//!
//! Two requests on the same volume run one after the other; requests on different volumes
//! run side by side, so one slow KMS call, kernel bind or file copy holds up only its own
//! volume. Names are namespaced by the caller (`volume:NAME`, `dm-crypt:NAME`); several are
//! taken in sorted order, so two requests that need overlapping sets cannot deadlock. An
//! entry lives only while someone holds or waits for it.
//!
//! A long operation (rebuild, reencrypt, ...) does not hold its volume's lock while it runs:
//! it registers itself in `ops`, and the others refuse the volume as busy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

type Table = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// The table of named locks.
#[derive(Default)]
pub struct NamedLocks {
    table: Table,
}

/// Holds one or more names until dropped.
pub struct NamedGuard {
    table: Table,
    held: Vec<(String, OwnedMutexGuard<()>)>,
}

/// The lock name of volume `name`.
pub fn volume(name: &str) -> String {
    format!("volume:{name}")
}

/// The lock name of the device-mapper name `name`.
pub fn dm_name(name: &str) -> String {
    format!("dm-crypt:{name}")
}

impl NamedLocks {
    /// Waits until no one else holds any of `names`, then holds them all.
    pub async fn lock(&self, names: &[String]) -> NamedGuard {
        let mut names: Vec<String> = names.to_vec();
        names.sort();
        names.dedup();
        let mut guard = NamedGuard {
            table: Arc::clone(&self.table),
            held: Vec::with_capacity(names.len()),
        };
        for name in names {
            let entry = {
                let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
                Arc::clone(table.entry(name.clone()).or_default())
            };
            // If this future is dropped while waiting, `entry` (our only reference besides the
            // table's) goes with it; the next guard to drop removes the entry if idle.
            let held = entry.lock_owned().await;
            guard.held.push((name, held));
        }
        guard
    }

    /// How many names are held or waited for (for tests).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no name is held or waited for.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for NamedGuard {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        for (name, held) in self.held.drain(..) {
            drop(held);
            // Only the table's reference left: no one holds or waits for it.
            if table.get(&name).is_some_and(|e| Arc::strong_count(e) == 1) {
                table.remove(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn same_name_waits_other_names_do_not() {
        let locks = Arc::new(NamedLocks::default());
        let a = locks.lock(&[volume("a")]).await;
        // Another volume is free at once.
        let b = tokio::time::timeout(Duration::from_millis(100), locks.lock(&[volume("b")]))
            .await
            .expect("volume b is not held up by volume a");
        drop(b);
        // The same volume waits until the first guard goes.
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move {
                let _g = locks.lock(&[volume("a"), dm_name("x")]).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "volume a was taken twice");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter got volume a after it was released")
            .expect("waiter task");
        assert!(locks.is_empty(), "idle entries are removed");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_waiter_leaves_no_entry_behind() {
        let locks = NamedLocks::default();
        let a = locks.lock(&[volume("a")]).await;
        let waited =
            tokio::time::timeout(Duration::from_millis(20), locks.lock(&[volume("a")])).await;
        assert!(waited.is_err());
        drop(a);
        assert!(locks.is_empty());
    }
}
