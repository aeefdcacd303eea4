//! Replies: encoded by whoever finishes a request, written without waiting.
//!
//! A finished request is pushed on its connection's reply queue. If nobody is writing, the
//! pushing thread (usually an I/O thread, sometimes the reader for a refused request) becomes
//! the writer: it writes everything queued, including replies other threads pushed
//! meanwhile, with non-blocking vectored writes. Only when the socket is full does it hand
//! the rest to the connection's writer task, which waits for the socket to drain. This saves
//! a thread wake-up per reply, and replies still go out whole and one after another.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use super::ConnEntry;
use super::pool::PooledBuf;
use crate::device::Errno;
use crate::proto::{
    self, BlockDescriptor, ChunkPayload, SimpleReplyHeader, StructuredReplyHeader, reply_flags,
    reply_type,
};

/// Slices handed to one `writev` at most (well under IOV_MAX = 1024).
const MAX_SLICES: usize = 128;
/// Rounds of writing a sending thread does before leaving the rest to the writer task.
const FLUSH_ROUNDS: usize = 4;
/// After a stop, how long a client gets to read its pending replies before they are dropped.
const DRAIN_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The writing half of a transport, usable from any thread: non-blocking writes plus a way
/// to wait until writing can make progress. Implemented by the unix and TCP socket halves,
/// and by a TLS session ([`super::tls`]), which takes bytes into its own buffer of records.
pub(crate) trait ReplyWriter: Send + Sync + 'static {
    /// Takes what it can now (the socket, or a buffer that [`try_flush`](Self::try_flush)
    /// empties); `WouldBlock` if nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;
    /// Sends what was taken but is still buffered; `WouldBlock` while some is left. A
    /// socket buffers nothing of its own.
    fn try_flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// Resolves when a write may make progress.
    fn writable(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_;
    /// Ends the stream in order once every reply is out (TLS: close_notify).
    fn finish(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_ {
        std::future::ready(Ok(()))
    }
}

impl ReplyWriter for tokio::net::unix::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_ {
        tokio::net::unix::OwnedWriteHalf::writable(self)
    }
}

impl ReplyWriter for tokio::net::tcp::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_ {
        tokio::net::tcp::OwnedWriteHalf::writable(self)
    }
}

/// Encoded header bytes of a reply; the common ones live inline (no allocation).
enum Header {
    Inline { bytes: [u8; 32], len: u8 },
    Heap(Vec<u8>),
}

impl Header {
    fn as_slice(&self) -> &[u8] {
        match self {
            Header::Inline { bytes, len } => &bytes[..usize::from(*len)],
            Header::Heap(v) => v,
        }
    }

    fn from_array<const N: usize>(a: [u8; N]) -> Self {
        let mut bytes = [0; 32];
        bytes[..N].copy_from_slice(&a);
        Header::Inline {
            bytes,
            // N <= 32 for every caller.
            len: u8::try_from(N).unwrap_or(32),
        }
    }
}

/// A reply ready to be written: header bytes, optional READ data, and the budget it holds
/// (released once written).
pub(crate) struct Completion<P = super::flow::Permit> {
    header: Header,
    payload: Option<PooledBuf>,
    _permit: Option<P>,
}

impl<P> Completion<P> {
    fn simple_header(handle: u64, error: u32) -> Header {
        Header::from_array(SimpleReplyHeader { error, handle }.to_bytes())
    }

    /// Success without data.
    pub(crate) fn ok(handle: u64, permit: Option<P>) -> Self {
        Self {
            header: Self::simple_header(handle, 0),
            payload: None,
            _permit: permit,
        }
    }

    /// READ data (None for a zero-length read).
    pub(crate) fn data(
        handle: u64,
        offset: u64,
        buf: Option<PooledBuf>,
        structured: bool,
        permit: Option<P>,
    ) -> Self {
        let header = match (&buf, structured) {
            (_, false) => Self::simple_header(handle, 0),
            (Some(b), true) => Header::from_array(proto::offset_data_header(
                handle,
                reply_flags::DONE,
                offset,
                // At most the maximum block size (<= 1 GiB).
                u32::try_from(b.as_slice().len()).unwrap_or(u32::MAX),
            )),
            (None, true) => Header::from_array(
                StructuredReplyHeader {
                    flags: reply_flags::DONE,
                    reply_type: reply_type::NONE,
                    handle,
                    length: 0,
                }
                .to_bytes(),
            ),
        };
        Self {
            header,
            payload: buf,
            _permit: permit,
        }
    }

    /// A failure: a simple reply with the errno, or an ERROR / ERROR_OFFSET chunk with a
    /// message when structured replies were negotiated.
    pub(crate) fn error(
        handle: u64,
        structured: bool,
        errno: Errno,
        message: &str,
        offset: Option<u64>,
        permit: Option<P>,
    ) -> Self {
        let error = errno as u32;
        let header = if structured {
            let message = message.to_owned();
            let chunk = match offset {
                Some(offset) => ChunkPayload::ErrorOffset {
                    error,
                    message,
                    offset,
                },
                None => ChunkPayload::Error { error, message },
            };
            let mut v = Vec::with_capacity(64);
            chunk.encode(handle, reply_flags::DONE, &mut v);
            Header::Heap(v)
        } else {
            Self::simple_header(handle, error)
        };
        Self {
            header,
            payload: None,
            _permit: permit,
        }
    }

    /// BLOCK_STATUS extents of `base:allocation` (structured replies only).
    pub(crate) fn block_status(
        handle: u64,
        context_id: u32,
        descriptors: &[BlockDescriptor],
        permit: Option<P>,
    ) -> Self {
        let payload_len = 4 + 8 * descriptors.len();
        let mut v = Vec::with_capacity(proto::STRUCTURED_REPLY_HEADER_LEN + payload_len);
        StructuredReplyHeader {
            flags: reply_flags::DONE,
            reply_type: reply_type::BLOCK_STATUS,
            handle,
            // Descriptors are capped far below 2^29.
            length: u32::try_from(payload_len).unwrap_or(u32::MAX),
        }
        .encode(&mut v);
        v.extend_from_slice(&context_id.to_be_bytes());
        for d in descriptors {
            v.extend_from_slice(&d.length.to_be_bytes());
            v.extend_from_slice(&d.flags.to_be_bytes());
        }
        Self {
            header: Header::Heap(v),
            payload: None,
            _permit: permit,
        }
    }

    fn len(&self) -> usize {
        self.header.as_slice().len() + self.payload.as_ref().map_or(0, |p| p.as_slice().len())
    }

    /// Pushes this reply's bytes from `skip` on; returns false if `out` is full.
    fn push_slices<'a>(&'a self, skip: usize, out: &mut [IoSlice<'a>], n: &mut usize) -> bool {
        let h = self.header.as_slice();
        let p = self.payload.as_ref().map_or(&[][..], |p| p.as_slice());
        let parts: [&[u8]; 2] = if skip < h.len() {
            [&h[skip..], p]
        } else {
            [&p[skip - h.len()..], &[]]
        };
        let needed = parts.iter().filter(|s| !s.is_empty()).count();
        if *n + needed > out.len() {
            return false;
        }
        for s in parts.into_iter().filter(|s| !s.is_empty()) {
            out[*n] = IoSlice::new(s);
            *n += 1;
        }
        true
    }
}

/// Who may write to the socket right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Nobody: the next sender writes.
    Nobody,
    /// A sender is writing; others only queue.
    Thread,
    /// The socket was full: the writer task writes; senders only queue.
    Task,
}

struct State<P> {
    pending: VecDeque<Completion<P>>,
    /// Bytes of `pending[0]` already written.
    skip: usize,
    /// An empty queue kept to swap with `pending` (no allocation per flush).
    spare: VecDeque<Completion<P>>,
    owner: Owner,
    /// No more replies will come (every sender is gone).
    closed: bool,
    /// Writing failed: replies are dropped.
    broken: bool,
}

/// Result of writing what can be written now.
enum Progress {
    Done,
    Blocked,
}

/// One connection's reply queue and writer.
pub(crate) struct Replies<W, P = super::flow::Permit> {
    wr: W,
    state: Mutex<State<P>>,
    wake: Notify,
    entry: Arc<ConnEntry>,
    /// How long the socket may stay full before the client counts as not reading (None: as
    /// long as it takes).
    reply_timeout: Option<Duration>,
}

/// Object-safe face of [`Replies`], so jobs of every transport share one type.
pub(crate) trait ReplySink<P>: Send + Sync {
    /// Queues a reply and writes it now if nobody else is writing.
    fn send(&self, c: Completion<P>);
    /// No more replies will be sent; the writer task finishes what is queued and ends.
    fn close(&self);
}

impl<W: ReplyWriter, P: Send + 'static> Replies<W, P> {
    pub(crate) fn new(wr: W, entry: Arc<ConnEntry>, reply_timeout: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            wr,
            state: Mutex::new(State {
                pending: VecDeque::with_capacity(64),
                skip: 0,
                spare: VecDeque::with_capacity(64),
                owner: Owner::Nobody,
                closed: false,
                broken: false,
            }),
            wake: Notify::new(),
            entry,
            reply_timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // Every critical section leaves the state consistent (queue moves and flags).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `batch` (first reply from `skip`) as far as the socket takes it now, dropping
    /// each reply once written (which frees its buffer and budget).
    fn write_now(
        &self,
        batch: &mut VecDeque<Completion<P>>,
        skip: &mut usize,
    ) -> std::io::Result<Progress> {
        loop {
            if batch.is_empty() {
                return match self.wr.try_flush() {
                    Ok(()) => Ok(Progress::Done),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Progress::Blocked),
                    Err(e) => Err(e),
                };
            }
            let result = {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut n = 0;
                let mut first_skip = *skip;
                for c in batch.iter() {
                    if !c.push_slices(first_skip, &mut slices, &mut n) {
                        break;
                    }
                    first_skip = 0;
                }
                self.wr.try_write_vectored(&slices[..n])
            };
            let written = match result {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok(Progress::Blocked);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut left = written;
            while left > 0 {
                let Some(first) = batch.front() else { break };
                let rest = first.len() - *skip;
                if left >= rest {
                    left -= rest;
                    *skip = 0;
                    batch.pop_front();
                } else {
                    *skip += left;
                    left = 0;
                }
            }
        }
    }

    /// Takes the queue for writing (the caller owns the socket).
    fn take(st: &mut State<P>) -> (VecDeque<Completion<P>>, usize) {
        let mut batch = std::mem::take(&mut st.spare);
        std::mem::swap(&mut batch, &mut st.pending);
        (batch, std::mem::take(&mut st.skip))
    }

    /// Puts back what is left of `batch`, before anything queued meanwhile.
    fn requeue(st: &mut State<P>, batch: VecDeque<Completion<P>>, skip: usize) {
        let mut newer = std::mem::replace(&mut st.pending, batch);
        st.pending.extend(newer.drain(..));
        st.spare = newer;
        st.skip = skip;
    }

    /// Writes until done or blocked; on return the socket's owner is settled. A thread
    /// writes a few rounds at most (other threads may keep queueing), then hands the rest to
    /// the writer task and goes back to device calls.
    fn flush<'a>(&'a self, mut st: MutexGuard<'a, State<P>>) {
        for _ in 0..FLUSH_ROUNDS {
            let (mut batch, mut skip) = Self::take(&mut st);
            drop(st);
            let r = self.write_now(&mut batch, &mut skip);
            st = self.lock();
            match r {
                Ok(Progress::Done) => {
                    st.spare = batch;
                    if st.pending.is_empty() {
                        st.owner = Owner::Nobody;
                        return;
                    }
                }
                Ok(Progress::Blocked) => {
                    Self::requeue(&mut st, batch, skip);
                    break;
                }
                Err(e) => {
                    self.fail(st, batch, &e);
                    return;
                }
            }
        }
        st.owner = Owner::Task;
        drop(st);
        self.wake.notify_one();
    }

    fn fail(
        &self,
        mut st: MutexGuard<'_, State<P>>,
        batch: VecDeque<Completion<P>>,
        e: &std::io::Error,
    ) {
        st.broken = true;
        st.owner = Owner::Nobody;
        let dropped = std::mem::take(&mut st.pending);
        drop(st);
        drop(batch);
        drop(dropped);
        debug!("writing replies failed, dropping the rest: {e}");
        self.entry.stop();
        self.wake.notify_one();
    }

    /// The writer task: writes when the socket was full, ends once closed and flushed.
    pub(crate) async fn run_writer(self: Arc<Self>) {
        let mut stop = self.entry.stop_receiver();
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (taken, done) = {
                let mut st = self.lock();
                if st.broken {
                    return;
                }
                let done = st.closed && st.owner == Owner::Nobody && st.pending.is_empty();
                let taken = (!done && st.owner == Owner::Task).then(|| Self::take(&mut st));
                (taken, done)
            };
            if done {
                let finished = tokio::time::timeout(DRAIN_WRITE_TIMEOUT, self.wr.finish());
                if let Ok(Err(e)) = finished.await {
                    debug!("ending the stream failed: {e}");
                }
                return;
            }
            let Some((mut batch, mut skip)) = taken else {
                notified.await;
                continue;
            };
            loop {
                match self.write_now(&mut batch, &mut skip) {
                    Ok(Progress::Done) => {
                        let more = {
                            let mut st = self.lock();
                            st.spare = std::mem::take(&mut batch);
                            if st.pending.is_empty() {
                                st.owner = Owner::Nobody;
                                None
                            } else {
                                Some(Self::take(&mut st))
                            }
                        };
                        match more {
                            Some(next) => (batch, skip) = next,
                            None => break,
                        }
                    }
                    Ok(Progress::Blocked) => {
                        if let Err(e) = self.wait_writable(&mut stop).await {
                            let st = self.lock();
                            self.fail(st, std::mem::take(&mut batch), &e);
                            return;
                        }
                    }
                    Err(e) => {
                        let st = self.lock();
                        self.fail(st, std::mem::take(&mut batch), &e);
                        return;
                    }
                }
            }
        }
    }

    /// Waits for the socket: at most the reply timeout, and once the connection is stopping,
    /// the drain's bounded time.
    async fn wait_writable(&self, stop: &mut watch::Receiver<bool>) -> std::io::Result<()> {
        let w = self.wr.writable();
        tokio::pin!(w);
        let unread = async {
            match self.reply_timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut w => r,
            () = unread => {
                warn!(
                    "client read none of its replies for {:?} (limits.reply_timeout_secs); \
                     closing the connection, which frees its share of the in-flight budget",
                    self.reply_timeout.unwrap_or_default()
                );
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read its replies",
                ))
            }
            _ = super::flow::stopped(stop) => {
                match tokio::time::timeout(DRAIN_WRITE_TIMEOUT, &mut w).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client did not read its replies while the connection drained",
                    )),
                }
            }
        }
    }
}

impl<W: ReplyWriter, P: Send + 'static> ReplySink<P> for Replies<W, P> {
    fn send(&self, c: Completion<P>) {
        let mut st = self.lock();
        if st.broken {
            drop(st);
            drop(c);
            return;
        }
        st.pending.push_back(c);
        if st.owner != Owner::Nobody {
            return;
        }
        st.owner = Owner::Thread;
        self.flush(st);
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::device::Peer;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Takes at most `cap` bytes per call and only when `open`; records everything.
    struct Pipe {
        out: Mutex<Vec<u8>>,
        cap: AtomicUsize,
        open: Notify,
    }

    impl ReplyWriter for Arc<Pipe> {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            let cap = self.cap.load(Ordering::SeqCst);
            if cap == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let mut out = self.out.lock().unwrap();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(cap - n);
                out.extend_from_slice(&b[..take]);
                n += take;
                if n == cap {
                    break;
                }
            }
            Ok(n)
        }
        async fn writable(&self) -> std::io::Result<()> {
            while self.cap.load(Ordering::SeqCst) == 0 {
                self.open.notified().await;
            }
            Ok(())
        }
    }

    fn entry() -> Arc<ConnEntry> {
        Arc::new(ConnEntry::new(
            1,
            "x".into(),
            Peer::Unix {
                pid: None,
                uid: 0,
                gid: 0,
            },
            None,
        ))
    }

    #[tokio::test]
    async fn replies_stay_whole_and_in_order_across_partial_writes() {
        let pipe = Arc::new(Pipe {
            out: Mutex::new(Vec::new()),
            cap: AtomicUsize::new(7),
            open: Notify::new(),
        });
        let r: Arc<Replies<Arc<Pipe>, ()>> = Replies::new(pipe.clone(), entry(), None);
        let writer = tokio::spawn(r.clone().run_writer());
        let mut expected = Vec::new();
        for h in 0..50u64 {
            let c = Completion::ok(h, None);
            expected.extend_from_slice(c.header.as_slice());
            r.send(c);
            if h == 10 {
                // The socket fills: the writer task takes over until it drains.
                pipe.cap.store(0, Ordering::SeqCst);
            }
            if h == 30 {
                pipe.cap.store(5, Ordering::SeqCst);
                pipe.open.notify_one();
            }
        }
        r.close();
        writer.await.unwrap();
        assert_eq!(*pipe.out.lock().unwrap(), expected);
    }
}
