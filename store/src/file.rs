//! The file engine: a volume's bytes in a regular file (or a block device), with buffered
//! positional I/O, `fdatasync` for flush, `fallocate(PUNCH_HOLE)` for discard and
//! `SEEK_DATA`/`SEEK_HOLE` for the allocation map.
//!
//! Opening takes an advisory `flock`: exclusive for [`Access::ReadWrite`], shared for
//! [`Access::ReadOnly`], so a volume attached by one process cannot be changed by another;
//! [`Access::Inspect`] takes none (reading the header of an attached volume).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

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

/// Largest single buffered write (see [`FileStore::write_at`]).
const WRITE_PIECE: usize = 4 << 10;

/// A volume's bytes in a file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
    /// Block devices report no length in their metadata: their size is found by seeking.
    block_device: bool,
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
        })
    }

    /// The open file, for what only files can do (a reflink clone by the file catalog, a
    /// look at what a device holds).
    pub fn file(&self) -> &File {
        &self.file
    }
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
        match self.file.read_exact_at(buf, offset) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                check_range(&self.path, offset, buf.len() as u64, self.len()?)?;
                Err(e)
            }
            other => other,
        }
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        // Buffered writes go in pieces of at most WRITE_PIECE bytes: the kernel sizes the
        // page-cache folios it creates after the write, and a later 4 KiB random write into
        // a large folio dirties (and writes back) all of it (docs/benchmarks.md).
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
