//! TLS for the NBD server (proto.md "TLS support"): the modes a listener runs in, the
//! handshake after `NBD_OPT_STARTTLS`, and a TLS stream the server serves like a socket.
//!
//! One rustls `ServerConnection` per session, behind a mutex, shared by the task that reads
//! requests (it decrypts) and the threads that write replies (they encrypt, as a socket's
//! writers would write). A writer encrypts a reply into rustls's outgoing buffer and sends
//! what the socket takes; what it does not take stays in that buffer, and the reply path
//! sees the writer as blocked until [`ReplyWriter::try_flush`] has sent it all. The socket is
//! used through shared references only (`try_read`, `try_write`, readiness), so the reader
//! and the writers never wait for each other except for the mutex, which is held for one
//! encryption or decryption at a time, never across an await.

use std::future::Future;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use rustls::ServerConnection;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use super::Transport;
use super::reply::ReplyWriter;
use crate::device::TlsClient;
use crate::error::TlsHandshakeError as HandshakeError;

/// How a listener treats TLS (proto.md: "NOTLS", "SELECTIVETLS" and "FORCEDTLS").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS offered: clients may upgrade; exports marked TLS-only need it.
    On,
    /// TLS required: before the upgrade only `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` are
    /// served.
    Require,
}

impl TlsMode {
    /// `off`, `on` or `require`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

/// A socket TLS runs over, used through shared references.
pub(crate) trait Socket: Send + Sync + Unpin + 'static {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send + '_;
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$t>::try_write_vectored(self, bufs)
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
                <$t>::writable(self)
            }
        }
    };
}
socket!(TcpStream);
socket!(UnixStream);

/// `std::io` faces of a socket's non-blocking calls, for rustls.
struct SockIo<'a, S>(&'a S);

impl<S: Socket> Read for SockIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl<S: Socket> Write for SockIo<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Shared<S> {
    sock: S,
    conn: Mutex<ServerConnection>,
    /// What sharing the session costs: acquisitions, those that found it taken, and the
    /// time they waited (logged when the connection closes).
    locks: std::sync::atomic::AtomicU64,
    contended: std::sync::atomic::AtomicU64,
    waited_ns: std::sync::atomic::AtomicU64,
}

impl<S> Drop for Shared<S> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        tracing::debug!(
            locks = self.locks.load(Relaxed),
            contended = self.contended.load(Relaxed),
            waited_ms = self.waited_ns.load(Relaxed) / 1_000_000,
            "TLS session closed"
        );
    }
}

impl<S: Socket> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, ServerConnection> {
        use std::sync::atomic::Ordering::Relaxed;
        self.locks.fetch_add(1, Relaxed);
        // A panic mid-record would leave the session unusable, not inconsistent memory: the
        // next call fails with rustls's own error.
        match self.conn.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let started = std::time::Instant::now();
                let g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
                self.contended.fetch_add(1, Relaxed);
                let waited = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.waited_ns.fetch_add(waited, Relaxed);
                g
            }
        }
    }

    /// Sends what rustls has queued, as far as the socket takes it now: true when all of it
    /// went out.
    fn send_queued(&self, conn: &mut ServerConnection) -> io::Result<bool> {
        while conn.wants_write() {
            match conn.write_tls(&mut SockIo(&self.sock)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads what the socket has into rustls and processes it. `Ok(false)` at end of
    /// stream; `WouldBlock` when there was nothing to read.
    fn receive(&self, conn: &mut ServerConnection) -> io::Result<bool> {
        if conn.read_tls(&mut SockIo(&self.sock))? == 0 {
            return Ok(false);
        }
        if let Err(e) = conn.process_new_packets() {
            // The alert rustls queued tells the client why; then the session is over.
            let _ = self.send_queued(conn);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        // A handshake message or a key update may need an answer now.
        let _ = self.send_queued(conn)?;
        Ok(true)
    }
}

/// A client verifier that remembers the subject of a certificate it rejects, so that a failed
/// handshake can be logged and audited with it (rustls keeps no certificate it rejected).
/// Wrap the server configuration's verifier in it.
#[derive(Debug)]
pub struct NamingVerifier(pub Arc<dyn ClientCertVerifier>);

thread_local! {
    /// The subject of the certificate the last verification on this thread rejected. rustls
    /// verifies within `process_new_packets`, on the thread that runs the handshake, which
    /// reads this right after.
    static REJECTED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

impl ClientCertVerifier for NamingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now);
        if verified.is_err() {
            let subject = crate::x509::names(end_entity).map(|n| n.subject);
            REJECTED.with(|r| *r.borrow_mut() = subject);
        }
        verified
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A session after a completed TLS handshake, served like a socket.
pub(crate) struct TlsStream<S>(Arc<Shared<S>>);

/// The writing half of a [`TlsStream`], shared by the threads that write replies.
pub(crate) struct TlsWriter<S>(Arc<Shared<S>>);

/// Runs the server side of a TLS handshake on `sock` (just after `NBD_OPT_STARTTLS` was
/// acknowledged). A failure is final: the caller closes the connection.
pub(crate) async fn accept<S: Socket>(
    sock: S,
    config: Arc<rustls::ServerConfig>,
) -> Result<(TlsStream<S>, TlsClient), HandshakeError> {
    REJECTED.with(|r| r.borrow_mut().take());
    handshake(sock, config)
        .await
        .map_err(|error| HandshakeError {
            subject: REJECTED.with(|r| r.borrow_mut().take()),
            error,
        })
}

async fn handshake<S: Socket>(
    sock: S,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<(TlsStream<S>, TlsClient)> {
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let shared = Arc::new(Shared {
        sock,
        conn: Mutex::new(conn),
        locks: Default::default(),
        contended: Default::default(),
        waited_ns: Default::default(),
    });
    loop {
        let (sent, handshaking) = {
            let mut conn = shared.lock();
            (shared.send_queued(&mut conn)?, conn.is_handshaking())
        };
        if !sent {
            shared.sock.writable().await?;
            continue;
        }
        if !handshaking {
            break;
        }
        shared.sock.readable().await?;
        let received = {
            let mut conn = shared.lock();
            shared.receive(&mut conn)
        };
        match received {
            Ok(true) => {}
            Ok(false) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the TLS handshake",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let client = {
        let conn = shared.lock();
        let chain: Vec<Vec<u8>> = conn
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c: &CertificateDer<'_>| c.to_vec())
            .collect();
        let mut chain = chain.into_iter();
        let certificate = chain.next();
        TlsClient {
            version: conn
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            cipher_suite: conn
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
                .unwrap_or_default(),
            names: certificate.as_deref().and_then(crate::x509::names),
            certificate,
            intermediates: chain.collect(),
        }
    };
    Ok((TlsStream(shared), client))
}

impl<S: Socket> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &*self.0;
        loop {
            let mut conn = shared.lock();
            match conn.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: an end of stream like any other (a client
                // that vanished mid-request is told apart by the caller).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
            match shared.receive(&mut conn) {
                // At the end of the stream rustls's reader reports how the session ended.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(conn);
                    ready!(shared.sock.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S: Socket> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &*self.0;
        loop {
            let mut conn = shared.lock();
            if !shared.send_queued(&mut conn)? {
                drop(conn);
                ready!(shared.sock.poll_write_ready(cx))?;
                continue;
            }
            let n = conn.writer().write(buf)?;
            shared.send_queued(&mut conn)?;
            return Poll::Ready(Ok(n));
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &*self.0;
        loop {
            if shared.send_queued(&mut shared.lock())? {
                return Poll::Ready(Ok(()));
            }
            ready!(shared.sock.poll_write_ready(cx))?;
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.lock().send_close_notify();
        self.poll_flush(cx)
    }
}

impl<S: Socket> ReplyWriter for TlsWriter<S> {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let shared = &*self.0;
        let mut conn = shared.lock();
        // Records already made go first; new ones only once the socket took them.
        if !shared.send_queued(&mut conn)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = conn.writer().write_vectored(bufs)?;
        shared.send_queued(&mut conn)?;
        Ok(n)
    }

    fn try_flush(&self) -> io::Result<()> {
        let shared = &*self.0;
        if shared.send_queued(&mut shared.lock())? {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        self.0.sock.writable()
    }

    async fn finish(&self) -> io::Result<()> {
        self.0.lock().send_close_notify();
        loop {
            match self.try_flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.0.sock.writable().await?,
                other => return other,
            }
        }
    }
}

impl<S: Socket> Transport for TlsStream<S> {
    type Reader = TlsStream<S>;
    type Writer = TlsWriter<S>;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        let writer = TlsWriter(Arc::clone(&self.0));
        (self, writer)
    }
}
