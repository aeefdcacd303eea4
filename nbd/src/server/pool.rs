//! Request buffers, reused across requests and connections.
//!
//! Buffers come in power-of-two size classes from 4 KiB up. A buffer is handed out only after
//! the request's bytes were taken from the in-flight budget (see `budget.rs`), so live buffers
//! never exceed the global budget; freed buffers are kept for reuse (first-touch memory is
//! slow), and the pool evicts kept buffers of other classes before it would let live plus kept
//! memory exceed `cap`. So the pool never holds more than `cap` bytes, live or kept.

use std::sync::{Arc, Mutex};

/// Smallest class: 4 KiB.
const MIN_CLASS_SHIFT: u32 = 12;

/// The size class (bytes) a request of `len` bytes uses.
pub(crate) fn class_size(len: usize) -> usize {
    len.max(1 << MIN_CLASS_SHIFT).next_power_of_two()
}

fn class_index(class: usize) -> usize {
    (class.trailing_zeros() - MIN_CLASS_SHIFT) as usize
}

struct State {
    /// Free buffers, by class.
    free: Vec<Vec<Vec<u8>>>,
    /// Bytes in free buffers.
    kept: usize,
    /// Bytes in free plus live buffers.
    total: usize,
}

/// A pool of zero-initialised byte buffers.
pub(crate) struct BufferPool {
    state: Mutex<State>,
    cap: usize,
}

impl BufferPool {
    /// A pool that never holds more than `cap` bytes (live and kept).
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                free: Vec::new(),
                kept: 0,
                total: 0,
            }),
            cap,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the lists inconsistent (each operation
        // is a push or a pop plus counters), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of at least `len` bytes; `len` bytes of it are in use.
    pub(crate) fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let class = class_size(len);
        let idx = class_index(class);
        let reused = {
            let mut st = self.lock();
            if let Some(v) = st.free.get_mut(idx).and_then(Vec::pop) {
                st.kept -= class;
                Some(v)
            } else {
                // Make room by dropping kept buffers of other classes.
                let mut evicted = Vec::new();
                while st.total + class > self.cap && st.kept > 0 {
                    let Some(v) = st.free.iter_mut().rev().find_map(Vec::pop) else {
                        break;
                    };
                    st.kept -= v.len();
                    st.total -= v.len();
                    evicted.push(v);
                }
                st.total += class;
                drop(st);
                drop(evicted);
                None
            }
        };
        let data = reused.unwrap_or_else(|| vec![0; class]);
        PooledBuf {
            data,
            len,
            pool: Arc::clone(self),
        }
    }

    fn put(&self, data: Vec<u8>) {
        let class = data.len();
        let idx = class_index(class);
        let mut st = self.lock();
        if st.free.len() <= idx {
            st.free.resize_with(idx + 1, Vec::new);
        }
        st.free[idx].push(data);
        st.kept += class;
    }

    /// Bytes held (live and kept), for tests and metrics.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.lock().total
    }
}

/// A buffer on loan from the pool; goes back when dropped.
pub(crate) struct PooledBuf {
    data: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl PooledBuf {
    /// The bytes in use.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.data[..self.len]
    }

    /// The bytes in use, writable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class_size(0), 4096);
        assert_eq!(class_size(4096), 4096);
        assert_eq!(class_size(4097), 8192);
        assert_eq!(class_size(32 << 20), 32 << 20);
    }

    #[test]
    fn buffers_are_reused_and_the_cap_holds() {
        let pool = BufferPool::new(64 << 10);
        let a = pool.get(4096);
        let ptr = a.as_slice().as_ptr();
        drop(a);
        let b = pool.get(100);
        assert_eq!(b.as_slice().as_ptr(), ptr, "same class is reused");
        assert_eq!(b.as_slice().len(), 100);
        drop(b);
        // Fill the cap with kept 4 KiB buffers, then ask for a 32 KiB one: kept buffers go.
        let many: Vec<_> = (0..16).map(|_| pool.get(4096)).collect();
        drop(many);
        assert_eq!(pool.total(), 64 << 10);
        let big = pool.get(32 << 10);
        assert!(pool.total() <= 64 << 10);
        drop(big);
    }
}
