//! A fixed set of threads that make the blocking device calls, fed by one queue shared by
//! every connection. The async reactor never blocks on a device; the number of device calls
//! running at once is bounded by the number of threads.
//!
//! **One slow device does not stall the others.** Jobs carry their device ([`Task::device`]),
//! and no device may hold more than [`device_cap`] of the threads at once: a thread skips
//! queued jobs of a device at its cap and takes the next job of another one. A device whose
//! calls block for long (a throttled disk, a hung store) keeps at least one thread free for
//! every other device, however deep its clients' queues (docs/daemon.md, "I/O threads").

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Work for an I/O thread.
pub(crate) trait Task: Send + 'static {
    /// Which device the work is for (an address that is the same for every job of it).
    fn device(&self) -> usize;
    /// Does the work.
    fn run(self);
}

/// The most threads one device may hold: all but a quarter of them (at least one is kept
/// for the other devices whenever there are two threads or more).
pub(crate) fn device_cap(threads: usize) -> usize {
    if threads < 2 {
        1
    } else {
        threads - (threads / 4).max(1)
    }
}

struct Queue<T> {
    jobs: VecDeque<T>,
    /// Devices with calls running, and how many each: at most one entry per thread, so a
    /// short list scanned in place (allocated once, at the pool's start).
    running: Vec<(usize, usize)>,
    cap: usize,
    /// Threads waiting on the condition variable.
    idle: usize,
    /// A thread was signalled and has not yet picked up work. Only one wake-up is in flight
    /// at a time: a burst of requests costs one system call, not one per request, and each
    /// woken thread wakes the next if work remains (threads join as the queue demands).
    waking: bool,
    closed: bool,
}

impl<T: Task> Queue<T> {
    /// Whether a sleeping thread should be woken now (and records that one is): only for a
    /// job it could take. Waking a thread for a job of a device at its cap would cost a
    /// wake-up and a sleep per request while that device is busy.
    fn should_wake(&mut self) -> bool {
        if self.idle > 0 && !self.waking && self.first_takeable().is_some() {
            self.waking = true;
            true
        } else {
            false
        }
    }

    /// Where the first queued job whose device is under its cap is (the scan stops there).
    fn first_takeable(&self) -> Option<usize> {
        if self.running.is_empty() {
            return (!self.jobs.is_empty()).then_some(0);
        }
        self.jobs
            .iter()
            .position(|j| self.running_of(j.device()) < self.cap)
    }

    fn running_of(&self, device: usize) -> usize {
        self.running
            .iter()
            .find(|(d, _)| *d == device)
            .map_or(0, |(_, n)| *n)
    }

    /// Takes the first job whose device is under its cap, and counts it as running.
    fn take(&mut self) -> Option<T> {
        let job = self.jobs.remove(self.first_takeable()?)?;
        let device = job.device();
        match self.running.iter_mut().find(|(d, _)| *d == device) {
            Some((_, n)) => *n += 1,
            None => self.running.push((device, 1)),
        }
        Some(job)
    }

    /// A job of `device` has finished.
    fn done(&mut self, device: usize) {
        if let Some(i) = self.running.iter().position(|(d, _)| *d == device) {
            self.running[i].1 -= 1;
            if self.running[i].1 == 0 {
                self.running.swap_remove(i);
            }
        }
    }
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    ready: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        // The queue is consistent after any panic (push/pop and counters only).
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The I/O threads.
pub(crate) struct IoPool<T> {
    shared: Arc<Shared<T>>,
    /// False if no thread could be started.
    threaded: bool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl<T: Task> IoPool<T> {
    /// Starts `threads` threads (at least one). Threads that cannot be started are logged;
    /// with none at all, jobs run on tokio's blocking pool instead.
    pub(crate) fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                running: Vec::with_capacity(threads),
                cap: device_cap(threads),
                idle: 0,
                waking: false,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let mut handles = Vec::new();
        for i in 0..threads {
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
        // Fewer threads than asked: the cap follows what started.
        shared.lock().cap = device_cap(handles.len());
        Self {
            shared,
            threaded: !handles.is_empty(),
            threads: Mutex::new(handles),
        }
    }

    /// Queues a job; one idle thread is woken if there is one.
    pub(crate) fn submit(&self, job: T) {
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

impl<T> Drop for IoPool<T> {
    fn drop(&mut self) {
        let mut handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        shutdown(&self.shared, &mut handles);
    }
}

fn shutdown<T>(shared: &Shared<T>, handles: &mut Vec<JoinHandle<()>>) {
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

/// Counts a job as finished when dropped, also if it panicked.
struct Finished<'a, T: Task> {
    shared: &'a Shared<T>,
    device: Option<usize>,
}

fn worker<T: Task>(shared: &Shared<T>) {
    // The device of the job this thread last ran: counted as done under the same lock that
    // takes the next one.
    let mut last: Option<usize> = None;
    loop {
        let (job, wake) = {
            let mut q = shared.lock();
            if let Some(device) = last.take() {
                q.done(device);
            }
            loop {
                if let Some(job) = q.take() {
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
        let device = job.device();
        let mut finished = Finished {
            shared,
            device: Some(device),
        };
        job.run();
        finished.device = None;
        last = Some(device);
    }
}

impl<T: Task> Drop for Finished<'_, T> {
    fn drop(&mut self) {
        // Only when the job unwound: the thread is ending, so count it as done here.
        if let Some(device) = self.device.take() {
            let mut q = self.shared.lock();
            q.done(device);
            let wake = q.should_wake();
            drop(q);
            if wake {
                self.shared.ready.notify_one();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// A job of `device` that holds its thread until `gate` opens, counting how many of its
    /// device run at once.
    struct Held {
        device: usize,
        gate: Arc<(Mutex<bool>, Condvar)>,
        running: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        done: mpsc::Sender<usize>,
    }

    impl Task for Held {
        fn device(&self) -> usize {
            self.device
        }
        fn run(self) {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let (open, cv) = &*self.gate;
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            drop(g);
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.done.send(self.device).unwrap();
        }
    }

    struct Quick(usize, mpsc::Sender<usize>);

    impl Task for Quick {
        fn device(&self) -> usize {
            self.0
        }
        fn run(self) {
            self.1.send(self.0).unwrap();
        }
    }

    fn open(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    #[test]
    fn the_cap_leaves_a_quarter_of_the_threads_and_at_least_one() {
        let caps: Vec<usize> = [1, 2, 3, 4, 5, 8, 64].map(device_cap).to_vec();
        assert_eq!(caps, [1, 1, 2, 3, 4, 6, 48]);
    }

    #[test]
    fn a_device_that_blocks_does_not_stall_another() {
        // The pool is generic over the job: these jobs are the real pool's threads and queue
        // with work that blocks as a hung store does.
        let pool = IoPool::new(4);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (running, most) = (Arc::default(), Arc::default());
        let (tx, rx) = mpsc::channel();
        enum Either {
            Held(Held),
            Quick(Quick),
        }
        impl Task for Either {
            fn device(&self) -> usize {
                match self {
                    Either::Held(h) => h.device(),
                    Either::Quick(q) => q.device(),
                }
            }
            fn run(self) {
                match self {
                    Either::Held(h) => h.run(),
                    Either::Quick(q) => q.run(),
                }
            }
        }
        for _ in 0..8 {
            pool.submit(Either::Held(Held {
                device: 1,
                gate: Arc::clone(&gate),
                running: Arc::clone(&running),
                most: Arc::clone(&most),
                done: tx.clone(),
            }));
        }
        // The slow device's jobs are queued first, ahead of every quick one.
        let start = Instant::now();
        for _ in 0..1000 {
            pool.submit(Either::Quick(Quick(2, tx.clone())));
        }
        let quick_done: Vec<usize> = (0..1000)
            .map_while(|_| rx.recv_timeout(Duration::from_secs(5)).ok())
            .collect();
        let quick = start.elapsed();
        let held = running.load(Ordering::SeqCst);
        // Opened before any assertion, so that a failure ends the test instead of hanging it.
        open(&gate);
        assert_eq!(
            quick_done.len(),
            1000,
            "quick jobs waited behind the blocked device"
        );
        assert!(quick_done.iter().all(|&d| d == 2));
        assert_eq!(held, 3, "the blocked device holds its cap");
        for _ in 0..8 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            3,
            "never more than the cap at once"
        );
        assert!(quick < Duration::from_secs(5), "{quick:?}");
    }

    #[test]
    fn one_device_alone_uses_its_cap_and_every_job_runs() {
        let pool = IoPool::new(8);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::default());
        let (tx, rx) = mpsc::channel();
        for _ in 0..50 {
            pool.submit(Held {
                device: 7,
                gate: Arc::clone(&gate),
                running: Arc::clone(&running),
                most: Arc::clone(&most),
                done: tx.clone(),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::SeqCst) < 6 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(running.load(Ordering::SeqCst), 6);
        open(&gate);
        for _ in 0..50 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 7);
        }
        assert_eq!(most.load(Ordering::SeqCst), 6);
    }
}
