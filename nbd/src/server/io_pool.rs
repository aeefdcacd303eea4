//! A fixed set of threads that make the blocking device calls, fed by one queue shared by
//! every connection. The async reactor never blocks on a device; the number of device calls
//! running at once is bounded by the number of threads.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::transmission::Job;

struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting on the condition variable.
    idle: usize,
    /// A thread was signalled and has not yet picked up work. Only one wake-up is in flight
    /// at a time: a burst of requests costs one system call, not one per request, and each
    /// woken thread wakes the next if work remains (threads join as the queue demands).
    waking: bool,
    closed: bool,
}

impl Queue {
    /// Whether a sleeping thread should be woken now (and records that one is).
    fn should_wake(&mut self) -> bool {
        if !self.jobs.is_empty() && self.idle > 0 && !self.waking {
            self.waking = true;
            true
        } else {
            false
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is consistent after any panic (push/pop and counters only).
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The I/O threads.
pub(crate) struct IoPool {
    shared: Arc<Shared>,
    /// False if no thread could be started.
    threaded: bool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    /// Starts `threads` threads (at least one). Threads that cannot be started are logged;
    /// with none at all, jobs run on tokio's blocking pool instead.
    pub(crate) fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                idle: 0,
                waking: false,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let s = Arc::clone(&shared);
            match std::thread::Builder::new()
                .name(format!("nbd-io-{i}"))
                .spawn(move || worker(&s))
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    tracing::error!("cannot start NBD I/O thread {i}: {e}");
                    break;
                }
            }
        }
        Self {
            shared,
            threaded: !handles.is_empty(),
            threads: Mutex::new(handles),
        }
    }

    /// Queues a job; one idle thread is woken if there is one.
    pub(crate) fn submit(&self, job: Job) {
        if !self.threaded {
            tokio::task::spawn_blocking(move || job.run());
            return;
        }
        let mut q = self.shared.lock();
        q.jobs.push_back(job);
        let wake = q.should_wake();
        drop(q);
        if wake {
            self.shared.ready.notify_one();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        let mut handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        shutdown(&self.shared, &mut handles);
    }
}

fn shutdown(shared: &Shared, handles: &mut Vec<JoinHandle<()>>) {
    shared.lock().closed = true;
    shared.ready.notify_all();
    let me = std::thread::current().id();
    for h in handles.drain(..) {
        // The last reference to the server may be dropped by an I/O thread itself
        // (a job holds the connection, which holds the server): never join oneself.
        if h.thread().id() != me {
            let _ = h.join();
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let (job, wake) = {
            let mut q = shared.lock();
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    let wake = q.should_wake();
                    break (job, wake);
                }
                if q.closed {
                    return;
                }
                q.idle += 1;
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                q.idle -= 1;
                // This thread is the one signalled (or woke spuriously, which is harmless).
                q.waking = false;
            }
        };
        if wake {
            shared.ready.notify_one();
        }
        job.run();
    }
}
