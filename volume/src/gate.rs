//! The write gate of a volume: every write holds a ticket while it is in flight, and a pause
//! (a snapshot being taken) waits for the tickets out and holds new ones back. Unlike a
//! read-write lock, a ticket is owned: an asynchronous write carries it until its engine
//! completes, on whatever thread that is.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// Writes in flight.
    writers: usize,
    /// A pause holds new writes back.
    paused: bool,
}

/// Writes in flight, and whether they are paused.
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters only: consistent after any panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket for one write; waits while writes are paused.
    pub(crate) fn enter(self: &Arc<Self>) -> Ticket {
        let mut st = self.lock();
        while st.paused {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.writers += 1;
        Ticket(Arc::clone(self))
    }

    /// Holds new writes back, then waits until none is in flight; writes resume when the
    /// guard is dropped. One pause at a time: a second waits for the first.
    pub(crate) fn pause(&self) -> Paused<'_> {
        let mut st = self.lock();
        while st.paused {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.paused = true;
        while st.writers > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Paused(self)
    }
}

/// One write in flight ([`Gate::enter`]).
pub(crate) struct Ticket(Arc<Gate>);

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.writers -= 1;
        if st.writers == 0 && st.paused {
            self.0.changed.notify_all();
        }
    }
}

/// Writes held back ([`Gate::pause`]).
pub struct Paused<'a>(&'a Gate);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.lock().paused = false;
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
        let ticket = gate.enter();
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
