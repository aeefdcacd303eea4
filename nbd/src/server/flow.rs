//! Flow control of a connection: the bytes it may have in flight (a [`Permit`] against the
//! connection's and the server's [`Budget`]) and the signal that tells it to stop. Shared by
//! the reader and jobs (transmission.rs) and the reply writer (reply.rs).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Bytes in flight, held against both the connection's and the server's budget.
pub(crate) struct Permit {
    conn: OwnedSemaphorePermit,
    global: OwnedSemaphorePermit,
}

impl Permit {
    /// Gives back `n` bytes early (a WRITE's buffer once the device has it).
    pub(super) fn release(&mut self, n: usize) {
        drop(self.conn.split(n));
        drop(self.global.split(n));
    }
}

pub(super) struct Budget {
    pub(super) conn: Arc<Semaphore>,
    pub(super) global: Arc<Semaphore>,
}

impl Budget {
    pub(super) fn try_acquire(&self, n: u32) -> Option<Permit> {
        let conn = Arc::clone(&self.conn).try_acquire_many_owned(n).ok()?;
        let global = Arc::clone(&self.global).try_acquire_many_owned(n).ok()?;
        Some(Permit { conn, global })
    }

    /// Waits for the connection's share first, so one connection waits on the global budget
    /// with at most one request.
    pub(super) async fn acquire(&self, n: u32) -> Option<Permit> {
        let conn = Arc::clone(&self.conn).acquire_many_owned(n).await.ok()?;
        let global = Arc::clone(&self.global).acquire_many_owned(n).await.ok()?;
        Some(Permit { conn, global })
    }
}

/// Resolves once the connection is told to stop (never if it cannot be).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}
