//! The contract suite of [`BackingStore`]: one set of checks that every engine must pass
//! (the file and memory engines in this crate's tests, and each engine added later). It
//! panics with what broke, so it is meant for tests; it needs a fresh, empty store.

use std::io::ErrorKind;
use std::sync::Arc;

use crate::submit::{Submit, block_on, downcast};
use crate::{BackingStore, Discarded};

const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn read(store: &dyn BackingStore, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xEE; len];
    store
        .read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("{}: read {offset}+{len}: {e}", store.location().display()));
    buf
}

fn covered(store: &dyn BackingStore, offset: u64, len: u64) -> Vec<crate::Extent> {
    let map = store.extents(offset, len).expect("extents");
    assert_eq!(
        map.iter().map(|e| e.len).sum::<u64>(),
        len,
        "the extents of {offset}+{len} do not cover it exactly: {map:?}"
    );
    assert!(map.iter().all(|e| e.len > 0), "an empty extent: {map:?}");
    map
}

/// Runs every check on `store`, which must be new and empty.
pub fn check(store: Arc<dyn BackingStore>) {
    let s = &*store;
    assert_eq!(s.len().expect("len"), 0, "a new store is empty");

    // Zeros where nothing was written; exact reads; nothing read past the end.
    s.set_len(4 * MIB).expect("set_len");
    assert_eq!(s.len().expect("len"), 4 * MIB);
    assert!(read(s, 0, 4096).iter().all(|&b| b == 0));
    assert!(read(s, 4 * MIB - 7, 7).iter().all(|&b| b == 0));
    let mut past = vec![0u8; 8];
    let err = s
        .read_at(&mut past, 4 * MIB - 4)
        .expect_err("a read past the end");
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");

    // Round trips at any alignment, and writes that do not disturb their neighbours.
    let a = pattern(10_000, 1);
    s.write_at(&a, 12_345).expect("write");
    assert_eq!(read(s, 12_345, a.len()), a);
    assert!(read(s, 12_345 - 100, 100).iter().all(|&b| b == 0));
    assert!(
        read(s, 12_345 + a.len() as u64, 100)
            .iter()
            .all(|&b| b == 0)
    );
    let b = pattern(512, 2);
    s.write_at(&b, 12_345 + 1000).expect("overwrite");
    let mut expect = a.clone();
    expect[1000..1512].copy_from_slice(&b);
    assert_eq!(read(s, 12_345, a.len()), expect);

    // A write past the end grows the store; the gap reads as zeros.
    let tail = pattern(100, 3);
    s.write_at(&tail, 5 * MIB).expect("write past the end");
    assert_eq!(s.len().expect("len"), 5 * MIB + 100);
    assert!(read(s, 4 * MIB, 4096).iter().all(|&b| b == 0));
    assert_eq!(read(s, 5 * MIB, 100), tail);

    // Discard: a hole that reads as zeros, or nothing changed when unsupported.
    let d = pattern(256 << 10, 4);
    s.write_at(&d, MIB).expect("write");
    let map = covered(s, MIB, 256 << 10);
    assert!(
        map.iter().all(|e| e.allocated),
        "written data shows as a hole: {map:?}"
    );
    match s.discard(MIB + (64 << 10), 128 << 10).expect("discard") {
        Discarded::Hole => {
            let got = read(s, MIB, 256 << 10);
            assert_eq!(
                got[..64 << 10],
                d[..64 << 10],
                "discard touched bytes before it"
            );
            assert!(
                got[64 << 10..192 << 10].iter().all(|&b| b == 0),
                "a discarded range reads non-zero"
            );
            assert_eq!(
                got[192 << 10..],
                d[192 << 10..],
                "discard touched bytes after it"
            );
            let map = covered(s, MIB, 256 << 10);
            assert!(
                map.iter().any(|e| !e.allocated),
                "a discarded range shows no hole: {map:?}"
            );
        }
        Discarded::Unsupported => assert_eq!(read(s, MIB, 256 << 10), d),
    }
    covered(s, 0, s.len().expect("len"));

    // A flush succeeds; shrinking drops bytes, growing again reads zeros there.
    s.flush().expect("flush");
    s.set_len(12_345 + 500).expect("shrink");
    assert_eq!(read(s, 12_345, 500), expect[..500]);
    s.set_len(4 * MIB).expect("grow");
    assert!(
        read(s, 12_345 + 500, 1000).iter().all(|&b| b == 0),
        "bytes came back after a shrink"
    );

    // Writers on disjoint ranges from many threads lose nothing.
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..32u64 {
                    let at = MIB + (u64::from(t) * 32 + i) * 4096;
                    store
                        .write_at(&pattern(4096, t ^ i as u8), at)
                        .expect("write");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    for t in 0..4u8 {
        for i in 0..32u64 {
            let at = MIB + (u64::from(t) * 32 + i) * 4096;
            assert_eq!(
                read(s, at, 4096),
                pattern(4096, t ^ i as u8),
                "thread {t} block {i}"
            );
        }
    }
    s.flush().expect("flush");

    if let Some(sub) = s.submitter() {
        check_submit(s, sub);
    }
}

/// The asynchronous data path ([`Submit`]): many requests in flight at once, buffers given
/// back, what they wrote seen by both interfaces, and errors past the end.
fn check_submit(s: &dyn BackingStore, sub: &dyn Submit) {
    let base = 2 * MIB;
    let writes: Vec<_> = (0..32u8)
        .map(|i| {
            sub.write_owned(
                Box::new(pattern(8192, i ^ 0x55)),
                base + u64::from(i) * 8192,
            )
        })
        .collect();
    for (i, w) in writes.into_iter().enumerate() {
        let (r, buf) = block_on(w);
        r.unwrap_or_else(|e| panic!("owned write {i}: {e}"));
        assert_eq!(*downcast::<Vec<u8>>(buf), pattern(8192, i as u8 ^ 0x55));
    }
    block_on(sub.flush_owned()).expect("owned flush");
    let reads: Vec<_> = (0..32u8)
        .map(|i| sub.read_owned(Box::new(vec![0xEE; 8192]), base + u64::from(i) * 8192))
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        let (res, buf) = block_on(r);
        res.unwrap_or_else(|e| panic!("owned read {i}: {e}"));
        let want = pattern(8192, i as u8 ^ 0x55);
        assert_eq!(*downcast::<Vec<u8>>(buf), want, "owned read {i}");
        assert_eq!(read(s, base + i as u64 * 8192, 8192), want, "read {i}");
    }
    let size = s.len().expect("len");
    let (past, buf) = block_on(sub.read_owned(Box::new(vec![0u8; 4096]), size - 1024));
    assert!(past.is_err(), "an owned read past the end succeeded");
    assert_eq!(downcast::<Vec<u8>>(buf).len(), 4096, "the buffer came back");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{Access, FileIo, FileStore};
    use crate::memory::MemStore;

    #[test]
    fn the_file_engine_keeps_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.luks");
        std::fs::File::create(&path).expect("create");
        let store = FileStore::open(&path, Access::ReadWrite).expect("open");
        check(Arc::new(store));
    }

    /// Direct mode: the contract's requests (many of them unaligned, through the buffered
    /// descriptor), then aligned requests that go straight to the disk, read back through
    /// the page cache too, and an unaligned write inside them read back directly (the two
    /// descriptors see one file).
    #[test]
    fn the_file_engine_in_direct_mode_keeps_the_contract() {
        use crate::file::FileIo;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.luks");
        std::fs::File::create(&path).expect("create");
        let open = || {
            let s = FileStore::open(&path, Access::ReadWrite)
                .expect("open")
                .with_io(FileIo::Direct)
                .expect("O_DIRECT");
            assert_eq!(
                s.io(),
                FileIo::Direct,
                "the filesystem of {} has no O_DIRECT (tmpfs?): set TMPDIR to a directory on \
                 ext4 or xfs to test direct mode",
                dir.path().display()
            );
            s
        };
        check(Arc::new(open()));
        std::fs::write(&path, b"").expect("truncate");
        let s = open();
        // An aligned buffer: 64 KiB inside a larger vector.
        let mut raw = vec![0u8; (128 << 10) + 4096];
        let at = raw.as_ptr().align_offset(4096);
        let data = pattern(64 << 10, 9);
        raw[at..at + data.len()].copy_from_slice(&data);
        s.write_at(&raw[at..at + data.len()], 1 << 20)
            .expect("aligned write");
        s.flush().expect("flush");
        assert_eq!(s.len().expect("len"), (1 << 20) + (64 << 10));
        let mut back = vec![0u8; (64 << 10) + 4096];
        let at2 = back.as_ptr().align_offset(4096);
        s.read_at(&mut back[at2..at2 + (64 << 10)], 1 << 20)
            .expect("aligned read");
        assert_eq!(back[at2..at2 + (64 << 10)], data[..]);
        let buffered = std::fs::read(&path).expect("read through the page cache");
        assert_eq!(
            buffered[1 << 20..],
            data[..],
            "the page cache sees another file"
        );
        // A 100-byte write in the middle of the aligned data (buffered), read back directly.
        s.write_at(&[7u8; 100], (1 << 20) + 1000)
            .expect("unaligned write");
        let mut expect = data.clone();
        expect[1000..1100].fill(7);
        assert_eq!(read(&s, 1 << 20, 64 << 10), expect);
    }

    #[test]
    fn the_memory_engine_keeps_the_contract() {
        check(Arc::new(MemStore::new("contract")));
    }

    #[test]
    fn the_memory_engine_completing_on_threads_keeps_the_contract() {
        check(Arc::new(MemStore::new("contract").completing_on_threads()));
    }

    #[test]
    fn a_file_locked_for_writing_refuses_a_second_writer_and_readers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.luks");
        std::fs::File::create(&path).expect("create");
        let _w = FileStore::open(&path, Access::ReadWrite).expect("open");
        for access in [Access::ReadWrite, Access::ReadOnly] {
            assert!(matches!(
                FileStore::open(&path, access),
                Err(crate::file::OpenError::Locked)
            ));
        }
        FileStore::open(&path, Access::Inspect).expect("inspect needs no lock");
    }

    #[test]
    fn a_closed_store_releases_its_lock_while_a_copy_of_its_descriptor_lives() {
        // A process forked by another thread holds a copy of every descriptor until it
        // execs; a duplicate stands for it here.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.luks");
        std::fs::File::create(&path).expect("create");
        let w = FileStore::open(&path, Access::ReadWrite).expect("open");
        let copy = w.file().try_clone().expect("dup");
        drop(w);
        FileStore::open(&path, Access::ReadWrite).expect("reopen after close");
        drop(copy);
    }

    #[test]
    fn a_file_reads_without_waiting_only_what_the_page_cache_holds() {
        use std::os::fd::AsFd;
        // On a disk filesystem: tmpfs has nothing but its page cache.
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir in /var/tmp");
        let path = dir.path().join("v.luks");
        std::fs::write(&path, pattern(1 << 20, 9)).expect("write");
        let s = FileStore::open(&path, Access::ReadWrite).expect("open");
        s.flush().expect("fdatasync");
        let mut buf = vec![0u8; 256 << 10];
        // Dropped from the page cache (clean pages go at once): it would wait.
        rustix::fs::fadvise(s.file().as_fd(), 0, None, rustix::fs::Advice::DontNeed)
            .expect("fadvise");
        assert!(!s.try_read_at(&mut buf, 0).expect("try_read_at"));
        // Read once, it is in the page cache: served, and right.
        s.read_at(&mut buf, 0).expect("read");
        buf.fill(0);
        assert!(s.try_read_at(&mut buf, 0).expect("try_read_at"));
        assert_eq!(buf, pattern(1 << 20, 9)[..256 << 10]);
        // Past the end: not served here (the blocking read reports it).
        assert!(
            !s.try_read_at(&mut buf, (1 << 20) - 4096)
                .expect("try_read_at")
        );
        // Direct mode reads around the page cache: never served here.
        let d = s.with_io(FileIo::Direct).expect("direct");
        assert_eq!(d.io(), FileIo::Direct, "/var/tmp refused O_DIRECT");
        assert!(!d.try_read_at(&mut buf, 0).expect("try_read_at"));
    }

    #[test]
    fn a_memory_crash_keeps_exactly_what_was_flushed() {
        let s = MemStore::new("crash");
        s.write_at(&pattern(4096, 1), 0).expect("write");
        s.flush().expect("flush");
        s.write_at(&pattern(4096, 2), 0).expect("overwrite");
        s.write_at(&pattern(4096, 3), 1 << 20).expect("write");
        let after = s.crashed();
        assert_eq!(after.len().expect("len"), 4096, "unflushed growth survived");
        assert_eq!(read(&after, 0, 4096), pattern(4096, 1));
        // The live store still has the unflushed writes.
        assert_eq!(read(&s, 0, 4096), pattern(4096, 2));
    }
}
