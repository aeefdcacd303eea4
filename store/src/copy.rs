//! Copying a whole store into a new one: what a catalog does for a snapshot or a rebuild
//! from one when its engine cannot share blocks, and what works between any two engines.
//!
//! The copy is sparse: it walks the source's allocation map and copies only the ranges that
//! hold data, so the copy of a thin volume stays thin. It reports to a [`Watch`] and asks it
//! between pieces of at most [`PIECE`] bytes whether to go on.

use std::io;

use crate::BackingStore;

/// Largest piece copied between two checks of the [`Watch`].
pub const PIECE: usize = 1 << 20;

/// Allocation maps are asked for in windows of this many bytes (a fragmented store's map of
/// a whole volume could be long).
const WINDOW: u64 = 1 << 30;

/// Who follows a long copy: told the phase and the bytes done, asked whether to go on.
pub trait Watch {
    /// Enters a phase (`cloning`, `syncing`) with `total` bytes to do (0: unknown).
    fn phase(&self, phase: &'static str, total: u64);
    /// Adds bytes done (holes count: they are done without being copied).
    fn add(&self, bytes: u64);
    /// `Err` to stop (the copy returns that error and leaves what it wrote for the caller to
    /// discard).
    fn check(&self) -> io::Result<()>;
}

/// A watch that reports nothing and never stops a copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unwatched;

impl Watch for Unwatched {
    fn phase(&self, _: &'static str, _: u64) {}
    fn add(&self, _: u64) {}
    fn check(&self) -> io::Result<()> {
        Ok(())
    }
}

/// How a catalog made a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// The copy shares the source's blocks, copy on write (a reflink between two files).
    Reflink,
    /// The data ranges were copied, holes kept.
    Copy,
    /// The engine took a snapshot of the source in place (an RBD snapshot): nothing copied.
    Snapshot,
}

impl CloneMethod {
    /// `reflink`, `copy` or `snapshot`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::Copy => "copy",
            CloneMethod::Snapshot => "snapshot",
        }
    }
}

/// An engine's faster way to copy one piece between two of its own stores (for files:
/// `copy_file_range`): given an offset and a length, how many bytes it copied, 0 when it
/// cannot (the piece is then read and written).
pub type CopyPiece<'a> = &'a dyn Fn(u64, usize) -> io::Result<usize>;

/// Copies `src` into `dst` (empty): sets `dst`'s length to `src`'s and copies the allocated
/// ranges, in phase `cloning`, then flushes `dst` (phase `syncing`). `src` must not change
/// during the copy.
pub fn sparse(
    src: &dyn BackingStore,
    dst: &dyn BackingStore,
    watch: &dyn Watch,
    fast: Option<CopyPiece<'_>>,
) -> io::Result<()> {
    let len = src.len()?;
    watch.phase("cloning", len);
    dst.set_len(len)?;
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0u64;
    while at < len {
        watch.check()?;
        for run in src.extents(at, (len - at).min(WINDOW))? {
            let end = at + run.len;
            if !run.allocated {
                watch.add(run.len);
                at = end;
                continue;
            }
            while at < end {
                watch.check()?;
                let n = (end - at).min(PIECE as u64) as usize;
                let copied = match fast {
                    Some(f) => f(at, n)?,
                    None => 0,
                };
                let copied = if copied == 0 {
                    buf.resize(n, 0);
                    src.read_at(&mut buf[..n], at)?;
                    dst.write_at(&buf[..n], at)?;
                    n
                } else {
                    copied
                };
                at += copied as u64;
                watch.add(copied as u64);
            }
        }
    }
    watch.phase("syncing", 0);
    dst.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{CHUNK, MemStore};
    use std::cell::Cell;

    #[test]
    fn a_copy_keeps_data_and_holes_and_stops_when_asked() {
        let src = MemStore::new("test");
        src.set_len(8 * CHUNK).expect("size");
        src.write_at(b"start", 0).expect("write");
        src.write_at(b"middle", 5 * CHUNK + 7).expect("write");
        let dst = MemStore::new("test");
        sparse(&src, &dst, &Unwatched, None).expect("copy");
        assert_eq!(dst.len().expect("len"), 8 * CHUNK);
        let mut buf = [0u8; 6];
        dst.read_at(&mut buf, 5 * CHUNK + 7).expect("read");
        assert_eq!(&buf, b"middle");
        assert_eq!(
            dst.extents(0, 8 * CHUNK).expect("map"),
            src.extents(0, 8 * CHUNK).expect("map"),
            "the copy is as sparse as its source"
        );

        // A watch that says stop after the first piece stops the copy with its error.
        struct StopAfter(Cell<u32>);
        impl Watch for StopAfter {
            fn phase(&self, _: &'static str, _: u64) {}
            fn add(&self, _: u64) {}
            fn check(&self) -> io::Result<()> {
                let n = self.0.get();
                self.0.set(n + 1);
                if n >= 1 {
                    Err(io::Error::new(io::ErrorKind::Interrupted, "stop"))
                } else {
                    Ok(())
                }
            }
        }
        let err = sparse(&src, &MemStore::new("test"), &StopAfter(Cell::new(0)), None)
            .expect_err("stopped");
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    }
}
