//! Request buffers, reused across requests and connections.
//!
//! Buffers come in power-of-two size classes from 4 KiB up. A buffer is handed out only after
//! the request's bytes were taken from the in-flight budget (see `budget.rs`), so live buffers
//! never exceed the global budget; freed buffers are kept for reuse (first-touch memory is
//! slow), and the pool evicts kept buffers of other classes before it would let live plus kept
//! memory exceed `cap`. So the pool never holds more than `cap` bytes, live or kept.
//!
//! Every buffer of 64 KiB or more starts on a 4 KiB boundary (its allocation is one page
//! longer than its class, and the buffer starts where the page boundary is), so that a device
//! may hand it to `O_DIRECT` I/O as it is; smaller ones are not padded (a page would double a
//! 4 KiB buffer), and a device copies them through an aligned buffer of its own.

use std::sync::{Arc, Mutex};

/// Smallest class: 4 KiB.
const MIN_CLASS_SHIFT: u32 = 12;
/// Where every buffer of [`ALIGN_FROM`] bytes or more starts: a multiple of this.
const ALIGN: usize = 4096;
/// The smallest class whose buffers are aligned.
const ALIGN_FROM: usize = 64 << 10;

/// Bytes allocated for a buffer of `class`.
fn alloc_size(class: usize) -> usize {
    if class >= ALIGN_FROM {
        class + ALIGN
    } else {
        class
    }
}

/// The class of an allocation of `len` bytes (classes are powers of two; padded ones are not).
fn class_of(len: usize) -> usize {
    if len.is_power_of_two() {
        len
    } else {
        len - ALIGN
    }
}

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
                    st.kept -= class_of(v.len());
                    st.total -= class_of(v.len());
                    evicted.push(v);
                }
                st.total += class;
                drop(st);
                drop(evicted);
                None
            }
        };
        let data = reused.unwrap_or_else(|| vec![0; alloc_size(class)]);
        let at = if class >= ALIGN_FROM {
            data.as_ptr().align_offset(ALIGN)
        } else {
            0
        };
        PooledBuf {
            data,
            at,
            len,
            pool: Arc::clone(self),
        }
    }

    fn put(&self, data: Vec<u8>) {
        let class = class_of(data.len());
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
    /// The allocation: the class's size (plus one page from [`ALIGN_FROM`] up).
    data: Vec<u8>,
    /// Where the buffer starts in it (a page boundary from [`ALIGN_FROM`] up, else 0).
    at: usize,
    len: usize,
    pool: Arc<BufferPool>,
}

impl PooledBuf {
    /// The bytes in use.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.data[self.at..self.at + self.len]
    }

    /// The bytes in use, writable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[self.at..self.at + self.len]
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
        let big = pool.get(ALIGN_FROM);
        assert!(
            (big.as_slice().as_ptr() as usize).is_multiple_of(ALIGN),
            "a buffer of 64 KiB starts on a page"
        );
        drop(big);
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
