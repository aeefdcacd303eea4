//! cryptnbd's storage layer: where the bytes under a volume live, and how they are made
//! durable. The volume format (headers, keys, sector crypto) sits on top of it and never sees
//! which engine holds its bytes.
//!
//! - [`BackingStore`]: the bytes under one volume, with its contract written down. Engines:
//!   [`file::FileStore`] (a regular file or block device, buffered I/O) and
//!   [`memory::MemStore`] (in memory, for tests). Every engine passes the same contract
//!   suite ([`contract`]).
//! - [`catalog`]: where volumes live by name, and their whole-volume changes (create,
//!   atomic replace, snapshots, clones, removal). [`copy`]: the sparse copy between any two
//!   stores that a catalog falls back on.
//! - [`stores::Stores`]: a daemon's catalogs side by side (its directory, an RBD pool) as
//!   one catalog, names unique across them.
//! - [`durable`]: the one place that replaces a small file atomically (temporary file, fsync,
//!   rename, directory fsync) and makes private directories.
//!
//! ## Engines that complete on other threads
//!
//! [`BackingStore`] is synchronous: a call blocks its thread (one of the NBD server's I/O
//! threads) until the engine is done, and it borrows the caller's buffer only for the call.
//! An engine whose requests complete on threads of its own (the Ceph RBD engine: librbd's
//! aio) also offers [`submit::Submit`] through [`BackingStore::submitter`]: requests own
//! their buffers until they complete, completions are futures woken by the engine, and many
//! are in flight at once. The volume's data path uses it where it exists; header code and
//! long operations keep the synchronous calls.
//!
//! It must not depend on any other crate of the workspace: everything above it (the volume
//! format, the KMS, the daemon, the CLI) may use it.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod contract;
pub mod copy;
pub mod crash;
pub mod device;
pub mod durable;
pub mod file;
pub mod memory;
pub mod stores;
pub mod submit;

use std::fmt;
use std::io;
use std::path::Path;

/// A run of a store's allocation map: `len` bytes that hold data (`allocated`) or are a hole
/// (read as zeros, take no space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Whether the range holds data (false: a hole).
    pub allocated: bool,
}

impl Extent {
    /// Appends a run of `len` bytes to an allocation map, merged into the last run when that
    /// one is of the same kind.
    pub fn push_run(map: &mut Vec<Extent>, len: u64, allocated: bool) {
        match map.last_mut() {
            Some(last) if last.allocated == allocated => last.len += len,
            _ => map.push(Extent { len, allocated }),
        }
    }
}

/// What [`BackingStore::discard`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discarded {
    /// The range is a hole now: it reads as zeros and its space is freed.
    Hole,
    /// The engine cannot free space: nothing was changed (the caller may write zeros).
    Unsupported,
}

/// The bytes under one volume: a flat, byte-addressed range that the volume format lays its
/// headers and encrypted sectors on.
///
/// The contract every engine keeps (checked by [`contract::check`]):
/// - **Zeros where nothing was written.** A range never written, or discarded into a hole,
///   reads as zeros.
/// - **Reads are exact.** [`read_at`](Self::read_at) fills the whole buffer or fails; a range
///   past [`len`](Self::len) fails with [`io::ErrorKind::UnexpectedEof`] and reads nothing.
/// - **Writes may grow the store.** A write past the end extends [`len`](Self::len) to the
///   end of the write (the bytes between read as zeros).
/// - **A flush makes every completed write durable.** Once [`flush`](Self::flush) returns
///   `Ok`, every write that returned before it was called survives a crash or power cut.
///   Writes not yet flushed may be lost, in whole or in part (any subset of their sectors).
/// - **What an error leaves behind.** A failed write may have written any part of its range
///   (the old bytes, the new ones, or a mix, sector by sector); the rest of the store is
///   untouched. A failed flush means writes since the last successful flush may be lost:
///   the caller must stop acknowledging writes (the volume then refuses I/O until reopened).
/// - **Concurrency.** Calls may come from many threads at once. Calls on disjoint ranges do
///   not affect each other; overlapping writes land in some order, whole sectors at a time
///   for sector-aligned writes.
pub trait BackingStore: Send + Sync + fmt::Debug {
    /// Where the bytes are, for messages and logs: a path for files, `engine:name` for others.
    fn location(&self) -> &Path;

    /// The length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the store is empty (length 0).
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Reads exactly `buf.len()` bytes at `offset` if that needs no waiting (the bytes are
    /// in memory, such as a file's page cache): `Ok(true)`. `Ok(false)` when it would wait,
    /// or when the engine cannot tell; `buf` may then hold anything, and
    /// [`read_at`](Self::read_at) is the way. Never blocks: the NBD server calls it on a
    /// thread that serves many connections. The default: `Ok(false)`.
    fn try_read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Writes all of `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write that completed before the call durable (for a file: fdatasync).
    fn flush(&self) -> io::Result<()>;

    /// Frees the space of `offset..offset+len`, which then reads as zeros, if the engine can.
    fn discard(&self, offset: u64, len: u64) -> io::Result<Discarded>;

    /// The allocation map of `offset..offset+len` (which must lie within the store): runs
    /// that cover the range exactly, in order. An engine without holes reports one allocated
    /// run.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;

    /// Sets the length: growing adds zeros (a hole where the engine can), shrinking drops the
    /// bytes past the new end.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// The engine's own type, for its catalog to recognise its stores (the file catalog
    /// reflinks one file into another). Nothing above the storage layer uses it.
    fn as_any(&self) -> &dyn std::any::Any;

    /// The engine's asynchronous data path, if it has one ([`submit::Submit`]).
    fn submitter(&self) -> Option<&dyn submit::Submit> {
        None
    }
}

/// The error an engine of shared storage returns once the cluster has fenced this client
/// (Ceph's blocklist after another host broke its lock): it may never write again, and
/// retrying cannot help. The message says what happened.
#[derive(Debug)]
pub struct Fenced(pub String);

impl fmt::Display for Fenced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fenced {}

/// Whether `e` says this client was fenced ([`Fenced`]).
pub fn is_fenced(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Fenced>())
}

/// A range check shared by the engines (this crate's and the RBD engine): `offset..offset+len`
/// within `size`, else `UnexpectedEof` naming the store.
pub fn check_range(location: &Path, offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{}: range {offset}+{len} is past the end ({size} bytes)",
                location.display()
            ),
        )),
    }
}

/// A shared store is a store: a test can keep a handle on the memory engine that a volume
/// owns, and reopen the volume on it.
impl<T: BackingStore + ?Sized> BackingStore for std::sync::Arc<T> {
    fn location(&self) -> &Path {
        (**self).location()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        (**self).try_read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<Discarded> {
        (**self).discard(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        (**self).extents(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        (**self).as_any()
    }
    fn submitter(&self) -> Option<&dyn submit::Submit> {
        (**self).submitter()
    }
}
