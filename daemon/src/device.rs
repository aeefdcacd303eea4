//! The adapter from an open [`Volume`] to the NBD server's [`BlockDevice`], counting bytes
//! for `status` and mapping every volume error to an NBD errno in one place.
//!
//! On a store with an asynchronous data path (Ceph RBD), whole-sector reads and writes and
//! flushes are submitted ([`BlockDevice::submit`]): the I/O thread encrypts a write and
//! submits it; the engine's completion wakes a task on the daemon's runtime, which decrypts
//! a read and answers the client. The request (its NBD buffer) is the engine's until then.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nbd::device::{BlockDevice, BlockSizes, DeviceError, Errno, Extent, Io, Submission};
use volume::{Volume, VolumeError, VolumeErrorKind};

/// NBD_STATE_HOLE: the range is not allocated in the volume file.
const STATE_HOLE: u32 = 0x1;
/// NBD_STATE_ZERO: the range reads as zeros.
const STATE_ZERO: u32 = 0x2;
/// Largest request payload advertised.
const MAX_BLOCK: u32 = 32 << 20;

/// What a device does when it finds its host fenced (given the error's message).
type FencedHook = Box<dyn Fn(&str) + Send + Sync>;

/// A volume exported over NBD.
pub struct VolumeDevice {
    volume: Arc<Volume>,
    read_only: bool,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Called once, by the first request that finds this host fenced (the audit record).
    on_fenced: std::sync::OnceLock<FencedHook>,
    fenced_reported: std::sync::atomic::AtomicBool,
    /// Where completions of submitted requests run (None: every request is a blocking call).
    runtime: Option<tokio::runtime::Handle>,
}

impl VolumeDevice {
    /// Wraps an open volume; `read_only` may be stricter than how the volume was opened.
    /// Called on the daemon's runtime, where completions of submitted requests then run.
    pub fn new(volume: Arc<Volume>, read_only: bool) -> Self {
        let read_only = read_only || volume.read_only();
        let runtime = volume
            .submits()
            .then(tokio::runtime::Handle::try_current)
            .and_then(Result::ok);
        Self {
            runtime,
            volume,
            read_only,
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            on_fenced: std::sync::OnceLock::new(),
            fenced_reported: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// What to do, once, when a request finds that the cluster fenced this host: `f` gets
    /// the error's message.
    pub fn on_fenced(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.on_fenced.set(Box::new(f));
    }

    /// The one place volume errors become NBD errnos (and a fenced host is reported).
    fn errno(&self, e: VolumeError) -> DeviceError {
        if e.kind() == VolumeErrorKind::Fenced
            && !self.fenced_reported.swap(true, Ordering::AcqRel)
            && let Some(f) = self.on_fenced.get()
        {
            f(&crate::error::chain(&e));
        }
        errno(e)
    }

    /// Bytes read through the export.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Bytes written through the export.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// Whether the export is read-only.
    pub fn read_only_export(&self) -> bool {
        self.read_only
    }

    /// The volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
}

/// The one place volume errors become NBD errnos.
fn errno(e: VolumeError) -> DeviceError {
    let errno = match e.kind() {
        VolumeErrorKind::InvalidArgument => Errno::Einval,
        VolumeErrorKind::ReadOnly => Errno::Eperm,
        VolumeErrorKind::NoSpace => Errno::Enospc,
        _ => Errno::Eio,
    };
    DeviceError::new(errno, e.to_string())
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn block_sizes(&self) -> BlockSizes {
        // Any alignment works (sub-sector I/O is read-modify-write); whole sectors are best.
        BlockSizes {
            minimum: 1,
            preferred: self.volume.sector_size(),
            maximum: MAX_BLOCK,
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.volume
            .read_at(buf, offset)
            .map_err(|e| self.errno(e))?;
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, DeviceError> {
        // A store with an asynchronous data path has its own way (submit).
        if self.runtime.is_some() {
            return Ok(false);
        }
        let read = self
            .volume
            .try_read_at(buf, offset)
            .map_err(|e| self.errno(e))?;
        if read {
            self.bytes_read
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        Ok(read)
    }

    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), DeviceError> {
        self.volume
            .write_at_mut(data, offset)
            .map_err(|e| self.errno(e))?;
        self.bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if fua {
            self.volume.flush().map_err(|e| self.errno(e))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.volume.flush().map_err(|e| self.errno(e))
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), DeviceError> {
        self.volume
            .trim(offset, length)
            .map_err(|e| self.errno(e))?;
        if fua {
            self.volume.flush().map_err(|e| self.errno(e))?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        _may_trim: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        // Always encrypted zeros, never a hole, even when trimming is allowed: a hole would
        // read as random bytes through dm-crypt.
        self.volume
            .write_zeroes(offset, length)
            .map_err(|e| self.errno(e))?;
        self.bytes_written.fetch_add(length, Ordering::Relaxed);
        if fua {
            self.volume.flush().map_err(|e| self.errno(e))?;
        }
        Ok(())
    }

    fn submits(&self) -> bool {
        self.runtime.is_some()
    }

    fn submit(self: Arc<Self>, s: Submission) -> Result<(), Submission> {
        let Some(rt) = self.runtime.clone() else {
            return Err(s);
        };
        let io = s.io();
        let owned: store::submit::Owned = Box::new(Request(s));
        match io {
            Io::Read { offset } => {
                let read = self.volume.read_owned(owned, offset).map_err(give_back)?;
                self.spawn_transfer(&rt, read, Counter::Read, false);
            }
            Io::Write { offset, fua } => {
                let write = self.volume.write_owned(owned, offset).map_err(give_back)?;
                self.spawn_transfer(&rt, write, Counter::Written, fua);
            }
            Io::Flush => {
                let flush = self.volume.flush_owned();
                let Request(s) = *store::submit::downcast::<Request>(owned);
                rt.spawn(async move {
                    let result = flush.await.map_err(|e| self.errno(e));
                    drop(self);
                    s.complete(result);
                });
            }
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, DeviceError> {
        // A hole is all-zero ciphertext, which this export reads as zeros (the zero rule of
        // docs/format.md): HOLE|ZERO, so that copies skip it. What dm-crypt would read there
        // is not this export's answer. Allocated data is 0.
        let runs = self
            .volume
            .allocation(offset, length)
            .map_err(|e| self.errno(e))?;
        Ok(runs
            .into_iter()
            .map(|(length, allocated)| Extent {
                length,
                flags: if allocated {
                    0
                } else {
                    STATE_HOLE | STATE_ZERO
                },
            })
            .collect())
    }
}

/// A submitted NBD request as the buffer the engine owns until it completes.
struct Request(Submission);

impl store::submit::IoBuf for Request {
    fn bytes(&mut self) -> &mut [u8] {
        self.0.data()
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// A request the volume would not take asynchronously, handed back to the server.
fn give_back(owned: store::submit::Owned) -> Submission {
    store::submit::downcast::<Request>(owned).0
}

/// Which byte counter a completed request adds to.
#[derive(Clone, Copy)]
enum Counter {
    Read,
    Written,
}

impl VolumeDevice {
    /// Runs a submitted read or write to its answer on the runtime: counts its bytes,
    /// flushes first for FUA, then lets go of the device (and with it the volume) before it
    /// answers. Once the last reply is out, a detach that drains the connections holds the
    /// last reference, and dropping it wipes the key then and there.
    fn spawn_transfer(
        self: Arc<Self>,
        rt: &tokio::runtime::Handle,
        transfer: impl Future<Output = (Result<(), VolumeError>, store::submit::Owned)> + Send + 'static,
        counter: Counter,
        fua: bool,
    ) {
        rt.spawn(async move {
            let (result, buf) = transfer.await;
            let Request(mut s) = *store::submit::downcast::<Request>(buf);
            let mut result = result.map_err(|e| self.errno(e));
            if result.is_ok() {
                match counter {
                    Counter::Read => &self.bytes_read,
                    Counter::Written => &self.bytes_written,
                }
                .fetch_add(s.data().len() as u64, Ordering::Relaxed);
                if fua {
                    result = self.volume.flush_owned().await.map_err(|e| self.errno(e));
                }
            }
            drop(self);
            s.complete(result);
        });
    }
}
