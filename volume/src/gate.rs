//! The write gate of a volume: every write holds a ticket while it is in flight, and a pause
//! (a snapshot being taken) waits for the tickets out and holds new ones back. Unlike a
//! read-write lock, a ticket may be owned: an asynchronous write carries it until its engine
//! completes, on whatever thread that is.
//!
//! Entering and leaving are one atomic add each while no pause is asked for (the I/O path);
//! the mutex and condition variable are only for pauses and the writes that meet one.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Writes in flight, and whether they are paused.
#[derive(Default)]
pub(crate) struct Gate {
    /// Writes in flight.
    writers: AtomicUsize,
    /// A pause holds new writes back.
    paused: AtomicBool,
    /// Held to change `paused` and to wait on `changed`.
    lock: Mutex<()>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, ()> {
        // Guards no data: consistent after any panic.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more writer, waiting while writes are paused.
    fn admit(&self) {
        loop {
            self.writers.fetch_add(1, Ordering::SeqCst);
            if !self.paused.load(Ordering::SeqCst) {
                return;
            }
            // A pause is on: step back out, then wait for it to end.
            self.leave();
            let mut g = self.lock();
            while self.paused.load(Ordering::SeqCst) {
                g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    fn leave(&self) {
        if self.writers.fetch_sub(1, Ordering::SeqCst) == 1 && self.paused.load(Ordering::SeqCst) {
            // The pause waits under the lock: taking it first means it cannot miss this.
            let _g = self.lock();
            self.changed.notify_all();
        }
    }

    /// A ticket for one write, borrowing the gate (a write that completes on this thread).
    pub(crate) fn enter(&self) -> Ticket<&Gate> {
        self.admit();
        Ticket(self)
    }

    /// A ticket for one write that it carries until it completes, on any thread.
    pub(crate) fn enter_owned(self: &Arc<Self>) -> Ticket<Arc<Gate>> {
        self.admit();
        Ticket(Arc::clone(self))
    }

    /// Holds new writes back, then waits until none is in flight; writes resume when the
    /// guard is dropped. One pause at a time: a second waits for the first.
    pub(crate) fn pause(&self) -> Paused<'_> {
        let mut g = self.lock();
        while self.paused.load(Ordering::SeqCst) {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        self.paused.store(true, Ordering::SeqCst);
        while self.writers.load(Ordering::SeqCst) > 0 {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        Paused(self)
    }
}

/// One write in flight ([`Gate::enter`], [`Gate::enter_owned`]).
pub(crate) struct Ticket<G: Deref<Target = Gate>>(G);

impl<G: Deref<Target = Gate>> Drop for Ticket<G> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Writes held back ([`Gate::pause`]).
pub struct Paused<'a>(&'a Gate);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _g = self.0.lock();
        self.0.paused.store(false, Ordering::SeqCst);
        self.0.changed.notify_all();
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_pause_waits_for_tickets_and_holds_new_ones_back() {
        let gate = Arc::new(Gate::default());
        let ticket = gate.enter_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let g = Arc::clone(&gate);
        let pauser = std::thread::spawn(move || {
            let p = g.pause();
            tx.send("paused").expect("send");
            std::thread::sleep(Duration::from_millis(100));
            drop(p);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "paused with a write in flight"
        );
        // The ticket may go on another thread, as an engine's completion does.
        std::thread::spawn(move || drop(ticket))
            .join()
            .expect("join");
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok("paused"));
        // Held back while paused, let in after.
        let start = std::time::Instant::now();
        let _t = gate.enter();
        assert!(
            start.elapsed() >= Duration::from_millis(50),
            "a write got past the pause"
        );
        pauser.join().expect("join");
    }
}
