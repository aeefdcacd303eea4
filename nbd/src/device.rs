//! What the server serves: block devices, grouped into named exports, looked up per client.

use std::sync::Arc;

/// The NBD error numbers a reply can carry (proto.md "Error values"), with their wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (writes to a read-only export).
    Eperm = 1,
    /// Input/output error.
    Eio = 5,
    /// Cannot allocate memory.
    Enomem = 12,
    /// Invalid argument (misaligned, past the end for reads, bad flags).
    Einval = 22,
    /// No space left (writes past the end, a full disk).
    Enospc = 28,
    /// Value too large (a request larger than the server accepts).
    Eoverflow = 75,
    /// Not supported (a FAST_ZERO that would not be fast, an unsupported command).
    Enotsup = 95,
    /// Server is shutting down.
    Eshutdown = 108,
}

impl Errno {
    /// Every errno a reply can carry, in wire order.
    pub const ALL: [Errno; 8] = [
        Errno::Eperm,
        Errno::Eio,
        Errno::Enomem,
        Errno::Einval,
        Errno::Enospc,
        Errno::Eoverflow,
        Errno::Enotsup,
        Errno::Eshutdown,
    ];

    /// Its symbolic name (`EIO`), as libnbd and the C headers write it.
    pub const fn name(self) -> &'static str {
        match self {
            Errno::Eperm => "EPERM",
            Errno::Eio => "EIO",
            Errno::Enomem => "ENOMEM",
            Errno::Einval => "EINVAL",
            Errno::Enospc => "ENOSPC",
            Errno::Eoverflow => "EOVERFLOW",
            Errno::Enotsup => "ENOTSUP",
            Errno::Eshutdown => "ESHUTDOWN",
        }
    }
}

/// A failed device operation: the errno for the client and a message for the server's log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DeviceError {
    /// What the client is told.
    pub errno: Errno,
    /// What the server logs (never data or key material).
    pub message: String,
}

impl DeviceError {
    /// A new error.
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

/// One extent of `base:allocation` block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// NBD_STATE_HOLE (1) and/or NBD_STATE_ZERO (2).
    pub flags: u32,
}

/// Sizes the device advertises with NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size: requests need not be aligned to anything larger (1 = any).
    pub minimum: u32,
    /// Preferred block size: smaller or unaligned requests may be slower (read-modify-write).
    pub preferred: u32,
    /// Maximum payload of one request.
    pub maximum: u32,
}

/// A block device the server exports. Calls are blocking and may come from many threads at
/// once; the server runs them off its async reactor.
///
/// Contract:
/// - Offsets and lengths are validated by the server against [`BlockDevice::size`] before any
///   call: the device never sees a range past the end.
/// - `read` fills all of `buf`. Bytes never written read as zero.
/// - `write` may overwrite `data` (the server gives up the buffer; the device may encrypt in
///   place). With `fua` the data is durable when it returns.
/// - `flush` makes every write that completed before it was called durable, on every
///   connection (so CAN_MULTI_CONN is honest).
/// - `write_zeroes` makes the range read as zeros; with `may_trim` the device may deallocate
///   (NBD_CMD_FLAG_NO_HOLE absent).
/// - `trim` is advisory; afterwards the range reads as zeros or as before.
/// - `block_status` describes `base:allocation` from `offset` for at most `length` bytes
///   (it may return less); never claims ZERO for bytes that do not read as zero.
pub trait BlockDevice: Send + Sync + 'static {
    /// Export size in bytes.
    fn size(&self) -> u64;
    /// Block size constraints to advertise.
    fn block_sizes(&self) -> BlockSizes;
    /// True if writes are refused.
    fn read_only(&self) -> bool;
    /// True if `write_zeroes` is always fast (no data written); when false, FAST_ZERO
    /// requests get ENOTSUP.
    fn fast_zero(&self) -> bool {
        false
    }
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Reads `buf.len()` bytes at `offset` now if that needs no waiting (the bytes are in
    /// memory): `Ok(true)` when done, `Err` for a failed read; `Ok(false)` when it would
    /// wait, and the request then goes to an I/O thread for [`read`](Self::read). Called on
    /// the connection's own task, which serves other connections too: it must never block.
    /// It spares the request a trip through the I/O threads, and the reply leaves from the
    /// core that read the data. The default: `Ok(false)`.
    fn try_read(&self, _offset: u64, _buf: &mut [u8]) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// Writes `data` at `offset`; `data` may be clobbered.
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), DeviceError>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Discards a range (advisory).
    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), DeviceError>;
    /// Makes a range read as zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), DeviceError>;
    /// Prefetch hint (NBD_CMD_CACHE); the default does nothing.
    fn cache(&self, _offset: u64, _length: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    /// `base:allocation` extents starting at `offset`.
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, DeviceError>;

    /// Whether the device takes READ, WRITE and FLUSH with [`submit`](Self::submit) (asked
    /// once per connection). The default: no, every request is a blocking call.
    fn submits(&self) -> bool {
        false
    }

    /// Takes a READ, WRITE or FLUSH that the device completes later, from any thread, with
    /// [`Submission::complete`]: the server's I/O thread does not wait for it, so requests in
    /// flight are bounded by the in-flight budgets, not by the I/O threads. The contract of
    /// [`read`](Self::read), [`write`](Self::write) and [`flush`](Self::flush) holds, with
    /// "returns" read as "completes" (a flush covers every write completed before it was
    /// submitted). `Err` hands the request back, unchanged, for the blocking call (a request
    /// the device cannot take this way, such as an unaligned one). Called on an I/O thread
    /// only if [`submits`](Self::submits) said yes; the default hands everything back.
    fn submit(self: Arc<Self>, submission: Submission) -> Result<(), Submission> {
        Err(submission)
    }
}

/// What a submitted request is ([`Submission::io`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// NBD_CMD_READ: fill [`Submission::data`] with the bytes at `offset`.
    Read {
        /// Offset in the export.
        offset: u64,
    },
    /// NBD_CMD_WRITE: write [`Submission::data`] (which may be clobbered) at `offset`; with
    /// `fua`, durable before completion.
    Write {
        /// Offset in the export.
        offset: u64,
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// NBD_CMD_FLUSH: every write completed before it was submitted made durable.
    Flush,
}

/// The server's side of a submitted request: its reply path.
pub(crate) trait Pending: Send {
    fn io(&self) -> Io;
    fn data(&mut self) -> &mut [u8];
    /// Queues the reply.
    fn finish(self: Box<Self>, result: Result<(), DeviceError>);
    /// Makes the blocking device call instead, then queues the reply.
    fn run_blocking(self: Box<Self>);
}

/// A READ, WRITE or FLUSH handed to a device that completes it later
/// ([`BlockDevice::submit`]). It owns the request's buffer, and the reply goes out when it is
/// [`complete`](Submission::complete)d, from any thread. One that is dropped without being
/// completed is answered with an error (`ESHUTDOWN`), so a client never waits forever.
pub struct Submission {
    /// None once completed.
    pending: Option<Box<dyn Pending>>,
}

impl Submission {
    pub(crate) fn new(pending: Box<dyn Pending>) -> Self {
        Self {
            pending: Some(pending),
        }
    }

    /// What to do.
    pub fn io(&self) -> Io {
        self.pending.as_ref().map_or(Io::Flush, |p| p.io())
    }

    /// The request's data: what a READ fills, what a WRITE writes (empty for a FLUSH). Its
    /// bytes do not move while the submission lives.
    pub fn data(&mut self) -> &mut [u8] {
        match self.pending.as_mut() {
            Some(p) => p.data(),
            None => &mut [],
        }
    }

    /// Answers the client with the outcome (for a READ, the data on success).
    pub fn complete(mut self, result: Result<(), DeviceError>) {
        if let Some(p) = self.pending.take() {
            p.finish(result);
        }
    }

    /// A submission the device handed back: the blocking call, then the reply.
    pub(crate) fn run_blocking(mut self) {
        if let Some(p) = self.pending.take() {
            p.run_blocking();
        }
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(Err(DeviceError::new(
                Errno::Eshutdown,
                "the device dropped the request without completing it",
            )));
        }
    }
}

/// Who is connecting: from SO_PEERCRED on a unix socket, or the TCP peer address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A unix-socket peer.
    Unix {
        /// Peer process id.
        pid: Option<i32>,
        /// Peer user id.
        uid: u32,
        /// Peer group id.
        gid: u32,
    },
    /// A TCP peer.
    Tcp(std::net::SocketAddr),
    /// A kernel NBD device (`/dev/nbdN`) the server bound itself: one of its connections,
    /// negotiated out of band (see [`crate::Server::serve_preconnected`]).
    Kernel {
        /// Device index (N in `/dev/nbdN`).
        index: u32,
        /// Connection number within the device (0-based).
        connection: u32,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix {
                pid: Some(pid),
                uid,
                ..
            } => write!(f, "pid {pid} (uid {uid})"),
            Peer::Unix { pid: None, uid, .. } => write!(f, "uid {uid}"),
            Peer::Tcp(a) => write!(f, "tcp {a}"),
            Peer::Kernel { index, connection } => {
                write!(f, "kernel /dev/nbd{index} connection {connection}")
            }
        }
    }
}

/// What the TLS handshake established about the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClient {
    /// The protocol version (`TLSv1_3`, `TLSv1_2`).
    pub version: String,
    /// The cipher suite (`TLS13_AES_128_GCM_SHA256`, ...).
    pub cipher_suite: String,
    /// The client's certificate (DER), when it sent one (verified by the handshake).
    pub certificate: Option<Vec<u8>>,
    /// The intermediate certificates it sent after its own (DER).
    pub intermediates: Vec<Vec<u8>>,
    /// Its subject, issuer and serial.
    pub names: Option<crate::x509::CertNames>,
}

impl TlsClient {
    /// The certificate's subject, or `(no certificate)`, for messages.
    pub fn subject(&self) -> &str {
        self.names
            .as_ref()
            .map_or("(no certificate)", |n| n.subject.as_str())
    }
}

/// An export: a named device plus what is advertised for it.
pub struct Export {
    /// Export name clients ask for.
    pub name: String,
    /// Free text for NBD_INFO_DESCRIPTION.
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Served only over TLS: on a listener where TLS is optional, left out of LIST and
    /// refused with `NBD_REP_ERR_TLS_REQD` before the client upgrades.
    pub tls_only: bool,
    /// Told of every request of the export's connections (metrics); None: nobody is.
    pub observer: Option<Arc<dyn RequestObserver>>,
}

/// Watches the requests of an export: what a metrics endpoint counts. Called on the
/// connection's task and on the I/O threads, once per request: it must not block, and should
/// cost no more than a few atomic operations.
pub trait RequestObserver: Send + Sync {
    /// A request passed validation and goes to the device (it is in flight until
    /// [`finished`](Self::finished)).
    fn started(&self, command: crate::proto::Command);

    /// A request [`started`](Self::started) was answered: `bytes` is the length it covered
    /// (READ, WRITE, TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS; 0 for FLUSH), `outcome` the
    /// errno of a failure, `latency` the time from its header being read to its reply being
    /// queued.
    fn finished(
        &self,
        command: crate::proto::Command,
        bytes: u64,
        outcome: Result<(), Errno>,
        latency: std::time::Duration,
    );

    /// A request was refused before it reached the device (an unknown command, a range past
    /// the end, a write to a read-only export...), answered with `errno`.
    fn refused(&self, errno: Errno);
}

/// Where the server looks up exports. The daemon implements it over its registry of attached
/// volumes, applying its access control (owner, allow-lists, TCP opt-in).
pub trait ExportRegistry: Send + Sync + 'static {
    /// The export `name` if `peer` may open it; None otherwise (the client is told the
    /// export is unknown, so names of exports it may not open are not disclosed).
    fn lookup(&self, name: &str, peer: &Peer) -> Option<Arc<Export>>;
    /// Names and descriptions of the exports `peer` may open (NBD_OPT_LIST).
    fn list(&self, peer: &Peer) -> Vec<(String, String)>;
    /// The export served for the empty name "" (NBD_OPT_EXPORT_NAME / GO with no name), if any.
    fn default_export(&self) -> Option<String> {
        None
    }
    /// A TLS handshake with `peer` failed on the server's side: `subject` is the client
    /// certificate it rejected, if that was the reason, and `reason` rustls's. The default
    /// does nothing (the server logs it).
    fn tls_refused(&self, _peer: &Peer, _subject: Option<&str>, _reason: &str) {}

    /// Whether a client whose TLS session is `tls` (None: no TLS) may use `export`, which
    /// [`lookup`](Self::lookup) found for it: `Err` with the reason if not. Asked when the
    /// client opens or asks about the export (`opening`: NBD_OPT_INFO, GO and EXPORT_NAME;
    /// the client is answered `NBD_REP_ERR_POLICY`) and when it lists exports (the export is
    /// then left out). The default admits everyone.
    fn admit(
        &self,
        _export: &Export,
        _peer: &Peer,
        _tls: Option<&TlsClient>,
        _opening: bool,
    ) -> Result<(), String> {
        Ok(())
    }
}
