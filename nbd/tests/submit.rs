//! Devices that complete requests later ([`BlockDevice::submit`]), driven by a real client
//! (nbdsh, libnbd): with one I/O thread, many requests are in flight at once, each completed
//! from another thread; a request the device drops is answered with an error; a request the
//! device hands back runs as a blocking call.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nbd::{BlockDevice, BlockSizes, DeviceError, Extent, Io, Limits, Submission};
use support::{MemDevice, MemRegistry, TestServer, nbdsh_script};

const MIB: u64 = 1 << 20;

/// A [`MemDevice`] behind the submission interface. Submissions are parked until `batch` of
/// them are waiting (or a second has passed), then completed together on a thread of their
/// own, as an engine's completions arrive on its threads. Requests not a multiple of 512
/// bytes are handed back; requests at or above `drop_from` are dropped uncompleted.
struct Submitting {
    inner: MemDevice,
    batch: usize,
    drop_from: u64,
    parked: Mutex<Vec<Submission>>,
    arrived: Condvar,
    /// Most submissions parked at once.
    most_parked: AtomicUsize,
    handed_back: AtomicUsize,
}

impl Submitting {
    fn new(size: u64, batch: usize) -> Arc<Self> {
        let dev = Arc::new(Self {
            inner: MemDevice::new(size),
            batch,
            drop_from: size - MIB,
            parked: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            most_parked: AtomicUsize::new(0),
            handed_back: AtomicUsize::new(0),
        });
        // The completer: waits for a batch (at most a second), then completes it.
        let weak = Arc::downgrade(&dev);
        std::thread::spawn(move || {
            loop {
                let Some(dev) = weak.upgrade() else { return };
                let ready: Vec<Submission> = {
                    let g = dev.parked.lock().unwrap();
                    let (mut g, _) = dev
                        .arrived
                        .wait_timeout_while(g, Duration::from_secs(1), |p| p.len() < dev.batch)
                        .unwrap();
                    g.drain(..).collect()
                };
                for mut s in ready {
                    let r = match s.io() {
                        Io::Read { offset } => dev.inner.read(offset, s.data()),
                        Io::Write { offset, fua } => dev.inner.write(offset, s.data(), fua),
                        Io::Flush => dev.inner.flush(),
                    };
                    s.complete(r);
                }
            }
        });
        dev
    }
}

impl BlockDevice for Submitting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), DeviceError> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), DeviceError> {
        self.inner.trim(offset, length, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, t: bool, fua: bool) -> Result<(), DeviceError> {
        self.inner.write_zeroes(o, l, t, fua)
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, DeviceError> {
        self.inner.block_status(offset, length)
    }
    fn submits(&self) -> bool {
        true
    }
    fn submit(self: Arc<Self>, mut s: Submission) -> Result<(), Submission> {
        if !s.data().len().is_multiple_of(512) {
            self.handed_back.fetch_add(1, Ordering::SeqCst);
            return Err(s);
        }
        if let Io::Read { offset } | Io::Write { offset, .. } = s.io()
            && offset >= self.drop_from
        {
            drop(s);
            return Ok(());
        }
        let mut parked = self.parked.lock().unwrap();
        parked.push(s);
        self.most_parked.fetch_max(parked.len(), Ordering::SeqCst);
        self.arrived.notify_all();
        Ok(())
    }
}

#[test]
fn one_io_thread_keeps_many_submitted_requests_in_flight() {
    let dev = Submitting::new(64 * MIB, 32);
    let reg = MemRegistry::new();
    reg.add("disk", "submitting", dev.clone());
    let limits = Limits {
        io_threads: 1,
        ..Limits::default()
    };
    let ts = TestServer::start(reg, limits);
    // 32 writes in flight, then a flush, then 32 reads in flight; then an unaligned write
    // and read (handed back, blocking calls) and a read the device drops (ESHUTDOWN).
    let script = r#"
import os, errno
import nbd
h = nbd.NBD()
h.connect_uri(os.environ["DISK"])
def data(i):
    return bytes([(i * 7 + j) % 251 for j in range(65536)])
def drain():
    while h.aio_in_flight() > 0:
        h.poll(-1)
for i in range(32):
    h.aio_pwrite(data(i), i * 65536)
drain()
h.flush()
bufs = [nbd.Buffer(65536) for _ in range(32)]
for i, b in enumerate(bufs):
    h.aio_pread(b, i * 65536)
drain()
for i, b in enumerate(bufs):
    assert b.to_bytearray() == data(i), "read %d differs" % i
h.pwrite(b"odd bytes", 100)
assert h.pread(9, 100) == b"odd bytes"
try:
    h.pread(4096, h.get_size() - 4096)
    raise AssertionError("a dropped request succeeded")
except nbd.Error as e:
    assert e.errno == "ESHUTDOWN", e
assert h.pread(65536, 65536) == data(1)
h.shutdown()
print("submission checks passed")
"#;
    nbdsh_script(&ts.uri("disk"), script, "submission checks passed");
    assert_eq!(
        dev.most_parked.load(Ordering::SeqCst),
        32,
        "the device never had 32 requests at once: the I/O thread waited for each"
    );
    assert_eq!(
        dev.handed_back.load(Ordering::SeqCst),
        2,
        "the unaligned write and read"
    );
}
