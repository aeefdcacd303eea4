//! Long operations in flight: at most one per volume. A second operation on a busy volume is
//! refused with who holds it; a running one can be cancelled by volume name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use control_api::{ErrorCode, OperationStatus};
use volume::lifecycle::{Cancel, Progress};

use statedir::stamp::rfc3339;

use crate::error::Error;

/// One running operation.
pub struct Running {
    /// Operation id (for messages).
    pub id: u64,
    /// What it is (`rebuild`, `snapshot`, ...).
    pub operation: &'static str,
    /// The volume.
    pub volume: String,
    /// Who started it.
    pub caller_uid: u32,
    /// When.
    pub since: SystemTime,
    /// How far it is.
    pub progress: Arc<Progress>,
    /// Its cancellation flag.
    pub cancel: Cancel,
}

impl Running {
    /// As the API shows it.
    pub fn status(&self) -> OperationStatus {
        let (phase, done, total) = self.progress.get();
        OperationStatus {
            id: self.id,
            operation: self.operation.into(),
            volume: self.volume.clone(),
            caller_uid: self.caller_uid,
            since: rfc3339(self.since),
            phase: phase.into(),
            done,
            total,
        }
    }
}

/// The operations running now, by volume.
#[derive(Default)]
pub struct Operations {
    by_volume: Mutex<HashMap<String, Arc<Running>>>,
    next_id: AtomicU64,
}

/// Holds a volume for one operation; dropping it frees the volume.
pub struct OpGuard {
    ops: Arc<Operations>,
    running: Arc<Running>,
}

impl OpGuard {
    /// The operation.
    pub fn running(&self) -> &Arc<Running> {
        &self.running
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut map = self.ops.by_volume.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.running.volume)
            .is_some_and(|r| r.id == self.running.id)
        {
            map.remove(&self.running.volume);
        }
    }
}

fn busy(r: &Running) -> Error {
    crate::error::api(
        ErrorCode::Conflict,
        format!(
            "volume {} is busy: {} (operation {}) started by uid {} at {}; wait for it to \
             finish, or stop it with 'cryptnbdctl cancel {}'",
            r.volume,
            r.operation,
            r.id,
            r.caller_uid,
            rfc3339(r.since),
            r.volume
        ),
    )
}

impl Operations {
    /// Takes `volume` for `operation`, or refuses naming the holder.
    pub fn begin(
        self: &Arc<Self>,
        volume: &str,
        operation: &'static str,
        caller_uid: u32,
        progress: Arc<Progress>,
        cancel: Cancel,
    ) -> Result<OpGuard, Error> {
        let mut map = self.by_volume.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get(volume) {
            return Err(busy(r));
        }
        let running = Arc::new(Running {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            operation,
            volume: volume.into(),
            caller_uid,
            since: SystemTime::now(),
            progress,
            cancel,
        });
        map.insert(volume.into(), Arc::clone(&running));
        Ok(OpGuard {
            ops: Arc::clone(self),
            running,
        })
    }

    /// Refuses when an operation holds `volume`.
    pub fn check_idle(&self, volume: &str) -> Result<(), Error> {
        match self
            .by_volume
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
        {
            Some(r) => Err(busy(r)),
            None => Ok(()),
        }
    }

    /// Asks the operation on `volume` to stop.
    pub fn cancel(&self, volume: &str) -> Option<OperationStatus> {
        let map = self.by_volume.lock().unwrap_or_else(|p| p.into_inner());
        let r = map.get(volume)?;
        r.cancel.cancel();
        Some(r.status())
    }

    /// Everything running, by volume name.
    pub fn list(&self) -> Vec<OperationStatus> {
        let map = self.by_volume.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.values().map(|r| r.status()).collect();
        v.sort_by(|a, b| a.volume.cmp(&b.volume));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_per_volume_and_cancel() {
        let ops = Arc::new(Operations::default());
        let cancel = Cancel::default();
        let g = ops
            .begin("v", "rebuild", 7, Progress::new(), cancel.clone())
            .expect("first");
        let e = ops
            .begin("v", "snapshot", 8, Progress::new(), Cancel::default())
            .err()
            .expect("second refused");
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert!(
            e.message().contains("rebuild") && e.message().contains("uid 7"),
            "{e}"
        );
        assert!(ops.check_idle("other").is_ok());
        assert!(ops.check_idle("v").is_err());
        assert!(!cancel.is_cancelled());
        assert_eq!(ops.cancel("v").map(|s| s.operation), Some("rebuild".into()));
        assert!(cancel.is_cancelled());
        drop(g);
        assert!(ops.check_idle("v").is_ok());
        assert!(ops.cancel("v").is_none());
    }
}
