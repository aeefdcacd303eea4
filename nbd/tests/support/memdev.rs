//! An in-memory [`BlockDevice`]: 64 KiB chunks, each behind its own lock and allocated on
//! first write, so block status reports real holes and concurrent requests on different
//! chunks never contend.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nbd::proto::state_flags::{HOLE, ZERO};
use nbd::{BlockDevice, BlockSizes, DeviceError, Errno, Extent};

pub const CHUNK: u64 = 64 * 1024;

pub struct MemDevice {
    size: u64,
    sizes: BlockSizes,
    read_only: bool,
    fast_zero: bool,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
    /// Requests touching offsets at or above this sleep `delay` (tests of ordering/draining).
    slow_from: AtomicU64,
    delay_us: AtomicU64,
    /// Counters for tests.
    pub writes_started: AtomicU64,
    pub writes_done: AtomicU64,
    /// Most writes in progress at once.
    pub max_concurrent_writes: AtomicU64,
    pub flushes: AtomicU64,
    /// Offsets at or above this fail with EIO.
    fail_from: AtomicU64,
}

impl MemDevice {
    pub fn new(size: u64) -> Self {
        Self::with(size, 1, 4096, 32 << 20, false)
    }

    pub fn with(size: u64, minimum: u32, preferred: u32, maximum: u32, read_only: bool) -> Self {
        let n = size.div_ceil(CHUNK) as usize;
        Self {
            size,
            sizes: BlockSizes {
                minimum,
                preferred,
                maximum,
            },
            read_only,
            fast_zero: false,
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
            slow_from: AtomicU64::new(u64::MAX),
            delay_us: AtomicU64::new(0),
            writes_started: AtomicU64::new(0),
            writes_done: AtomicU64::new(0),
            max_concurrent_writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fail_from: AtomicU64::new(u64::MAX),
        }
    }

    pub fn fast_zero(mut self, yes: bool) -> Self {
        self.fast_zero = yes;
        self
    }

    /// Requests at offsets >= `from` sleep `delay` before doing their work.
    pub fn set_slow(&self, from: u64, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
        self.slow_from.store(from, Ordering::SeqCst);
    }

    /// Requests at offsets >= `from` fail with EIO.
    pub fn set_failing(&self, from: u64) {
        self.fail_from.store(from, Ordering::SeqCst);
    }

    /// Bytes of chunks allocated.
    pub fn allocated(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| c.read().unwrap().is_some())
            .count() as u64
            * CHUNK
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        let mut v = vec![0; self.size as usize];
        self.read(0, &mut v).unwrap();
        v
    }

    fn chunk_len(&self, idx: usize) -> usize {
        let start = idx as u64 * CHUNK;
        (self.size - start).min(CHUNK) as usize
    }

    fn gate(&self, offset: u64) -> Result<(), DeviceError> {
        if offset >= self.slow_from.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(self.delay_us.load(Ordering::SeqCst)));
        }
        if offset >= self.fail_from.load(Ordering::SeqCst) {
            return Err(DeviceError::new(
                Errno::Eio,
                "injected failure in the test device",
            ));
        }
        Ok(())
    }

    /// Calls `f(chunk index, offset in chunk, range in the request)` for each piece.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let idx = (pos / CHUNK) as usize;
            let in_chunk = (pos % CHUNK) as usize;
            let n = (self.chunk_len(idx) - in_chunk).min((len - done) as usize);
            f(idx, in_chunk, done as usize..done as usize + n);
            done += n as u64;
        }
    }

    fn zero(&self, offset: u64, len: u64, may_trim: bool) {
        self.pieces(offset, len, |idx, at, r| {
            let mut c = self.chunks[idx].write().unwrap();
            if r.len() == self.chunk_len(idx) && may_trim {
                *c = None;
            } else if let Some(data) = c.as_mut() {
                data[at..at + r.len()].fill(0);
            } else if !may_trim {
                *c = Some(vec![0; self.chunk_len(idx)].into_boxed_slice());
            }
        });
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn fast_zero(&self) -> bool {
        self.fast_zero
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.gate(offset)?;
        self.pieces(offset, buf.len() as u64, |idx, at, r| {
            let c = self.chunks[idx].read().unwrap();
            match c.as_ref() {
                Some(data) => buf[r.clone()].copy_from_slice(&data[at..at + r.len()]),
                None => buf[r].fill(0),
            }
        });
        Ok(())
    }
    fn write(&self, offset: u64, data: &mut [u8], _fua: bool) -> Result<(), DeviceError> {
        let started = self.writes_started.fetch_add(1, Ordering::SeqCst) + 1;
        let running = started - self.writes_done.load(Ordering::SeqCst);
        self.max_concurrent_writes
            .fetch_max(running, Ordering::SeqCst);
        if let Err(e) = self.gate(offset) {
            self.writes_done.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        self.pieces(offset, data.len() as u64, |idx, at, r| {
            let mut c = self.chunks[idx].write().unwrap();
            let len = self.chunk_len(idx);
            let chunk = c.get_or_insert_with(|| vec![0; len].into_boxed_slice());
            chunk[at..at + r.len()].copy_from_slice(&data[r]);
        });
        self.writes_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64, _fua: bool) -> Result<(), DeviceError> {
        self.gate(offset)?;
        self.zero(offset, length, true);
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        may_trim: bool,
        _fua: bool,
    ) -> Result<(), DeviceError> {
        self.gate(offset)?;
        self.zero(offset, length, may_trim);
        Ok(())
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, DeviceError> {
        self.gate(offset)?;
        let mut out: Vec<Extent> = Vec::new();
        self.pieces(offset, length, |idx, _, r| {
            let flags = if self.chunks[idx].read().unwrap().is_some() {
                0
            } else {
                HOLE | ZERO
            };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += r.len() as u64,
                _ => out.push(Extent {
                    length: r.len() as u64,
                    flags,
                }),
            }
        });
        Ok(out)
    }
}
