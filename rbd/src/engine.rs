//! [`RbdStore`]: a [`BackingStore`] over one RBD image.
//!
//! - A write past the end grows the image first (RBD images have a fixed size; the contract
//!   wants a file's behaviour).
//! - A discard frees the whole objects inside the range and writes zeros over the rest, so
//!   the range reads as zeros; a range inside one object has nothing to free and is left
//!   alone ([`Discarded::Unsupported`]: the caller writes zeros if it wants them).
//! - The allocation map comes from librbd's diff against nothing (`rbd_diff_iterate2`).
//! - Reads and writes go through librbd's aio calls. [`BackingStore`]'s calls wait for their
//!   completion; [`Submit`]'s do not: librbd's callback wakes the task that awaits them, and
//!   the request owns its buffer until then (the volume's data path).
//! - Once the cluster has blocklisted this client (another host broke its lock), every error
//!   is [`store::Fenced`]: the volume above stops at once and never retries.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use store::submit::{Flushing, Owned, Submit, Transfer};
use store::{BackingStore, Discarded, Extent};

use crate::Image;

/// One RBD image as a backing store.
#[derive(Debug)]
pub struct RbdStore {
    image: Arc<Image>,
    location: PathBuf,
    object_size: u64,
    /// Taken to grow the image, so that two writers past the end do not shrink each other.
    growing: Mutex<()>,
}

impl RbdStore {
    /// The store over `image`.
    pub fn new(image: Image) -> io::Result<Self> {
        let location = PathBuf::from(format!("rbd:{}", image.spec()));
        Self::named(image, location)
    }

    /// The store over `image`, called `location` in messages (a staged image names the
    /// volume it becomes).
    pub fn named(image: Image, location: PathBuf) -> io::Result<Self> {
        let object_size = image.object_size()?.max(4096);
        Ok(Self {
            image: Arc::new(image),
            location,
            object_size,
            growing: Mutex::new(()),
        })
    }

    /// The image under the store.
    pub fn image(&self) -> &Image {
        &self.image
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        store::check_range(
            &self.location,
            offset,
            len,
            self.image.size().map_err(fence)?,
        )
    }
}

/// An error of this client, as [`store::Fenced`] if the cluster has blocklisted it.
fn fence(e: io::Error) -> io::Error {
    if crate::errno(&e) == Some(libc::ESHUTDOWN) {
        return io::Error::other(store::Fenced(format!(
            "{e}: the Ceph cluster has blocklisted this client, because another host broke \
             its lock on the image"
        )));
    }
    e
}

impl BackingStore for RbdStore {
    fn location(&self) -> &Path {
        &self.location
    }

    fn len(&self) -> io::Result<u64> {
        self.image.size().map_err(fence)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.image.read_at(buf, offset).map_err(fence)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past 2^64"))?;
        if end > self.image.size().map_err(fence)? {
            let _grow = self.growing.lock().unwrap_or_else(|p| p.into_inner());
            if end > self.image.size().map_err(fence)? {
                self.image.resize(end).map_err(fence)?;
            }
        }
        self.image.write_at(data, offset).map_err(fence)
    }

    fn flush(&self) -> io::Result<()> {
        self.image.flush().map_err(fence)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<Discarded> {
        self.discard_range(offset, len).map_err(fence)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.extents_of(offset, len).map_err(fence)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _grow = self.growing.lock().unwrap_or_else(|p| p.into_inner());
        self.image.resize(len).map_err(fence)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn submitter(&self) -> Option<&dyn Submit> {
        Some(self)
    }
}

/// The data path: submitted without waiting, completed by librbd's callback waking the task
/// that awaits. Ranges are not checked against the image's size here (librbd refuses a range
/// past the end): the volume above checked them against its own size.
impl Submit for RbdStore {
    fn read_owned(&self, buf: Owned, offset: u64) -> Transfer {
        let submitted = self.image.read_owned(buf, offset);
        Box::pin(async move {
            let (result, buf) = submitted.await;
            let mut buf = buf.unwrap_or_else(|| unreachable!("a read gives its buffer back"));
            let want = buf.bytes().len();
            let result = match result {
                Ok(n) if usize::try_from(n).ok() == Some(want) => Ok(()),
                Ok(n) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("RBD read of {want} bytes at {offset} returned {n}"),
                )),
                Err(e) => Err(fence(e)),
            };
            (result, buf)
        })
    }

    fn write_owned(&self, buf: Owned, offset: u64) -> Transfer {
        let submitted = self.image.write_owned(buf, offset);
        Box::pin(async move {
            let (result, buf) = submitted.await;
            let buf = buf.unwrap_or_else(|| unreachable!("a write gives its buffer back"));
            (result.map(drop).map_err(fence), buf)
        })
    }

    fn flush_owned(&self) -> Flushing {
        let submitted = self.image.flush_owned();
        Box::pin(async move { submitted.await.0.map(drop).map_err(fence) })
    }
}

impl RbdStore {
    fn discard_range(&self, offset: u64, len: u64) -> io::Result<Discarded> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let first = offset.next_multiple_of(self.object_size);
        let last = end - end % self.object_size;
        if first >= last {
            return Ok(Discarded::Unsupported);
        }
        if offset < first {
            self.image.write_zeroes(offset, first - offset)?;
        }
        self.image.discard(first, last - first)?;
        if last < end {
            self.image.write_zeroes(last, end - last)?;
        }
        Ok(Discarded::Hole)
    }

    fn extents_of(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut map = Vec::new();
        let mut at = offset;
        for (start, run) in self.image.allocated(offset, len)? {
            let (start, stop) = (start.max(at), (start + run).min(end));
            if stop <= start {
                continue;
            }
            if start > at {
                Extent::push_run(&mut map, start - at, false);
            }
            Extent::push_run(&mut map, stop - start, true);
            at = stop;
        }
        if at < end {
            Extent::push_run(&mut map, end - at, false);
        }
        Ok(map)
    }
}
