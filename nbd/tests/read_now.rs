//! Reads a device can serve without waiting ([`BlockDevice::try_read`]) are answered on the
//! connection's task, driven by a real client (nbdsh, libnbd): the data is right; a read the
//! device would wait for, and one too large to serve on the spot, go to the I/O threads; a
//! failed or panicking `try_read` is an error reply, and the connection goes on.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nbd::{BlockDevice, BlockSizes, DeviceError, Errno, Extent, Limits};
use support::{MemDevice, MemRegistry, TestServer, nbdsh_script};

const MIB: u64 = 1 << 20;
/// Below: "in memory", served by `try_read`.
const WARM_END: u64 = 8 * MIB;
/// `try_read` fails here.
const FAILING: u64 = 8 * MIB;
/// `try_read` panics here.
const PANICKING: u64 = 9 * MIB;

/// A [`MemDevice`] whose first 8 MiB are "in memory", with a failing and a panicking
/// `try_read` at 8 and 9 MiB; from 10 MiB on, "on disk": `try_read` says it would wait.
struct Warm {
    inner: MemDevice,
    served_now: AtomicUsize,
    blocking_reads: AtomicUsize,
}

impl BlockDevice for Warm {
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
        self.blocking_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read(offset, buf)
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, DeviceError> {
        match offset {
            o if o + buf.len() as u64 <= WARM_END => {
                self.inner.read(offset, buf)?;
                self.served_now.fetch_add(1, Ordering::SeqCst);
                Ok(true)
            }
            o if o == FAILING => Err(DeviceError::new(Errno::Eio, "medium error")),
            o if o == PANICKING => panic!("try_read panicked on purpose"),
            _ => Ok(false),
        }
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
}

#[test]
fn reads_in_memory_are_served_on_the_spot_and_the_rest_by_the_io_threads() {
    let dev = Arc::new(Warm {
        inner: MemDevice::new(16 * MIB),
        served_now: AtomicUsize::new(0),
        blocking_reads: AtomicUsize::new(0),
    });
    let reg = MemRegistry::new();
    reg.add("disk", "warm", dev.clone());
    let ts = TestServer::start(reg, Limits::default());
    let script = r#"
import os
import nbd
h = nbd.NBD()
h.connect_uri(os.environ["DISK"])
MIB = 1 << 20
def data(i, n):
    return bytes([(i * 13 + j) % 251 for j in range(n)])
# 32 reads of 64 KiB in flight from memory, then 8 from "disk", checked.
for i in range(32):
    h.pwrite(data(i, 65536), i * 65536)
for i in range(8):
    h.pwrite(data(100 + i, 65536), 10 * MIB + i * 65536)
bufs = [(nbd.Buffer(65536), i * 65536, i) for i in range(32)]
bufs += [(nbd.Buffer(65536), 10 * MIB + i * 65536, 100 + i) for i in range(8)]
for b, off, _ in bufs:
    h.aio_pread(b, off)
while h.aio_in_flight() > 0:
    h.poll(-1)
for b, off, i in bufs:
    assert b.to_bytearray() == data(i, 65536), "read at %d differs" % off
# 2 MiB from memory: too large to serve on the spot.
big = b"".join(data(i, 65536) for i in range(32))
assert h.pread(2 * MIB, 0) == big
# A failed and a panicking try_read: EIO, and the connection goes on.
for off in (8 * MIB, 9 * MIB):
    try:
        h.pread(4096, off)
        raise AssertionError("a failed read at %d succeeded" % off)
    except nbd.Error as e:
        assert e.errno == "EIO", e
assert h.pread(65536, 65536) == data(1, 65536)
h.shutdown()
print("read checks passed")
"#;
    nbdsh_script(&ts.uri("disk"), script, "read checks passed");
    assert_eq!(
        dev.served_now.load(Ordering::SeqCst),
        33,
        "the 32 reads in memory and the last one"
    );
    assert_eq!(
        dev.blocking_reads.load(Ordering::SeqCst),
        9,
        "the 8 reads from disk and the 2 MiB one"
    );
}
