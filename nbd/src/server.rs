//! The tokio NBD server: accepts connections, negotiates, and serves requests through a
//! [`crate::device::BlockDevice`].
//!
//! # Design
//! - **One task per connection** for the handshake and for reading requests, plus a writer
//!   task that sends replies as they complete (out of order, many per `writev`).
//! - **Device calls on a fixed pool of I/O threads** ([`Limits::io_threads`]), fed by one
//!   queue; the reactor never blocks on a device.
//! - **Bounded memory.** Every request takes its cost (data buffer plus a fixed overhead) from
//!   a per-connection and a server-wide in-flight byte budget *before* a buffer is taken or a
//!   payload read; a request that does not fit waits with its payload still in the kernel's
//!   socket buffer. Buffers come from a pool that reuses them and never holds more than the
//!   global budget. Oversized WRITE payloads are skipped without buffering, or the connection
//!   is closed when skipping would mean reading an absurd amount.
//! - **Graceful ends.** [`Server::disconnect_export`] and [`Server::drain_all`] stop reading
//!   new requests, let the requests in flight finish and be answered, then close.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, debug, error, warn};

use crate::device::{Export, ExportRegistry, Peer};
use crate::error::NbdError;

mod flow;
mod handshake;
mod io_pool;
mod pool;
mod readbuf;
mod reply;
mod tls;
mod transmission;

pub use crate::device::TlsClient;
pub use crate::error::TlsHandshakeError;
pub use tls::{NamingVerifier, TlsMode};

use io_pool::IoPool;
use pool::BufferPool;
use readbuf::ReadBuf;

/// Size of each connection's input buffer. Large payloads bypass it.
const READ_BUF_LEN: usize = 32 * 1024;
/// Largest request payload this server ever accepts, whatever the limits say.
const MAX_PAYLOAD_CEILING: u32 = 1 << 30;
/// Smallest `max_payload` honoured (the spec wants 64 KiB unfragmented reads).
const MAX_PAYLOAD_FLOOR: u32 = 64 * 1024;

/// Resource limits of a [`Server`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest READ or WRITE payload (advertised as the maximum block size); 32 MiB, the
    /// spec's portable maximum. Clamped to 64 KiB..=1 GiB.
    pub max_payload: u32,
    /// Bytes one connection may have in flight (buffers of requests being served). Raised
    /// to hold at least one request of `max_payload`.
    pub per_connection_inflight_bytes: u64,
    /// Bytes all connections together may have in flight; also the most the buffer pool
    /// holds. This is what bounds memory when many clients send large writes at once.
    pub global_inflight_bytes: u64,
    /// Connections served at once (handshake or transmission); more are closed on accept.
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send a write's payload once its header arrived. A client that
    /// takes longer is disconnected: until then its request holds its share of the in-flight
    /// budgets, so clients that stall mid-payload could starve every writer.
    pub payload_timeout: Duration,
    /// Time a client may leave its replies unread. When the socket stays full this long, the
    /// connection is closed: until then its replies hold their share of the in-flight
    /// budgets, so clients that send requests and never read the answers could starve
    /// everyone else. A client that reads, however slowly, resets it. Kernel devices the
    /// server bound itself ([`Server::serve_preconnected`]) are never cut for it.
    pub reply_timeout: Duration,
    /// Threads making blocking device calls.
    pub io_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            max_payload: 32 << 20,
            per_connection_inflight_bytes: 64 << 20,
            global_inflight_bytes: 512 << 20,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            payload_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(30),
            io_threads: (cpus * 2).clamp(4, 64),
        }
    }
}

impl Limits {
    /// The largest cost one request can have.
    fn max_request_cost(&self) -> u64 {
        let payload = pool::class_size(self.max_payload as usize) + transmission::REQUEST_OVERHEAD;
        let status = transmission::MAX_EXTENTS * std::mem::size_of::<crate::device::Extent>()
            + transmission::REQUEST_OVERHEAD;
        u64::try_from(payload.max(status)).unwrap_or(u64::MAX)
    }

    /// The limits made consistent: any single request fits both budgets.
    fn normalized(mut self) -> Self {
        self.max_payload = self
            .max_payload
            .clamp(MAX_PAYLOAD_FLOOR, MAX_PAYLOAD_CEILING);
        let max_cost = self.max_request_cost();
        let sem_max = u64::try_from(Semaphore::MAX_PERMITS).unwrap_or(u64::MAX);
        self.per_connection_inflight_bytes =
            self.per_connection_inflight_bytes.clamp(max_cost, sem_max);
        self.global_inflight_bytes = self.global_inflight_bytes.clamp(max_cost, sem_max);
        self.max_connections = self.max_connections.max(1);
        self.io_threads = self.io_threads.clamp(1, 1024);
        self
    }

    fn per_connection_inflight_bytes_usize(&self) -> usize {
        usize::try_from(self.per_connection_inflight_bytes).unwrap_or(Semaphore::MAX_PERMITS)
    }

    fn global_inflight_bytes_usize(&self) -> usize {
        usize::try_from(self.global_inflight_bytes).unwrap_or(Semaphore::MAX_PERMITS)
    }

    /// Longest refused WRITE payload that is read and dropped to keep the session going;
    /// longer ones close the connection. Lengths under 32 MiB are never treated as abuse.
    fn skip_limit(&self) -> u64 {
        2 * u64::from(self.max_payload.max(32 << 20))
    }
}

/// What the client end of a session negotiated out of band must be told
/// ([`Server::serve_preconnected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`) as the handshake would have sent them.
    pub flags: u16,
    /// Largest request payload served.
    pub maximum: u32,
}

/// A live connection in transmission phase, as reported by [`Server::connections`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Server-assigned id, unique for the server's lifetime.
    pub id: u64,
    /// Canonical name of the export it uses.
    pub export: String,
    /// Who is connected.
    pub peer: Peer,
    /// When it entered transmission phase.
    pub since: SystemTime,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes accepted by successful writes.
    pub bytes_written: u64,
    /// Requests received (including refused ones).
    pub requests: u64,
    /// The TLS session, when the connection upgraded.
    pub tls: Option<Arc<TlsClient>>,
}

/// A connection in the table: what [`ConnectionInfo`] reports, plus the switch that stops it.
pub(crate) struct ConnEntry {
    id: u64,
    export: String,
    peer: Peer,
    since: SystemTime,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    requests: AtomicU64,
    stop: watch::Sender<bool>,
    tls: Option<Arc<TlsClient>>,
}

impl ConnEntry {
    fn new(id: u64, export: String, peer: Peer, tls: Option<Arc<TlsClient>>) -> Self {
        Self {
            id,
            export,
            peer,
            tls,
            since: SystemTime::now(),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            stop: watch::Sender::new(false),
        }
    }

    /// Asks the connection to stop reading requests and close once drained.
    fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn stop_receiver(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            id: self.id,
            export: self.export.clone(),
            peer: self.peer.clone(),
            since: self.since,
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            tls: self.tls.clone(),
        }
    }
}

/// Keeps a connection in the table; removes it when dropped.
pub(crate) struct Registration {
    server: Arc<Server>,
    entry: Arc<ConnEntry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.server.table().remove(&self.entry.id);
        self.server
            .closed_gen
            .send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// Counts a connection task as live until dropped.
struct LiveGuard(Arc<Server>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A stream the server can serve: read and write, then split into halves for transmission.
/// Implemented for unix and TCP sockets and for a TLS session over either.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Reading half.
    type Reader: AsyncRead + Unpin + Send + 'static;
    /// Writing half, shared by the threads that write replies.
    type Writer: reply::ReplyWriter;
    /// Splits the stream.
    fn into_halves(self) -> (Self::Reader, Self::Writer);
}

impl Transport for UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl Transport for TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

/// The TLS settings of a [`Server`]: the rustls configuration and the mode of each kind of
/// listener. A mode other than [`TlsMode::Off`] without a configuration serves no TLS:
/// STARTTLS is refused, and a `Require` listener then serves nothing.
#[derive(Clone, Default)]
pub struct TlsSettings {
    /// Certificates, key and client verification.
    pub config: Option<Arc<rustls::ServerConfig>>,
    /// The mode of the TCP listeners.
    pub tcp: TlsMode,
    /// The mode of the unix-socket listeners.
    pub unix: TlsMode,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("config", &self.config.is_some())
            .field("tcp", &self.tcp)
            .field("unix", &self.unix)
            .finish()
    }
}

/// The NBD server. Create it with [`Server::new`], run [`Server::serve_unix`] and/or
/// [`Server::serve_tcp`], and manage connections through the other methods.
pub struct Server {
    registry: Arc<dyn ExportRegistry>,
    /// Read at each accept (the mode) and each STARTTLS (the configuration): a change
    /// applies to new connections at once.
    tls: Mutex<TlsSettings>,
    limits: Limits,
    next_id: AtomicU64,
    /// Connections in transmission phase.
    table: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    /// Bumped whenever a connection leaves the table.
    closed_gen: watch::Sender<u64>,
    /// Connection tasks alive, in any phase.
    live: watch::Sender<usize>,
    /// Set by [`Server::drain_all`].
    shutting_down: watch::Sender<bool>,
    global_budget: Arc<Semaphore>,
    pool: Arc<BufferPool>,
    io: IoPool<transmission::Job>,
}

impl Server {
    /// A server looking up exports in `registry`. Starts the I/O threads (if they cannot be
    /// started, device calls fall back to tokio's blocking pool).
    pub fn new(registry: Arc<dyn ExportRegistry>, limits: Limits) -> Arc<Self> {
        let limits = limits.normalized();
        let io = IoPool::new(limits.io_threads);
        Arc::new(Self {
            registry,
            tls: Mutex::new(TlsSettings::default()),
            next_id: AtomicU64::new(1),
            table: Mutex::new(HashMap::new()),
            closed_gen: watch::Sender::new(0),
            live: watch::Sender::new(0),
            shutting_down: watch::Sender::new(false),
            global_budget: Arc::new(Semaphore::new(limits.global_inflight_bytes_usize())),
            pool: BufferPool::new(limits.global_inflight_bytes_usize()),
            io,
            limits,
        })
    }

    /// The limits in force (after normalisation).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Sets the TLS settings; new connections and new TLS handshakes use them at once.
    ///
    /// The server seals and opens records itself once a handshake is over, so it needs the
    /// traffic keys from rustls: a configuration without `enable_secret_extraction` is copied
    /// once with it set.
    pub fn set_tls(&self, mut settings: TlsSettings) {
        if let Some(config) = settings.config.as_mut()
            && !config.enable_secret_extraction
        {
            Arc::make_mut(config).enable_secret_extraction = true;
        }
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    /// The TLS settings in force.
    pub fn tls(&self) -> TlsSettings {
        self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Accepts on a unix listener until `shutdown` resolves; peers identified by SO_PEERCRED
    /// (tokio's `UnixStream::peer_cred`). Connections already accepted keep running: end them
    /// with [`Server::drain_all`].
    pub async fn serve_unix(
        self: &Arc<Self>,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                r = listener.accept() => match r {
                    Ok((stream, _)) => match stream.peer_cred() {
                        Ok(c) => {
                            let peer = Peer::Unix { pid: c.pid(), uid: c.uid(), gid: c.gid() };
                            enlarge_send_buffer(&stream);
                            self.spawn_connection(stream, peer, self.tls().unix);
                        }
                        Err(e) => warn!("cannot read the peer credentials of a unix client: {e}"),
                    },
                    Err(e) => accept_failed(e).await,
                },
            }
        }
    }

    /// Accepts on a TCP listener until `shutdown` resolves (TCP_NODELAY set on every
    /// connection). Connections already accepted keep running: end them with
    /// [`Server::drain_all`].
    pub async fn serve_tcp(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                r = listener.accept() => match r {
                    Ok((stream, addr)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            debug!("cannot set TCP_NODELAY for {addr}: {e}");
                        }
                        enlarge_send_buffer(&stream);
                        self.spawn_connection(stream, Peer::Tcp(addr), self.tls().tcp);
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
    }

    /// Serves `stream` as a session on `export` that is already in transmission phase: the
    /// negotiation happened out of band, as for a kernel NBD device the caller binds itself
    /// (the kernel speaks only the transmission phase, with simple replies and no meta
    /// context). The session is registered like any other (it shows in
    /// [`Server::connections`], and [`Server::disconnect_export`] and
    /// [`Server::drain_all`] end it). Returns what the other end must be configured with,
    /// and a handle that completes when the session ends; `None` when `peer` may not open
    /// the export (or it does not exist) or the server is shutting down. Must be called
    /// within the tokio runtime.
    pub fn serve_preconnected(
        self: &Arc<Self>,
        stream: UnixStream,
        export: &str,
        peer: Peer,
    ) -> Option<(SessionParams, tokio::task::JoinHandle<()>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (export, registration) = self.open_export(export, &peer, id, None)?;
        let geometry = handshake::geometry_for(&export, &self.limits, false, None);
        let params = SessionParams {
            size: geometry.size,
            flags: geometry.flags,
            maximum: geometry.maximum,
        };
        self.live.send_modify(|n| *n += 1);
        let guard = LiveGuard(Arc::clone(self));
        let span = tracing::debug_span!("nbd", conn = id, peer = %peer);
        let handle = tokio::spawn(
            async move {
                debug!(export = %export.name, size = geometry.size, "preconnected session");
                let server = Arc::clone(&guard.0);
                let (rd, wr) = stream.into_halves();
                let entry = Arc::clone(&registration.entry);
                transmission::run(
                    server,
                    geometry,
                    &export,
                    entry,
                    rd,
                    wr,
                    ReadBuf::new(READ_BUF_LEN),
                )
                .await;
                drop(registration);
                drop(guard);
            }
            .instrument(span),
        );
        Some((params, handle))
    }

    /// Live connections in transmission phase on `export` (or all when None), by id.
    pub fn connections(&self, export: Option<&str>) -> Vec<ConnectionInfo> {
        let mut v: Vec<_> = self
            .table()
            .values()
            .filter(|e| export.is_none_or(|x| e.export == x))
            .map(|e| e.info())
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Gracefully ends every connection of `export`: stop reading new requests, finish and
    /// reply to those in flight, then close; returns when all are closed (the caller removed
    /// the export from its registry first, so no new ones arrive). Once it returns, no device
    /// call for these connections is running or will start.
    pub async fn disconnect_export(&self, export: &str) {
        let mut closed = self.closed_gen.subscribe();
        let mut n = 0;
        for e in self.table().values().filter(|e| e.export == export) {
            e.stop();
            n += 1;
        }
        if n > 0 {
            debug!(export, connections = n, "disconnecting export");
        }
        while self.table().values().any(|e| e.export == export) {
            // The sender lives in `self`: this cannot fail while we are borrowed.
            if closed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gracefully ends connection `id` (as [`Server::disconnect_export`] does for a whole
    /// export) without waiting; false if there is no such connection.
    pub fn stop_connection(&self, id: u64) -> bool {
        match self.table().get(&id) {
            Some(e) => {
                e.stop();
                true
            }
            None => false,
        }
    }

    /// Same for every connection (shutdown): after `serve_*` returned, drain everything.
    /// Connections still negotiating are closed; new negotiations are refused.
    pub async fn drain_all(&self) {
        self.shutting_down.send_replace(true);
        for e in self.table().values() {
            e.stop();
        }
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    // -----------------------------------------------------------------------------------------

    fn table(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnEntry>>> {
        // Table operations are single inserts/removes/reads: consistent after any panic.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_shutting_down(&self) -> bool {
        *self.shutting_down.borrow()
    }

    fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.shutting_down.subscribe()
    }

    /// The name "" stands for the registry's default export.
    fn resolve_name(&self, name: &str) -> String {
        if name.is_empty() {
            self.registry.default_export().unwrap_or_default()
        } else {
            name.to_owned()
        }
    }

    /// Looks the export up and registers the connection in one step under the table lock, so
    /// `disconnect_export` either sees the connection or the lookup fails (the export was
    /// removed from the registry before `disconnect_export` took the lock).
    fn open_export(
        self: &Arc<Self>,
        name: &str,
        peer: &Peer,
        id: u64,
        tls: Option<Arc<TlsClient>>,
    ) -> Option<(Arc<Export>, Registration)> {
        let mut table = self.table();
        if self.is_shutting_down() {
            return None;
        }
        let export = self.registry.lookup(name, peer)?;
        let entry = Arc::new(ConnEntry::new(id, export.name.clone(), peer.clone(), tls));
        table.insert(id, Arc::clone(&entry));
        drop(table);
        Some((
            export,
            Registration {
                server: Arc::clone(self),
                entry,
            },
        ))
    }

    fn spawn_connection<T: Transport + tls::Socket>(
        self: &Arc<Self>,
        stream: T,
        peer: Peer,
        mode: TlsMode,
    ) {
        let live = *self.live.borrow();
        if live >= self.limits.max_connections {
            warn!(
                %peer,
                limit = self.limits.max_connections,
                "connection refused: too many connections"
            );
            return;
        }
        self.live.send_modify(|n| *n += 1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let guard = LiveGuard(Arc::clone(self));
        let span = tracing::debug_span!("nbd", conn = id, peer = %peer);
        tokio::spawn(
            async move {
                let server = Arc::clone(&guard.0);
                server.handle(stream, peer, id, mode).await;
                drop(guard);
            }
            .instrument(span),
        );
    }

    async fn handle<T: Transport + tls::Socket>(
        self: Arc<Self>,
        mut stream: T,
        peer: Peer,
        id: u64,
        mode: TlsMode,
    ) {
        debug!("connection accepted");
        let timeout = self.limits.handshake_timeout;
        let negotiated = tokio::time::timeout(timeout, async {
            let mut rb = ReadBuf::new(READ_BUF_LEN);
            let plain = handshake::Phase::Plain;
            let outcome =
                handshake::negotiate(&self, &mut stream, &mut rb, &peer, id, mode, plain).await?;
            let handshake::Outcome::StartTls { no_zeroes } = outcome else {
                return Ok(Negotiated::Plain(stream, rb, outcome));
            };
            let Some(config) = self.tls().config else {
                return Ok(Negotiated::Plain(
                    stream,
                    rb,
                    handshake::Outcome::Closed("TLS was turned off during the negotiation"),
                ));
            };
            let (mut tls, client) = tls::accept(stream, config)
                .await
                .map_err(NbdError::TlsHandshake)?;
            debug!(
                version = %client.version,
                suite = %client.cipher_suite,
                subject = %client.subject(),
                "TLS established"
            );
            let client = Arc::new(client);
            let phase = handshake::Phase::Tls { no_zeroes, client };
            let outcome =
                handshake::negotiate(&self, &mut tls, &mut rb, &peer, id, mode, phase).await?;
            Ok(Negotiated::Tls(tls, rb, outcome))
        })
        .await
        .unwrap_or(Err(NbdError::HandshakeTimeout(timeout)));
        match negotiated {
            Ok(Negotiated::Plain(stream, rb, outcome)) => self.serve(stream, rb, outcome).await,
            Ok(Negotiated::Tls(stream, rb, outcome)) => self.serve(stream, rb, outcome).await,
            Err(NbdError::Io(e)) => debug!("connection failed during the handshake: {e}"),
            Err(e @ NbdError::UnexpectedEof(_)) => debug!("{e}; connection closed"),
            Err(NbdError::TlsHandshake(e)) if e.is_refusal() => {
                warn!("TLS handshake refused, connection closed: {e}");
                self.registry
                    .tls_refused(&peer, e.subject.as_deref(), &e.error.to_string());
            }
            Err(e) => warn!("handshake failed, connection closed: {e}"),
        }
    }

    /// Serves a negotiated session until it ends.
    async fn serve<T: Transport>(
        self: Arc<Self>,
        stream: T,
        rb: ReadBuf,
        outcome: handshake::Outcome,
    ) {
        let (export, geometry, registration) = match outcome {
            handshake::Outcome::Transmission {
                export,
                geometry,
                registration,
            } => (export, geometry, registration),
            handshake::Outcome::Closed(reason) => {
                debug!("{reason}; connection closed");
                return;
            }
            handshake::Outcome::StartTls { .. } => {
                warn!("a second TLS upgrade was asked for; connection closed");
                return;
            }
        };
        debug!(
            export = %export.name,
            size = geometry.size,
            structured = geometry.structured,
            base_allocation = geometry.meta_context.is_some(),
            read_only = geometry.read_only,
            "transmission phase"
        );
        let (rd, wr) = stream.into_halves();
        let entry = Arc::clone(&registration.entry);
        transmission::run(Arc::clone(&self), geometry, &export, entry, rd, wr, rb).await;
        drop(registration);
    }
}

/// A negotiation's end, with the stream it continues on.
enum Negotiated<T> {
    Plain(T, ReadBuf, handshake::Outcome),
    Tls(tls::TlsStream<T>, ReadBuf, handshake::Outcome),
}

/// The send buffer asked for each client's socket: room for a few replies of 256 KiB
/// (nbdcopy's request size), so that each leaves in one `writev`. The kernel's default
/// (`net.core.wmem_default`, about 208 KiB) split every such reply in two, with a wait for
/// the socket in between (docs/benchmarks.md). The kernel takes the memory only while
/// replies wait to be read.
const SEND_BUFFER: usize = 1 << 20;

/// Raises the socket's send buffer to [`SEND_BUFFER`]: past `net.core.wmem_max` where the
/// daemon may (CAP_NET_ADMIN), else as far as that limit allows.
fn enlarge_send_buffer(socket: &impl std::os::fd::AsFd) {
    use rustix::net::sockopt;
    if sockopt::set_socket_send_buffer_size_force(socket, SEND_BUFFER).is_err()
        && let Err(e) = sockopt::set_socket_send_buffer_size(socket, SEND_BUFFER)
    {
        debug!("cannot enlarge a client's send buffer: {e}");
    }
}

/// Logs a failed accept; waits a little when descriptors or memory ran out, so the loop does
/// not spin.
async fn accept_failed(e: std::io::Error) {
    let exhausted = matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12)); // ENFILE, EMFILE, ENOBUFS, ENOMEM
    if exhausted {
        error!("accept failed, out of resources (raise RLIMIT_NOFILE?): {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        debug!("accept failed: {e}");
    }
}
