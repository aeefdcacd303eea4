//! The transmission phase of one connection.
//!
//! ```text
//!   socket ──> reader task ──(Job)──> I/O threads ──(Completion)──> writer task ──> socket
//!              validate, take budget,     device call                 batches replies
//!              read WRITE payload                                     into one writev
//! ```
//!
//! The reader never waits for a reply: many requests are in flight and replies leave in
//! completion order. Each request takes its cost from the connection's and the server's
//! in-flight byte budgets *before* its buffer is taken from the pool or its payload read, and
//! gives it back when its reply has been written (a WRITE gives back its buffer's share as soon
//! as the device call returns). A client that sends faster than the server can serve, or that
//! does not read its replies, therefore stalls on the budget with its data still in the
//! kernel's socket buffer, not in ours.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::AsyncRead;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, trace, warn};

use super::flow::{Budget, Permit, stopped};
use super::pool::{PooledBuf, class_size};
use super::readbuf::ReadBuf;
use super::reply::{Completion, Replies, ReplySink, ReplyWriter};
use super::{ConnEntry, Server};
use crate::device::{
    BlockDevice, DeviceError, Errno, Export, Extent, Io, Peer, Pending, RequestObserver, Submission,
};
use crate::error::NbdError;
use crate::proto::{
    self, BlockDescriptor, Command, Decoded, REQUEST_HEADER_LEN, RequestHeader, command_flags,
};

/// Budget charged for a request besides its data buffer: the job, the completion, the reply
/// header and bookkeeping. It also bounds the number of small requests in flight.
pub(crate) const REQUEST_OVERHEAD: usize = 256;
/// Most extents one BLOCK_STATUS reply carries (the spec lets the server return fewer).
pub(crate) const MAX_EXTENTS: usize = 2048;
/// Budget charged for a BLOCK_STATUS request (the device's extent list and the reply).
const BLOCK_STATUS_COST: usize = MAX_EXTENTS * std::mem::size_of::<Extent>() + REQUEST_OVERHEAD;
/// After a stop, how long a client gets to finish sending a payload it has started.
const PAYLOAD_GRACE: Duration = Duration::from_secs(5);
/// How long a closing connection keeps reading (and dropping) what the client still sends.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes dropped that way.
const LINGER_MAX_BYTES: u64 = 64 << 20;
/// The id this server gives `base:allocation` in NBD_OPT_SET_META_CONTEXT.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
/// Largest READ served on the connection's task when the device has the bytes in memory
/// ([`BlockDevice::try_read`]): a larger one would hold the runtime thread, which serves
/// other connections too, for too long (1 MiB: a copy and its decryption, about 0.3 ms).
const INLINE_READ_MAX: usize = 1 << 20;

/// What the handshake settled for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Export size in bytes.
    pub size: u64,
    /// Advertised minimum block size (a power of two, 1..=65536).
    pub minimum: u32,
    /// Advertised preferred block size.
    pub preferred: u32,
    /// Advertised maximum block size (never above `Limits::max_payload`).
    pub maximum: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// FAST_ZERO requests can succeed.
    pub fast_zero: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub meta_context: Option<u32>,
    /// Transmission flags advertised.
    pub flags: u16,
}

/// A request that passed validation: every field checked against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

impl Op {
    fn command(self) -> Command {
        match self {
            Op::Read { .. } => Command::Read,
            Op::Write { .. } => Command::Write,
            Op::Flush => Command::Flush,
            Op::Trim { .. } => Command::Trim,
            Op::Cache { .. } => Command::Cache,
            Op::WriteZeroes { .. } => Command::WriteZeroes,
            Op::BlockStatus { .. } => Command::BlockStatus,
        }
    }

    /// Length of the data buffer the request needs (READ and WRITE only).
    fn buffer_len(self) -> usize {
        match self {
            Op::Read { len, .. } | Op::Write { len, .. } => len as usize,
            _ => 0,
        }
    }

    /// The bytes the request covers (0 for FLUSH).
    fn bytes(self) -> u64 {
        match self {
            Op::Read { len, .. }
            | Op::Write { len, .. }
            | Op::Trim { len, .. }
            | Op::Cache { len, .. }
            | Op::WriteZeroes { len, .. }
            | Op::BlockStatus { len, .. } => len.into(),
            Op::Flush => 0,
        }
    }

    /// Bytes taken from the in-flight budgets while the request is in flight.
    pub(crate) fn cost(self) -> usize {
        match self {
            Op::BlockStatus { .. } => BLOCK_STATUS_COST,
            _ => match self.buffer_len() {
                0 => REQUEST_OVERHEAD,
                n => class_size(n) + REQUEST_OVERHEAD,
            },
        }
    }

    /// Offset for an ERROR_OFFSET chunk: the start of the request, if it covers any bytes.
    fn error_offset(self) -> Option<u64> {
        match self {
            Op::Read { offset, len }
            | Op::Write { offset, len, .. }
            | Op::Trim { offset, len, .. }
            | Op::Cache { offset, len }
            | Op::WriteZeroes { offset, len, .. }
            | Op::BlockStatus { offset, len, .. }
                if len > 0 =>
            {
                Some(offset)
            }
            _ => None,
        }
    }
}

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// NBD_CMD_DISC.
    Disconnect,
    /// Anything to execute.
    Op(Op),
}

/// Why a request is refused before any I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    UnknownCommand(u16),
    UnsupportedFlags {
        command: Command,
        flags: u16,
    },
    FlushWithRange,
    ReadOnly(Command),
    NoMetaContext,
    TooLarge {
        command: Command,
        length: u32,
        maximum: u32,
    },
    Misaligned {
        command: Command,
        offset: u64,
        length: u32,
        minimum: u32,
    },
    PastEnd {
        command: Command,
        offset: u64,
        length: u32,
        size: u64,
    },
    EmptyBlockStatus,
    FastZeroUnsupported,
}

/// Every way a request can fail.
#[derive(Debug)]
pub(crate) enum Failure<'a> {
    /// Refused by validation.
    Rejected(Rejection),
    /// The device call failed.
    Device(&'a DeviceError),
    /// The connection is being drained and this request cannot be served any more.
    ShuttingDown,
}

/// The one place where an outcome becomes an NBD errno, with the message the client sees
/// (fixed sentences: nothing from the device's log message, nothing from the client).
pub(crate) fn reply_error(f: &Failure<'_>) -> (Errno, &'static str) {
    use Rejection as R;
    match f {
        Failure::Rejected(r) => match r {
            R::UnknownCommand(_) => (Errno::Einval, "unknown command"),
            R::UnsupportedFlags { .. } => {
                (Errno::Einval, "command flags not valid for this command")
            }
            R::FlushWithRange => (Errno::Einval, "NBD_CMD_FLUSH needs zero offset and length"),
            R::ReadOnly(_) => (Errno::Eperm, "the export is read-only"),
            R::NoMetaContext => (Errno::Einval, "no metadata context was negotiated"),
            R::TooLarge { .. } => (Errno::Einval, "request larger than the maximum block size"),
            R::Misaligned { .. } => (
                Errno::Einval,
                "offset or length not a multiple of the minimum block size",
            ),
            R::PastEnd {
                command: Command::Write | Command::WriteZeroes,
                ..
            } => (Errno::Enospc, "request extends past the end of the export"),
            R::PastEnd { .. } => (Errno::Einval, "request extends past the end of the export"),
            R::EmptyBlockStatus => (Errno::Einval, "block status of zero bytes"),
            R::FastZeroUnsupported => (Errno::Enotsup, "fast zeroing is not supported"),
        },
        Failure::Device(e) => (
            e.errno,
            match e.errno {
                Errno::Eperm => "operation not permitted",
                Errno::Eio => "input/output error",
                Errno::Enomem => "out of memory",
                Errno::Einval => "invalid argument",
                Errno::Enospc => "no space left on device",
                Errno::Eoverflow => "value too large",
                Errno::Enotsup => "operation not supported",
                Errno::Eshutdown => "server is shutting down",
            },
        ),
        Failure::ShuttingDown => (Errno::Eshutdown, "the server is shutting down"),
    }
}

/// Checks a request completely against the export before any I/O.
pub(crate) fn validate(h: &RequestHeader, g: &Geometry) -> Result<Request, Rejection> {
    use command_flags::{DF, FAST_ZERO, FUA, NO_HOLE, REQ_ONE};
    let Some(command) = Command::from_wire(h.command) else {
        return Err(Rejection::UnknownCommand(h.command));
    };
    if command == Command::Disc {
        return Ok(Request::Disconnect);
    }
    let allowed = match command {
        Command::Read if g.structured => FUA | DF,
        Command::WriteZeroes => FUA | NO_HOLE | FAST_ZERO,
        Command::BlockStatus => FUA | REQ_ONE,
        _ => FUA,
    };
    if h.flags & !allowed != 0 {
        return Err(Rejection::UnsupportedFlags {
            command,
            flags: h.flags,
        });
    }
    let fua = h.flags & FUA != 0;
    if command == Command::Flush {
        if h.offset != 0 || h.length != 0 {
            return Err(Rejection::FlushWithRange);
        }
        return Ok(Request::Op(Op::Flush));
    }
    if g.read_only
        && matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        )
    {
        return Err(Rejection::ReadOnly(command));
    }
    if command == Command::BlockStatus && g.meta_context.is_none() {
        return Err(Rejection::NoMetaContext);
    }
    let (offset, len) = (h.offset, h.length);
    let fast_zero = command == Command::WriteZeroes && h.flags & FAST_ZERO != 0;
    let bounded = match command {
        Command::Read | Command::Write | Command::Cache => true,
        Command::WriteZeroes => !fast_zero,
        _ => false,
    };
    if bounded && len > g.maximum {
        return Err(Rejection::TooLarge {
            command,
            length: len,
            maximum: g.maximum,
        });
    }
    let mask = u64::from(g.minimum) - 1;
    if offset & mask != 0 || u64::from(len) & mask != 0 {
        return Err(Rejection::Misaligned {
            command,
            offset,
            length: len,
            minimum: g.minimum,
        });
    }
    match offset.checked_add(len.into()) {
        Some(end) if end <= g.size => {}
        _ => {
            return Err(Rejection::PastEnd {
                command,
                offset,
                length: len,
                size: g.size,
            });
        }
    }
    Ok(Request::Op(match command {
        Command::Read => Op::Read { offset, len },
        Command::Write => Op::Write { offset, len, fua },
        Command::Trim => Op::Trim { offset, len, fua },
        Command::Cache => Op::Cache { offset, len },
        Command::WriteZeroes => {
            if fast_zero && !g.fast_zero {
                return Err(Rejection::FastZeroUnsupported);
            }
            Op::WriteZeroes {
                offset,
                len,
                may_trim: h.flags & NO_HOLE == 0,
                fua,
            }
        }
        Command::BlockStatus => {
            if len == 0 {
                return Err(Rejection::EmptyBlockStatus);
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: h.flags & REQ_ONE != 0,
            }
        }
        Command::Flush => Op::Flush,
        Command::Disc => return Ok(Request::Disconnect),
    }))
}

/// Turns a device's extent list into wire descriptors: zero-length extents dropped, the
/// total cut to the requested length, equal neighbours merged, at most [`MAX_EXTENTS`] (one
/// with REQ_ONE), and never empty (a single status-0 extent is always a safe answer).
pub(crate) fn clamp_extents(extents: &[Extent], len: u32, req_one: bool) -> Vec<BlockDescriptor> {
    let limit = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<BlockDescriptor> = Vec::with_capacity(extents.len().min(limit));
    let mut left = u64::from(len);
    for e in extents {
        if left == 0 {
            break;
        }
        let take = e.length.min(left);
        if take == 0 {
            continue;
        }
        let flags = e.flags & (proto::state_flags::HOLE | proto::state_flags::ZERO);
        left -= take;
        // `take` <= `len`, a u32.
        let take = u32::try_from(take).unwrap_or(u32::MAX);
        if let Some(last) = out.last_mut()
            && last.flags == flags
        {
            last.length += take;
            continue;
        }
        if out.len() == limit {
            break;
        }
        out.push(BlockDescriptor {
            length: take,
            flags,
        });
    }
    if out.is_empty() {
        out.push(BlockDescriptor {
            length: len,
            flags: 0,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Jobs (run on the I/O threads)
// ---------------------------------------------------------------------------------------------

/// What jobs of one connection share. When the last holder (the reader or a job) drops it,
/// no more replies can come and the writer task is told to finish.
pub(crate) struct ConnShared {
    entry: Arc<ConnEntry>,
    device: Arc<dyn BlockDevice>,
    replies: Arc<dyn ReplySink<Permit>>,
    structured: bool,
    /// The device takes READ, WRITE and FLUSH with [`BlockDevice::submit`].
    submits: bool,
    /// Told of every request (the export's metrics).
    observer: Option<Arc<dyn RequestObserver>>,
}

impl Drop for ConnShared {
    fn drop(&mut self) {
        self.replies.close();
    }
}

/// One validated request on its way to an I/O thread.
pub(crate) struct Job {
    conn: Arc<ConnShared>,
    handle: u64,
    op: Op,
    buf: Option<PooledBuf>,
    permit: Permit,
    /// When its header was read, if the export has an observer.
    arrived: Option<Instant>,
}

impl super::io_pool::Task for Job {
    fn device(&self) -> usize {
        Arc::as_ptr(&self.conn.device).cast::<()>() as usize
    }

    fn run(self) {
        Job::run(self);
    }
}

impl Job {
    /// Makes the device call and queues the reply. Runs on an I/O thread. A device that
    /// submits ([`BlockDevice::submit`]) gets READ, WRITE and FLUSH as a [`Submission`] and
    /// the thread moves on; the reply leaves when the device completes it.
    pub(crate) fn run(self) {
        if self.conn.submits && matches!(self.op, Op::Read { .. } | Op::Write { .. } | Op::Flush) {
            let device = Arc::clone(&self.conn.device);
            let (conn, handle) = (self.conn.entry.id, self.handle);
            let submitted = std::panic::catch_unwind(AssertUnwindSafe(|| {
                device.submit(Submission::new(Box::new(self)))
            }));
            match submitted {
                Ok(Ok(())) => {}
                Ok(Err(handed_back)) => handed_back.run_blocking(),
                Err(_) => {
                    // The submission was dropped while unwinding, which answered it.
                    warn!(conn, handle, "device submission panicked");
                }
            }
        } else {
            self.execute_and_finish();
        }
    }

    /// A READ of at most [`INLINE_READ_MAX`] bytes that the device can serve without waiting
    /// ([`BlockDevice::try_read`]) is served on the spot, on the connection's task, and its
    /// reply queued: `None`. Otherwise the job comes back untouched, for an I/O thread; a
    /// device that submits is never asked.
    fn try_read_now(mut self) -> Option<Job> {
        let Op::Read { offset, len } = self.op else {
            return Some(self);
        };
        if self.conn.submits || len as usize > INLINE_READ_MAX {
            return Some(self);
        }
        let device = &*self.conn.device;
        let Some(buf) = self.buf.as_mut() else {
            return Some(self);
        };
        match guarded(|| device.try_read(offset, buf.as_mut_slice())) {
            Ok(false) => Some(self),
            outcome => {
                self.finish(outcome.map(|_| None));
                None
            }
        }
    }

    /// Makes the blocking device call, then queues the reply.
    fn execute_and_finish(mut self) {
        let outcome = guarded(|| execute(&*self.conn.device, self.op, self.buf.as_mut()));
        self.finish(outcome);
    }

    /// Queues the reply for the outcome of the device call.
    fn finish(self, outcome: Result<Option<Vec<Extent>>, DeviceError>) {
        let Job {
            conn,
            handle,
            op,
            mut buf,
            mut permit,
            arrived,
        } = self;
        if let (Some(observer), Some(arrived)) = (&conn.observer, arrived) {
            observer.finished(
                op.command(),
                op.bytes(),
                outcome.as_ref().map(|_| ()).map_err(|e| e.errno),
                arrived.elapsed(),
            );
        }
        let structured = conn.structured;
        let reply = match outcome {
            Ok(extents) => match op {
                Op::Read { offset, len } => {
                    conn.entry
                        .bytes_read
                        .fetch_add(len.into(), Ordering::Relaxed);
                    Completion::data(handle, offset, buf, structured, Some(permit))
                }
                Op::Write { len, .. } => {
                    conn.entry
                        .bytes_written
                        .fetch_add(len.into(), Ordering::Relaxed);
                    if let Some(b) = buf.take() {
                        let class = class_size(b.as_slice().len());
                        drop(b);
                        permit.release(class);
                    }
                    Completion::ok(handle, Some(permit))
                }
                Op::BlockStatus { len, req_one, .. } => Completion::block_status(
                    handle,
                    BASE_ALLOCATION_ID,
                    &clamp_extents(extents.as_deref().unwrap_or_default(), len, req_one),
                    Some(permit),
                ),
                _ => Completion::ok(handle, Some(permit)),
            },
            Err(e) => {
                warn!(
                    conn = conn.entry.id,
                    handle,
                    command = op.command().name(),
                    errno = ?e.errno,
                    "device call failed: {}",
                    e.message
                );
                drop(buf.take());
                let (errno, message) = reply_error(&Failure::Device(&e));
                Completion::error(
                    handle,
                    structured,
                    errno,
                    message,
                    op.error_offset(),
                    Some(permit),
                )
            }
        };
        conn.replies.send(reply);
    }
}

/// A job handed to a device that submits: its reply goes out when the device completes it.
impl Pending for Job {
    fn io(&self) -> Io {
        match self.op {
            Op::Read { offset, .. } => Io::Read { offset },
            Op::Write { offset, fua, .. } => Io::Write { offset, fua },
            _ => Io::Flush,
        }
    }

    fn data(&mut self) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(b) => b.as_mut_slice(),
            None => &mut [],
        }
    }

    fn finish(self: Box<Self>, result: Result<(), DeviceError>) {
        (*self).finish(result.map(|()| None));
    }

    fn run_blocking(self: Box<Self>) {
        (*self).execute_and_finish();
    }
}

/// A device call whose panic becomes an EIO reply instead of taking the thread down.
fn guarded<T>(call: impl FnOnce() -> Result<T, DeviceError>) -> Result<T, DeviceError> {
    std::panic::catch_unwind(AssertUnwindSafe(call))
        .unwrap_or_else(|_| Err(DeviceError::new(Errno::Eio, "device call panicked")))
}

fn execute(
    dev: &dyn BlockDevice,
    op: Op,
    buf: Option<&mut PooledBuf>,
) -> Result<Option<Vec<Extent>>, DeviceError> {
    match op {
        Op::Read { offset, .. } => {
            if let Some(b) = buf {
                dev.read(offset, b.as_mut_slice())?;
            }
        }
        Op::Write { offset, fua, .. } => {
            if let Some(b) = buf {
                dev.write(offset, b.as_mut_slice(), fua)?;
            }
        }
        Op::Flush => dev.flush()?,
        Op::Trim { offset, len, fua } if len > 0 => dev.trim(offset, len.into(), fua)?,
        Op::Cache { offset, len } if len > 0 => dev.cache(offset, len.into())?,
        Op::WriteZeroes {
            offset,
            len,
            may_trim,
            fua,
        } if len > 0 => dev.write_zeroes(offset, len.into(), may_trim, fua)?,
        Op::BlockStatus { offset, len, .. } => {
            return dev.block_status(offset, len.into()).map(Some);
        }
        Op::Trim { .. } | Op::Cache { .. } | Op::WriteZeroes { .. } => {}
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// The reader
// ---------------------------------------------------------------------------------------------

/// Why the reader stopped.
#[derive(Debug)]
enum End {
    Disc,
    Eof,
    EofMidRequest(&'static str),
    Stopped,
    Protocol(NbdError),
    Io(std::io::Error),
    PayloadTimeout,
    PayloadTooSlow { len: u32, after: Duration },
    UnskippableWrite(u32),
}

/// Serves one connection in transmission phase until it ends, then waits for every request
/// in flight to be answered (or dropped if the client is gone).
pub(crate) async fn run<R, W>(
    server: Arc<Server>,
    g: Geometry,
    export: &Export,
    entry: Arc<ConnEntry>,
    mut rd: R,
    wr: W,
    mut rb: ReadBuf,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplyWriter,
{
    // A kernel device the server bound itself reads its replies in the kernel: it is never
    // cut for being slow to (a root volume's session lives as long as the machine).
    let reply_timeout = match entry.peer {
        Peer::Kernel { .. } => None,
        _ => Some(server.limits.reply_timeout),
    };
    let replies = Replies::new(wr, Arc::clone(&entry), reply_timeout);
    let writer = tokio::spawn(
        Arc::clone(&replies)
            .run_writer()
            .instrument(tracing::Span::current()),
    );
    let device = Arc::clone(&export.device);
    let shared = Arc::new(ConnShared {
        entry: Arc::clone(&entry),
        submits: device.submits(),
        device,
        replies,
        structured: g.structured,
        observer: export.observer.clone(),
    });
    let budget = Budget {
        conn: Arc::new(Semaphore::new(
            server.limits.per_connection_inflight_bytes_usize(),
        )),
        global: Arc::clone(&server.global_budget),
    };
    let end = read_requests(&server, &g, &shared, &budget, &mut rd, &mut rb).await;
    match &end {
        End::Disc => debug!("client sent NBD_CMD_DISC"),
        End::Eof => debug!("client closed the connection without NBD_CMD_DISC"),
        End::EofMidRequest(what) => {
            warn!("client disconnected in the middle of {what}; requests in flight still complete")
        }
        End::Stopped => debug!("connection stopped by the server; draining requests in flight"),
        End::Protocol(e) => warn!("protocol violation, closing the connection: {e}"),
        End::Io(e) => debug!("reading from the client failed: {e}"),
        End::PayloadTimeout => {
            warn!("client did not finish a write payload while the connection drained")
        }
        End::PayloadTooSlow { len, after } => warn!(
            "client did not send the payload of a {len}-byte write within {after:?} \
             (limits.payload_timeout_secs); closing the connection, which frees its share of \
             the in-flight budget"
        ),
        End::UnskippableWrite(len) => {
            warn!("client sent a {len}-byte write, too large to skip; replied EINVAL and closing")
        }
    }
    drop(shared);
    if writer.await.is_err() {
        warn!("reply writer task failed");
    }
    // Stopped reading while the client may still be sending: read and drop its bytes for a
    // moment so that closing does not reset a TCP connection whose last replies the client
    // has not read yet (a reset makes its kernel discard them).
    if !matches!(end, End::Eof | End::EofMidRequest(_) | End::Io(_)) {
        let _ = tokio::time::timeout(LINGER, rb.skip(&mut rd, LINGER_MAX_BYTES)).await;
    }
    drop(rd);
    debug!(
        requests = entry.requests.load(Ordering::Relaxed),
        bytes_read = entry.bytes_read.load(Ordering::Relaxed),
        bytes_written = entry.bytes_written.load(Ordering::Relaxed),
        "connection closed"
    );
}

async fn read_requests<R: AsyncRead + Unpin>(
    server: &Server,
    g: &Geometry,
    shared: &Arc<ConnShared>,
    budget: &Budget,
    rd: &mut R,
    rb: &mut ReadBuf,
) -> End {
    let mut stop = shared.entry.stop_receiver();
    let skip_limit = server.limits.skip_limit();
    loop {
        if *stop.borrow() {
            return End::Stopped;
        }
        if rb.len() < REQUEST_HEADER_LEN {
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return End::Stopped,
                r = rb.fill(rd, REQUEST_HEADER_LEN) => match r {
                    Ok(true) => {}
                    Ok(false) if rb.len() == 0 => return End::Eof,
                    Ok(false) => return End::EofMidRequest("a request header"),
                    Err(e) => return End::Io(e),
                },
            }
        }
        let h = match RequestHeader::decode(rb.data()) {
            Ok(Decoded::Complete { value, .. }) => value,
            // `fill` guaranteed a whole header.
            Ok(Decoded::Incomplete { .. }) => continue,
            Err(e) => return End::Protocol(e),
        };
        rb.consume(REQUEST_HEADER_LEN);
        let arrived = shared.observer.as_ref().map(|_| Instant::now());
        shared.entry.requests.fetch_add(1, Ordering::Relaxed);
        trace!(
            handle = h.handle,
            command = h.command,
            flags = h.flags,
            offset = h.offset,
            length = h.length,
            "request"
        );
        let op = match validate(&h, g) {
            Ok(Request::Disconnect) => return End::Disc,
            Ok(Request::Op(op)) => op,
            Err(rejection) => {
                debug!(handle = h.handle, ?rejection, "request refused");
                let failure = Failure::Rejected(rejection);
                if h.command == Command::Write.to_wire() && h.length > 0 {
                    if u64::from(h.length) > skip_limit {
                        send_error(shared, h.handle, &failure);
                        return End::UnskippableWrite(h.length);
                    }
                    match rb.skip(rd, h.length.into()).await {
                        Ok(true) => {}
                        Ok(false) => return End::EofMidRequest("a refused write payload"),
                        Err(e) => return End::Io(e),
                    }
                }
                send_error(shared, h.handle, &failure);
                continue;
            }
        };
        // Cost <= class_size(max_payload) + overhead, which fits a u32 (max_payload <= 1 GiB).
        let cost = u32::try_from(op.cost()).unwrap_or(u32::MAX);
        let permit = match budget.try_acquire(cost) {
            Some(p) => p,
            None => {
                let acquired = tokio::select! {
                    biased;
                    p = budget.acquire(cost) => p,
                    _ = stopped(&mut stop) => None,
                };
                match acquired {
                    Some(p) => p,
                    None => {
                        // Draining: this request will not be served. A WRITE's payload is
                        // left unread; the connection closes after the replies in flight.
                        send_error(shared, h.handle, &Failure::ShuttingDown);
                        return End::Stopped;
                    }
                }
            }
        };
        let mut buf = match op.buffer_len() {
            0 => None,
            n => Some(server.pool.get(n)),
        };
        if let (Op::Write { .. }, Some(b)) = (op, buf.as_mut()) {
            let fut = rb.read_exact_into(rd, b.as_mut_slice());
            tokio::pin!(fut);
            // The deadline's timer is armed only if the payload is not already here (the
            // first branch is polled first).
            let deadline = tokio::time::sleep(server.limits.payload_timeout);
            tokio::pin!(deadline);
            let r = tokio::select! {
                biased;
                r = &mut fut => Ok(r),
                () = &mut deadline => {
                    return End::PayloadTooSlow {
                        len: h.length,
                        after: server.limits.payload_timeout,
                    };
                }
                _ = stopped(&mut stop) => tokio::time::timeout(PAYLOAD_GRACE, &mut fut).await,
            };
            match r {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return End::EofMidRequest("a write payload"),
                Ok(Err(e)) => return End::Io(e),
                Err(_) => return End::PayloadTimeout,
            }
        }
        if let Some(observer) = &shared.observer {
            observer.started(op.command());
        }
        let job = Job {
            conn: Arc::clone(shared),
            handle: h.handle,
            op,
            buf,
            permit,
            arrived,
        };
        match job.try_read_now() {
            Some(job) => server.io.submit(job),
            // Served here, which cost this task the read and the cipher: the runtime's other
            // tasks get their turn when this one has had its share.
            None => tokio::task::consume_budget().await,
        }
    }
}

fn send_error(shared: &ConnShared, handle: u64, failure: &Failure<'_>) {
    let (errno, message) = reply_error(failure);
    if let Some(observer) = &shared.observer {
        observer.refused(errno);
    }
    shared.replies.send(Completion::error(
        handle,
        shared.structured,
        errno,
        message,
        None,
        None,
    ));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use command_flags::*;

    fn geo() -> Geometry {
        Geometry {
            size: 1 << 20,
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 16,
            read_only: false,
            fast_zero: false,
            structured: true,
            meta_context: Some(BASE_ALLOCATION_ID),
            flags: 0,
        }
    }

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command: command.to_wire(),
            handle: 1,
            offset,
            length,
        }
    }

    fn errno(h: RequestHeader, g: &Geometry) -> Option<Errno> {
        validate(&h, g)
            .err()
            .map(|r| reply_error(&Failure::Rejected(r)).0)
    }

    #[test]
    fn validation_maps_to_the_spec_errnos() {
        let g = geo();
        let size = g.size;
        assert_eq!(errno(req(Command::Read, 0, 0, 512), &g), None);
        assert_eq!(
            errno(req(Command::Read, 0, size - 512, 1024), &g),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Write, 0, size - 512, 1024), &g),
            Some(Errno::Enospc)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, 0, size, 512), &g),
            Some(Errno::Enospc)
        );
        assert_eq!(
            errno(req(Command::Trim, 0, size, 512), &g),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Cache, 0, size, 512), &g),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::BlockStatus, 0, size, 512), &g),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Read, 0, u64::MAX - 511, 512), &g),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Read, 0, 1, 512), &g),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Read, 0, 0, 1 << 17), &g),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::Read, REQ_ONE, 0, 512), &g),
            Some(Errno::Einval)
        );
        assert_eq!(errno(req(Command::Read, DF | FUA, 0, 512), &g), None);
        assert_eq!(
            errno(req(Command::Write, NO_HOLE, 0, 512), &g),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, FAST_ZERO, 0, 512), &g),
            Some(Errno::Enotsup)
        );
        // FAST_ZERO requests are not bounded by the maximum block size.
        assert_eq!(
            errno(req(Command::WriteZeroes, FAST_ZERO, 0, 1 << 18), &g),
            Some(Errno::Enotsup)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, 0, 0, 1 << 18), &g),
            Some(Errno::Einval)
        );
        assert_eq!(errno(req(Command::Flush, 0, 1, 0), &g), Some(Errno::Einval));
        assert_eq!(
            errno(req(Command::BlockStatus, 0, 0, 0), &g),
            Some(Errno::Einval)
        );
        let unknown = RequestHeader {
            command: 42,
            ..req(Command::Read, 0, 0, 0)
        };
        assert_eq!(errno(unknown, &g), Some(Errno::Einval));
        let ro = Geometry {
            read_only: true,
            ..g
        };
        assert_eq!(
            errno(req(Command::Write, 0, 0, 512), &ro),
            Some(Errno::Eperm)
        );
        assert_eq!(
            errno(req(Command::Trim, 0, 0, 512), &ro),
            Some(Errno::Eperm)
        );
        assert_eq!(
            errno(req(Command::WriteZeroes, 0, 0, 512), &ro),
            Some(Errno::Eperm)
        );
        assert_eq!(errno(req(Command::Read, 0, 0, 512), &ro), None);
        let simple = Geometry {
            structured: false,
            meta_context: None,
            ..g
        };
        assert_eq!(
            errno(req(Command::Read, DF, 0, 512), &simple),
            Some(Errno::Einval)
        );
        assert_eq!(
            errno(req(Command::BlockStatus, 0, 0, 512), &simple),
            Some(Errno::Einval)
        );
        assert_eq!(
            validate(&req(Command::Disc, 0xffff, 7, 7), &g),
            Ok(Request::Disconnect)
        );
        assert_eq!(
            validate(&req(Command::WriteZeroes, NO_HOLE, 512, 512), &g),
            Ok(Request::Op(Op::WriteZeroes {
                offset: 512,
                len: 512,
                may_trim: false,
                fua: false
            }))
        );
    }

    #[test]
    fn extents_are_clamped() {
        let e = |length, flags| Extent { length, flags };
        let d = |length, flags| BlockDescriptor { length, flags };
        assert_eq!(
            clamp_extents(&[e(100, 3), e(100, 3), e(1000, 0)], 300, false),
            vec![d(200, 3), d(100, 0)]
        );
        assert_eq!(
            clamp_extents(&[e(100, 3), e(100, 0)], 300, true),
            vec![d(100, 3)]
        );
        assert_eq!(clamp_extents(&[], 300, false), vec![d(300, 0)]);
        assert_eq!(
            clamp_extents(&[e(0, 1), e(1 << 40, 7)], 10, false),
            vec![d(10, 3)]
        );
    }
}
