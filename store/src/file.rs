//! The file engine: a volume's bytes in a regular file (or a block device), with positional
//! I/O, `fdatasync` for flush, `fallocate(PUNCH_HOLE)` for discard and `SEEK_DATA`/`SEEK_HOLE`
//! for the allocation map.
//!
//! Data moves through the page cache ([`FileIo::Buffered`], the default) or around it
//! ([`FileIo::Direct`]: a second descriptor on the same file opened with `O_DIRECT`). In
//! direct mode a request whose offset and length meet the file's direct-I/O alignment
//! (`statx` `STATX_DIOALIGN`) goes around the page cache: straight from or into the caller's
//! buffer when that is aligned too, else through the I/O thread's aligned scratch buffer. A
//! request that is not aligned (a header's bytes, a partial sector) takes the buffered
//! descriptor: the kernel keeps the two views of the file coherent (a direct read or write
//! first writes back and drops the cached pages it covers). A filesystem without `O_DIRECT`
//! (tmpfs) keeps buffered I/O.
//!
//! Opening takes an advisory `flock`: exclusive for [`Access::ReadWrite`], shared for
//! [`Access::ReadOnly`], so a volume attached by one process cannot be changed by another;
//! [`Access::Inspect`] takes none (reading the header of an attached volume).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use rustix::fs::{FallocateFlags, SeekFrom};

use crate::{BackingStore, Discarded, Extent, check_range};

/// How a [`FileStore`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and write, under an exclusive lock.
    ReadWrite,
    /// Read only, under a shared lock (several readers, no writer).
    ReadOnly,
    /// Read only, no lock: for looking at a volume another process may have open.
    Inspect,
}

/// Largest single buffered write (see [`FileStore::write_at`]): a whole request of the usual
/// sizes. Smaller pieces make the kernel create smaller page-cache folios, which a later
/// 4 KiB random write dirties less of, but every piece costs a system call and a turn of the
/// inode lock: at 4 KiB, sequential writes took 0.55 core-seconds per GB against 0.31
/// (docs/benchmarks.md).
const WRITE_PIECE: usize = 1 << 20;

/// How a [`FileStore`] moves data (`[store.file] io` in the daemon's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileIo {
    /// Through the page cache.
    #[default]
    Buffered,
    /// Around the page cache (`O_DIRECT`), where the filesystem allows it.
    Direct,
}

/// The `O_DIRECT` descriptor of a [`FileStore`] in direct mode.
#[derive(Debug)]
struct Direct {
    file: File,
    /// Alignment of buffer addresses, file offsets and lengths (a power of two).
    align: usize,
}

/// A volume's bytes in a file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
    /// Block devices report no length in their metadata: their size is found by seeking.
    block_device: bool,
    /// Set in direct mode ([`FileStore::with_io`]).
    direct: Option<Direct>,
    /// Held across a buffered write of a file: one writer at a time, the others waiting
    /// here instead of spinning on the inode lock, which the filesystem takes exclusively for
    /// every buffered write anyway (docs/benchmarks.md, "Buffered writes, the choice").
    writer: WriterLock,
}

/// How long a writer spins for the file's writer lock before it sleeps. A 4 KiB write holds
/// the lock for a few microseconds, less than a sleep and a wake-up cost a waiting thread on
/// a virtual machine; a large write holds it longer than this, and its waiters sleep.
/// 50 µs: 28% more 4 KiB random writes than sleeping at once when the page cache is not
/// under write-back pressure, the same when it is (docs/benchmarks.md, "Spin, then sleep").
const WRITER_SPIN: Duration = Duration::from_micros(50);

/// The lock that lets one buffered writer of a file through at a time: it spins for up to
/// [`WRITER_SPIN`] (on machines with more than one CPU), then sleeps.
#[derive(Debug)]
struct WriterLock {
    lock: Mutex<()>,
    spin: Duration,
}

impl WriterLock {
    fn new() -> Self {
        static SPIN: OnceLock<Duration> = OnceLock::new();
        let spin = *SPIN.get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cpus > 1 {
                WRITER_SPIN
            } else {
                Duration::ZERO
            }
        });
        Self::with_spin(spin)
    }

    fn with_spin(spin: Duration) -> Self {
        Self {
            lock: Mutex::new(()),
            spin,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // A free lock costs one try: the clock is read only once the lock is found taken,
        // then every 32 tries.
        let mut spinning_since: Option<Instant> = None;
        let mut tries = 0u32;
        while !self.spin.is_zero() {
            match self.lock.try_lock() {
                Ok(guard) => return guard,
                // A writer that panicked leaves nothing half done behind this lock.
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
            let since = *spinning_since.get_or_insert_with(Instant::now);
            tries += 1;
            if tries.is_multiple_of(32) && since.elapsed() >= self.spin {
                break;
            }
            std::hint::spin_loop();
        }
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a file could not be opened: it is locked by another process, or an I/O error.
#[derive(Debug)]
pub enum OpenError {
    /// Another process holds a conflicting lock (the volume is attached elsewhere).
    Locked,
    /// Another host holds the volume (a cluster-wide lock): who, as a sentence.
    Held(String),
    /// Opening or locking failed.
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

/// Takes the `flock` that `access` asks for on `file` (see [`Access`]), without waiting.
pub fn lock(file: &File, access: Access) -> Result<(), OpenError> {
    let locked = match access {
        Access::ReadWrite => file.try_lock(),
        Access::ReadOnly => file.try_lock_shared(),
        Access::Inspect => Ok(()),
    };
    match locked {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked),
        Err(std::fs::TryLockError::Error(e)) => Err(OpenError::Io(e)),
    }
}

impl FileStore {
    /// Opens the file at `path` with `access` (see [`Access`] for the locks).
    pub fn open(path: &Path, access: Access) -> Result<Self, OpenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path)
            .map_err(OpenError::Io)?;
        lock(&file, access)?;
        Self::from_file(file, path).map_err(OpenError::Io)
    }

    /// Wraps an open (and, if need be, already locked) file: a file being built under a
    /// temporary name, for instance.
    pub fn from_file(file: File, path: &Path) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            block_device,
            direct: None,
            writer: WriterLock::new(),
        })
    }

    /// This store with data moved as `io` says. Direct mode opens the same file again with
    /// `O_DIRECT` (through `/proc/self/fd`, so a file being built under a temporary name
    /// works too); where the filesystem refuses `O_DIRECT` the store stays buffered, which
    /// [`FileStore::io`] then reports.
    pub fn with_io(mut self, io: FileIo) -> io::Result<Self> {
        self.direct = match io {
            FileIo::Buffered => None,
            FileIo::Direct => self.open_direct()?,
        };
        Ok(self)
    }

    /// How data moves now.
    pub fn io(&self) -> FileIo {
        if self.direct.is_some() {
            FileIo::Direct
        } else {
            FileIo::Buffered
        }
    }

    /// The `O_DIRECT` descriptor and its alignment, or None where the filesystem has none.
    fn open_direct(&self) -> io::Result<Option<Direct>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let writable = rustix::fs::fcntl_getfl(&self.file)?.contains(rustix::fs::OFlags::RDWR);
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let opened = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&proc_path);
        let file = match opened {
            Ok(f) => f,
            // tmpfs and some FUSE filesystems refuse O_DIRECT.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let st = rustix::fs::statx(
            &file,
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::DIOALIGN,
        )?;
        let (mem, off) = if st.stx_mask & rustix::fs::StatxFlags::DIOALIGN.bits() != 0 {
            (st.stx_dio_mem_align, st.stx_dio_offset_align)
        } else {
            // Kernels before 6.1 do not say: the logical block size of today's disks.
            (512, 512)
        };
        if off == 0 {
            // The filesystem says it has no direct I/O for this file.
            return Ok(None);
        }
        let align = mem.max(off).max(1) as usize;
        if !align.is_power_of_two() {
            return Ok(None);
        }
        Ok(Some(Direct { file, align }))
    }

    /// The open file, for what only files can do (a reflink clone by the file catalog, a
    /// look at what a device holds).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The lock goes with the store, even where a copy of the descriptor lives on: a process
/// forked by another thread holds one until it execs, and `flock` belongs to the open file,
/// not to one descriptor. Without the explicit unlock a volume closed and reopened at once
/// (detach then attach, a failed open then a good one) could be refused as in use.
impl Drop for FileStore {
    fn drop(&mut self) {
        // Unlocking a file this store did not lock (`Access::Inspect`) is harmless.
        let _ = self.file.unlock();
    }
}

impl Direct {
    /// Whether a request of `len` bytes at `offset` can go around the page cache.
    fn takes(&self, len: usize, offset: u64) -> bool {
        len.is_multiple_of(self.align) && offset.is_multiple_of(self.align as u64)
    }

    fn aligned_memory(&self, buf: &[u8]) -> bool {
        (buf.as_ptr() as usize).is_multiple_of(self.align)
    }

    /// Reads a range that [`Direct::takes`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.aligned_memory(buf) {
            return self.file.read_exact_at(buf, offset);
        }
        // A buffer that is not aligned (a small request's): the thread's scratch.
        with_scratch(buf.len(), self.align, |scratch| {
            self.file.read_exact_at(scratch, offset)?;
            buf.copy_from_slice(scratch);
            Ok(())
        })
    }

    /// Writes a range that [`Direct::takes`].
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if self.aligned_memory(data) {
            return self.file.write_all_at(data, offset);
        }
        with_scratch(data.len(), self.align, |scratch| {
            scratch.copy_from_slice(data);
            self.file.write_all_at(scratch, offset)
        })
    }
}

/// Runs `f` on `len` bytes of this thread's aligned scratch buffer, which grows to the largest
/// request and is then reused: the requests of direct mode whose range is aligned but whose
/// buffer is not (small NBD requests) copy through it without an allocation.
fn with_scratch<T>(len: usize, align: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let aligned = |raw: &mut Vec<u8>| {
        if raw.len() < len + align {
            *raw = vec![0u8; len + align];
        }
        raw.as_ptr().align_offset(align)
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut raw) => {
            let at = aligned(&mut raw);
            f(&mut raw[at..at + len])
        }
        // Re-entered on this thread (not expected): a buffer of its own.
        Err(_) => {
            let mut raw = Vec::new();
            let at = aligned(&mut raw);
            f(&mut raw[at..at + len])
        }
    })
}

impl BackingStore for FileStore {
    fn location(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            let end = rustix::fs::seek(&self.file, SeekFrom::End(0))?;
            Ok(end)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let read = match &self.direct {
            Some(d) if d.takes(buf.len(), offset) => d.read_at(buf, offset),
            _ => self.file.read_exact_at(buf, offset),
        };
        // The range is checked only when a read came up short (no fstat per request).
        match read {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                check_range(&self.path, offset, buf.len() as u64, self.len()?)?;
                Err(e)
            }
            other => other,
        }
    }

    /// `preadv2(RWF_NOWAIT)` from the page cache; in direct mode, never (its reads go
    /// around the cache).
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if self.direct.is_some() {
            return Ok(false);
        }
        let mut done = 0;
        while done < buf.len() {
            let read = rustix::io::preadv2(
                &self.file,
                &mut [io::IoSliceMut::new(&mut buf[done..])],
                offset + done as u64,
                rustix::io::ReadWriteFlags::NOWAIT,
            );
            match read {
                // Past the end: the blocking read says so properly.
                Ok(0) => return Ok(false),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                // Not all in the page cache (or a kernel or filesystem without RWF_NOWAIT).
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::OPNOTSUPP) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(d) = &self.direct
            && d.takes(data.len(), offset)
        {
            return d.write_at(data, offset);
        }
        // Buffered writes go in pieces of at most WRITE_PIECE bytes, one writer of a file at
        // a time (docs/benchmarks.md, "Buffered writes, the choice"). A block device takes
        // no inode lock for a buffered write, so its writers are left to run together.
        let _one_writer = (!self.block_device).then(|| self.writer.lock());
        let mut done = 0u64;
        for piece in data.chunks(WRITE_PIECE) {
            self.file.write_all_at(piece, offset + done)?;
            done += piece.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<Discarded> {
        if len == 0 {
            return Ok(Discarded::Hole);
        }
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(Discarded::Hole),
            Err(rustix::io::Errno::OPNOTSUPP) => Ok(Discarded::Unsupported),
            Err(e) => Err(e.into()),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        check_range(&self.path, offset, len, self.len()?)?;
        if self.block_device {
            // A device has no holes to ask for: all of it is data.
            let mut out = Vec::new();
            Extent::push_run(&mut out, len, true);
            return Ok(out);
        }
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(at)) {
                Ok(d) => d.max(at),
                // ENXIO: no data after `at`: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            let (n, allocated) = if data > at {
                ((data - at).min(end - at), false)
            } else {
                let hole = rustix::fs::seek(&self.file, SeekFrom::Hole(at))?;
                (hole.saturating_sub(at).clamp(1, end - at), true)
            };
            Extent::push_run(&mut out, n, allocated);
            at += n;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            // A device's size is fixed: a length that fits is all a volume needs.
            let size = self.len()?;
            if len > size {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "{}: the device has {size} bytes, {len} are needed",
                        self.path.display()
                    ),
                ));
            }
            return Ok(());
        }
        self.file.set_len(len)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Nanoseconds this thread has run on a CPU.
    fn thread_cpu_ns() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
            .expect("/proc/thread-self/schedstat (a kernel with CONFIG_SCHED_INFO)");
        stat.split_whitespace().next().unwrap().parse().unwrap()
    }

    #[test]
    fn the_writer_lock_lets_one_writer_through_at_a_time() {
        for spin in [WRITER_SPIN, Duration::ZERO] {
            let lock = Arc::new(WriterLock::with_spin(spin));
            let inside = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicU64::new(0));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (lock, inside, entered) = (lock.clone(), inside.clone(), entered.clone());
                    std::thread::spawn(move || {
                        for _ in 0..5000 {
                            let _g = lock.lock();
                            assert!(!inside.swap(true, Ordering::SeqCst), "two writers inside");
                            entered.fetch_add(1, Ordering::Relaxed);
                            std::hint::spin_loop();
                            inside.store(false, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(entered.load(Ordering::Relaxed), 20_000);
        }
    }

    #[test]
    fn a_waiting_writer_sleeps_once_its_spin_is_spent() {
        let lock = Arc::new(WriterLock::with_spin(WRITER_SPIN));
        let held = lock.lock();
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let cpu = thread_cpu_ns();
                let started = Instant::now();
                drop(lock.lock());
                (started.elapsed(), thread_cpu_ns() - cpu)
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
        let (waited, cpu_ns) = waiter.join().unwrap();
        assert!(
            waited >= Duration::from_millis(250),
            "got the lock while it was held"
        );
        // It spun for 50 µs, then slept: a few milliseconds of CPU at most, not the 300 ms
        // a waiter that never stops spinning would burn.
        assert!(
            cpu_ns < 30_000_000,
            "the waiter ran {cpu_ns} ns on a CPU in {waited:?}"
        );
    }
}
