//! The memory engine: a volume's bytes in sparse 64 KiB chunks in memory, for tests.
//!
//! Besides the contract of [`BackingStore`], it can act out a crash: [`MemStore::crashed`]
//! returns the store as a power cut would leave it, with only what the last successful
//! [`flush`](BackingStore::flush) made durable. Tests of crash consistency use it, and the
//! contract suite uses it to check that a flush keeps what it promises.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::submit::{Flushing, Owned, Submit, Transfer};
use crate::{BackingStore, Discarded, Extent, check_range};

/// Bytes per chunk: a chunk is allocated on its first write, dropped when discarded whole.
pub const CHUNK: u64 = 64 << 10;

#[derive(Debug, Clone, Default)]
struct Image {
    len: u64,
    chunks: BTreeMap<u64, Arc<[u8]>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// What reads see.
    live: Image,
    /// What survives a crash: `live` as of the last flush (chunks shared until written).
    durable: Image,
}

/// A volume's bytes in memory.
#[derive(Debug)]
pub struct MemStore {
    name: PathBuf,
    inner: Arc<Mutex<Inner>>,
    /// Offers [`Submit`], each request completed on a thread of its own.
    threads: bool,
}

impl MemStore {
    /// An empty store (length 0) named `memory:NAME` in messages.
    pub fn new(name: &str) -> Self {
        Self::from_image(PathBuf::from(format!("memory:{name}")), Image::default())
    }

    /// An empty store named by `location` in messages: bytes read from that file, say, and
    /// parsed in memory.
    pub fn at(location: &Path) -> Self {
        Self::from_image(location.to_path_buf(), Image::default())
    }

    fn from_image(name: PathBuf, image: Image) -> Self {
        Self {
            name,
            inner: Arc::new(Mutex::new(Inner {
                live: image.clone(),
                durable: image,
            })),
            threads: false,
        }
    }

    /// The same store, also offering the asynchronous data path ([`Submit`]): each request
    /// completes on a thread of its own, as an engine's requests complete on its threads.
    pub fn completing_on_threads(mut self) -> Self {
        self.threads = true;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// The store as a crash would leave it: what the last flush made durable, nothing after.
    pub fn crashed(&self) -> MemStore {
        let durable = self.lock().durable.clone();
        Self::from_image(self.name.clone(), durable)
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Every change below leaves `Inner` consistent before anything that can panic.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Image {
    /// Reads `buf.len()` bytes at `offset` (within the image).
    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let within = (at % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(buf.len() - done);
            match self.chunks.get(&(at / CHUNK)) {
                Some(chunk) => buf[done..done + n].copy_from_slice(&chunk[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, data: &[u8], offset: u64) {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let index = at / CHUNK;
            let within = (at % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(data.len() - done);
            let chunk = self
                .chunks
                .entry(index)
                .or_insert_with(|| Arc::from(vec![0u8; CHUNK as usize]));
            // Copy on write: the durable image may share this chunk.
            let bytes = match Arc::get_mut(chunk) {
                Some(b) => b,
                None => {
                    *chunk = Arc::from(chunk.to_vec());
                    Arc::get_mut(chunk).unwrap_or_else(|| unreachable!("a fresh Arc is unique"))
                }
            };
            bytes[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let index = at / CHUNK;
            let within = at % CHUNK;
            let n = (CHUNK - within).min(end - at);
            if n == CHUNK {
                self.chunks.remove(&index);
            } else if self.chunks.contains_key(&index) {
                let zeros = vec![0u8; n as usize];
                let len = self.len;
                self.write(&zeros, at);
                self.len = len;
            }
            at += n;
        }
    }
}

impl BackingStore for MemStore {
    fn location(&self) -> &Path {
        &self.name
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().live.len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner = self.lock();
        check_range(&self.name, offset, buf.len() as u64, inner.live.len)?;
        inner.live.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        offset.checked_add(data.len() as u64).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "write past the largest offset")
        })?;
        self.lock().live.write(data, offset);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        inner.durable = inner.live.clone();
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<Discarded> {
        let mut inner = self.lock();
        let size = inner.live.len;
        check_range(&self.name, offset, len, size)?;
        inner.live.zero(offset, len);
        Ok(Discarded::Hole)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let inner = self.lock();
        check_range(&self.name, offset, len, inner.live.len)?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let n = (CHUNK - at % CHUNK).min(end - at);
            let allocated = inner.live.chunks.contains_key(&(at / CHUNK));
            Extent::push_run(&mut out, n, allocated);
            at += n;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        if len < inner.live.len {
            let old = inner.live.len;
            // Whole chunks past the end go; the tail of the last one is zeroed, so growing
            // again reads zeros there.
            let first_gone = len.div_ceil(CHUNK);
            inner.live.chunks.retain(|&i, _| i < first_gone);
            if !len.is_multiple_of(CHUNK) {
                let tail_end = (first_gone * CHUNK).min(old);
                inner.live.zero(len, tail_end - len);
            }
        }
        inner.live.len = len;
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn submitter(&self) -> Option<&dyn Submit> {
        self.threads.then_some(self as &dyn Submit)
    }
}

/// Runs `op` on a thread of its own; the future yields what it returns.
fn on_a_thread<T: Send + 'static>(
    op: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = T> + Send {
    struct Slot<T> {
        value: Option<T>,
        waker: Option<std::task::Waker>,
    }
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        waker: None,
    }));
    let theirs = Arc::clone(&slot);
    std::thread::spawn(move || {
        let value = op();
        let mut s = theirs.lock().unwrap_or_else(|p| p.into_inner());
        s.value = Some(value);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    });
    std::future::poll_fn(move |cx| {
        let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
        match s.value.take() {
            Some(v) => std::task::Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    })
}

impl Submit for MemStore {
    fn read_owned(&self, mut buf: Owned, offset: u64) -> Transfer {
        let (inner, name) = (Arc::clone(&self.inner), self.name.clone());
        Box::pin(on_a_thread(move || {
            let bytes = buf.bytes();
            let live = &lock(&inner).live;
            let r = check_range(&name, offset, bytes.len() as u64, live.len)
                .map(|()| live.read(bytes, offset));
            (r, buf)
        }))
    }

    fn write_owned(&self, mut buf: Owned, offset: u64) -> Transfer {
        let (inner, name) = (Arc::clone(&self.inner), self.name.clone());
        Box::pin(on_a_thread(move || {
            let bytes = buf.bytes();
            let mut g = lock(&inner);
            let r = check_range(&name, offset, bytes.len() as u64, g.live.len)
                .map(|()| g.live.write(bytes, offset));
            drop(g);
            (r, buf)
        }))
    }

    fn flush_owned(&self) -> Flushing {
        let inner = Arc::clone(&self.inner);
        Box::pin(on_a_thread(move || {
            let mut g = lock(&inner);
            g.durable = g.live.clone();
            Ok(())
        }))
    }
}
