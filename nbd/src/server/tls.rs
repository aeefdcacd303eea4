//! TLS for the NBD server (proto.md "TLS support"): the modes a listener runs in, the
//! handshake after `NBD_OPT_STARTTLS`, and a TLS stream the server serves like a socket.
//!
//! rustls runs the handshake (through its unbuffered API) and keeps deriving keys; once the
//! handshake is over, records are sealed and opened here ([`record`]), each way on its own:
//! - the task that reads requests owns the opening way and its buffer: it reads whole
//!   records from the socket and opens them in place, without a lock;
//! - the threads that write replies share the sealing way behind a mutex that only they
//!   take (the reply queue already has one writer at a time). A write copies the reply's
//!   pieces into whole records in one reusable buffer, seals them in place, and sends what
//!   the socket takes; what it does not take stays buffered, and the reply path sees the
//!   writer as blocked until [`ReplyWriter::try_flush`] has sent it all.
//!
//! TLS 1.3 key updates from the client are honoured (and answered when asked for), and our
//! own key is updated before it reaches its cipher's confidentiality limit.

use std::future::Future;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError};
use rustls::{
    DigitallySignedStruct, DistinguishedName, ProtocolVersion, SignatureScheme,
    SupportedCipherSuite,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use super::Transport;
use super::reply::ReplyWriter;
use crate::device::TlsClient;
use crate::error::TlsHandshakeError as HandshakeError;

mod gcm;
mod record;
use record::{
    Direction, HEADER, MAX_OVERHEAD, MAX_PLAINTEXT, MAX_RECORD, Pieces, Version, Way, content,
};

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

/// Socket reads take up to this much: a few whole records.
const RX_BUF: usize = 4 * MAX_RECORD;
/// Plaintext one write seals at most (8 full records) before it sends them.
const TX_BATCH: usize = 8 * MAX_PLAINTEXT;
/// The send buffer: a batch of records, and room for the small records (key update,
/// close_notify) that may follow.
const TX_BUF: usize = 8 * (MAX_PLAINTEXT + MAX_OVERHEAD) + 4 * MAX_OVERHEAD + 64;
/// A key update goes out this many records before the cipher's limit.
const LIMIT_MARGIN: u64 = 1 << 10;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic mid-record leaves a session whose next record fails authentication at the
    // client, not memory in an unsafe state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What both halves of a session share.
struct Shared<S> {
    sock: S,
    /// The sealing way: its keys, sequence and the records not yet sent.
    tx: Mutex<Tx>,
    /// rustls's side of the session, which derives the keys of a TLS 1.3 key update. Taken
    /// only for a key update, and never while waiting for the sealing way's lock.
    keys: Mutex<KernelConnection<ServerConnectionData>>,
    version: Version,
    /// The client asked for a key update: ours goes out before our next record.
    update_requested: AtomicBool,
    /// Records one key may seal (the cipher suite's confidentiality limit).
    limit: u64,
}

struct Tx {
    dir: Direction,
    /// Sealed records in `buf[..len]`, made once per session (at the first write);
    /// `buf[sent..len]` is still to be sent.
    buf: Box<[u8]>,
    len: usize,
    sent: usize,
    /// close_notify is sealed: nothing follows it.
    closed: bool,
}

impl<S: Socket> Shared<S> {
    /// Sends sealed records as far as the socket takes them now: true when all went out.
    fn send(&self, tx: &mut Tx) -> io::Result<bool> {
        while tx.sent < tx.len {
            match self
                .sock
                .try_write_vectored(&[IoSlice::new(&tx.buf[tx.sent..tx.len])])
            {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => tx.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        tx.len = 0;
        tx.sent = 0;
        Ok(true)
    }

    /// Seals one small record of `payload` after those already buffered.
    fn seal(tx: &mut Tx, typ: u8, payload: &[u8]) -> io::Result<()> {
        tx.make_room();
        let slices = [IoSlice::new(payload)];
        let n = tx.dir.seal_into(
            typ,
            &mut Pieces::new(&slices),
            payload.len(),
            &mut tx.buf[tx.len..],
        )?;
        tx.len += n;
        Ok(())
    }

    /// Seals close_notify; nothing is sealed after it.
    fn close(tx: &mut Tx) -> io::Result<()> {
        if tx.closed {
            return Ok(());
        }
        tx.closed = true;
        Self::seal(tx, content::ALERT, &[ALERT_WARNING, ALERT_CLOSE_NOTIFY])
    }

    /// Before application data: our key update, if the client asked for one or the key is
    /// close to its limit (RFC 8446 §4.6.3, §5.5).
    fn update_keys_if_due(&self, tx: &mut Tx) -> io::Result<()> {
        let requested = self.update_requested.swap(false, Ordering::Relaxed);
        let worn = tx.dir.seq() >= self.limit.saturating_sub(LIMIT_MARGIN);
        if !requested && !worn {
            return Ok(());
        }
        if self.version == Version::Tls12 {
            // TLS 1.2 has no key update: the session ends before its key wears out, as
            // rustls's own record layer does it.
            Self::close(tx)?;
            return Err(io::Error::other(
                "the TLS 1.2 session sealed as many records as its cipher allows; \
                 the client must connect again",
            ));
        }
        Self::seal(tx, content::HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 0])?;
        let (seq, secrets) = lock(&self.keys)
            .update_tx_secret()
            .map_err(io::Error::other)?;
        tx.dir = Direction::new(self.version, Way::Seal, seq, secrets)?;
        Ok(())
    }
}

impl Tx {
    /// The send buffer, made at the first write: a session that never writes (a refused
    /// client) never pays for it.
    fn make_room(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0u8; TX_BUF].into_boxed_slice();
        }
    }
}

const ALERT_WARNING: u8 = 1;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;
const HS_KEY_UPDATE: u8 = 24;

/// The reading half: opens the client's records in its own buffer.
pub(crate) struct TlsReader<S> {
    shared: Arc<Shared<S>>,
    dir: Direction,
    buf: Box<[u8]>,
    /// `buf[start..end]`: received bytes not yet opened.
    start: usize,
    end: usize,
    /// Opened plaintext not yet handed out.
    plain: Range<usize>,
    /// Application data rustls opened while finishing the handshake: handed out first.
    early: Vec<u8>,
    early_at: usize,
    /// close_notify received.
    eof: bool,
}

/// The writing half of a session, shared by the threads that write replies.
pub(crate) struct TlsWriter<S>(Arc<Shared<S>>);

/// A session after a completed TLS handshake, served like a socket.
pub(crate) struct TlsStream<S> {
    reader: TlsReader<S>,
    writer: TlsWriter<S>,
}

/// Runs the server side of a TLS handshake on `sock` (just after `NBD_OPT_STARTTLS` was
/// acknowledged). A failure is final: the caller closes the connection. `config` must have
/// `enable_secret_extraction` set ([`crate::server::Server::set_tls`] sees to it).
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

/// Makes room in a receive buffer for a whole record after the received bytes not yet
/// processed (`buf[start..end]`): they move to the front when less than that is left.
fn make_room(buf: &mut [u8], start: &mut usize, end: &mut usize) {
    if *start == *end {
        (*start, *end) = (0, 0);
    } else if buf.len() - *start < MAX_RECORD {
        buf.copy_within(*start..*end, 0);
        (*start, *end) = (0, *end - *start);
    }
}

/// Writes all of `bytes`, waiting for the socket as needed.
async fn write_all<S: Socket>(sock: &S, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match sock.try_write_vectored(&[IoSlice::new(bytes)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn handshake<S: Socket>(
    sock: S,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<(TlsStream<S>, TlsClient)> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut buf = vec![0u8; RX_BUF].into_boxed_slice();
    let (mut start, mut end) = (0, 0);
    let mut out = Vec::new();
    let mut early = Vec::new();
    loop {
        let status = conn.process_tls_records(&mut buf[start..end]);
        let mut discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(e) => {
                // rustls has an alert for the client: send it, best effort, then give up.
                let failed = invalid(e.to_string());
                let status = conn.process_tls_records(&mut []);
                if let Ok(ConnectionState::EncodeTlsData(mut alert)) = status.state {
                    let mut scratch = [0u8; 64];
                    if let Ok(n) = alert.encode(&mut scratch) {
                        let _ = sock.try_write_vectored(&[IoSlice::new(&scratch[..n])]);
                    }
                }
                return Err(failed);
            }
        };
        // What to do once the records rustls is done with are dropped.
        enum Next {
            Process,
            Receive,
            Done,
        }
        let next = match state {
            ConnectionState::EncodeTlsData(mut data) => {
                let at = out.len();
                out.resize(at + MAX_RECORD, 0);
                let n = match data.encode(&mut out[at..]) {
                    Ok(n) => n,
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        out.resize(at + required_size, 0);
                        data.encode(&mut out[at..])
                            .map_err(|e| io::Error::other(e.to_string()))?
                    }
                    Err(e) => return Err(io::Error::other(e.to_string())),
                };
                out.truncate(at + n);
                Next::Process
            }
            ConnectionState::TransmitTlsData(data) => {
                write_all(&sock, &out).await?;
                out.clear();
                data.done();
                Next::Process
            }
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(|e| invalid(e.to_string()))?;
                    discard += record.discard;
                    early.extend_from_slice(record.payload);
                }
                Next::Process
            }
            ConnectionState::WriteTraffic(_) => Next::Done,
            ConnectionState::BlockedHandshake => Next::Receive,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the TLS session during the handshake",
                ));
            }
            _ => {
                return Err(invalid(
                    "the client sent early data, which this server refuses",
                ));
            }
        };
        start += discard;
        match next {
            Next::Process => {}
            Next::Done => break,
            Next::Receive => {
                make_room(&mut buf, &mut start, &mut end);
                if end == buf.len() {
                    return Err(invalid(
                        "a TLS handshake message from the client is too large",
                    ));
                }
                loop {
                    match sock.try_read(&mut buf[end..]) {
                        Ok(0) => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the client closed the connection during the TLS handshake",
                            ));
                        }
                        Ok(n) => {
                            end += n;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.readable().await?,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    let mut chain = conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c: &CertificateDer<'_>| c.to_vec());
    let certificate = chain.next();
    let client = TlsClient {
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
    };
    let (secrets, keys) = conn
        .dangerous_into_kernel_connection()
        .map_err(io::Error::other)?;
    let version = match keys.protocol_version() {
        ProtocolVersion::TLSv1_3 => Version::Tls13,
        ProtocolVersion::TLSv1_2 => Version::Tls12,
        v => return Err(io::Error::other(format!("{v:?} is not supported"))),
    };
    let limit = match keys.negotiated_cipher_suite() {
        SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
    };
    let (tx_seq, tx_secrets) = secrets.tx;
    let (rx_seq, rx_secrets) = secrets.rx;
    let shared = Arc::new(Shared {
        sock,
        tx: Mutex::new(Tx {
            dir: Direction::new(version, Way::Seal, tx_seq, tx_secrets)?,
            buf: Box::default(),
            len: 0,
            sent: 0,
            closed: false,
        }),
        keys: Mutex::new(keys),
        version,
        update_requested: AtomicBool::new(false),
        limit,
    });
    let reader = TlsReader {
        shared: Arc::clone(&shared),
        dir: Direction::new(version, Way::Open, rx_seq, rx_secrets)?,
        buf,
        start,
        end,
        plain: 0..0,
        early,
        early_at: 0,
        eof: false,
    };
    let writer = TlsWriter(shared);
    Ok((TlsStream { reader, writer }, client))
}

impl<S: Socket> TlsReader<S> {
    /// Opens the next whole record in the buffer, if there is one: `Ok(false)` when more
    /// bytes are needed first. Application data goes straight into `out` when all of the
    /// record fits there (no copy after the cipher's); otherwise it is opened in place and
    /// handed out from [`plain`](Self::plain).
    fn open_next(&mut self, out: &mut tokio::io::ReadBuf<'_>) -> io::Result<bool> {
        let have = self.end - self.start;
        if have < HEADER {
            return Ok(false);
        }
        let at = self.start;
        let len = HEADER + usize::from(u16::from_be_bytes([self.buf[at + 3], self.buf[at + 4]]));
        if len > MAX_RECORD {
            return Err(invalid(
                "the client sent a TLS record over the size limit (record_overflow)",
            ));
        }
        if have < len {
            return Ok(false);
        }
        self.start += len;
        let record = &mut self.buf[at..at + len];
        let inner = self.dir.inner_len(len);
        // Alerts and key updates are a few bytes; they are handled from a copy.
        let mut control = [0u8; 8];
        let (typ, control_len) = if inner > 0 && out.remaining() >= inner {
            let dest = out.initialize_unfilled_to(inner);
            let (typ, range) = self.dir.open(record, Some(dest))?;
            if typ == content::APPLICATION_DATA {
                out.advance(range.end);
                return Ok(true);
            }
            (typ, copy_control(&mut control, &dest[range])?)
        } else {
            let (typ, range) = self.dir.open(record, None)?;
            if typ == content::APPLICATION_DATA {
                self.plain = at + range.start..at + range.end;
                return Ok(true);
            }
            (typ, copy_control(&mut control, &record[range])?)
        };
        let message = &control[..control_len];
        match typ {
            content::ALERT => self.alert(message)?,
            content::HANDSHAKE => self.handshake_message(message)?,
            t => {
                return Err(invalid(format!(
                    "the client sent a TLS record of type {t} after the handshake"
                )));
            }
        }
        Ok(true)
    }

    fn alert(&mut self, message: &[u8]) -> io::Result<()> {
        match *message {
            [_, ALERT_CLOSE_NOTIFY] => self.eof = true,
            [_, ALERT_USER_CANCELED] => {}
            [ALERT_WARNING, _] if self.shared.version == Version::Tls12 => {}
            [_, description] => {
                return Err(invalid(format!(
                    "the client ended the TLS session with alert {description}"
                )));
            }
            _ => return Err(invalid("the client sent a malformed TLS alert")),
        }
        Ok(())
    }

    /// After the handshake a client may only send a TLS 1.3 KeyUpdate, which ends its
    /// record (RFC 8446 §4.6.3, §5.1). TLS 1.2 renegotiation is refused, as rustls does.
    fn handshake_message(&mut self, message: &[u8]) -> io::Result<()> {
        if self.shared.version == Version::Tls12 {
            return Err(invalid(
                "the client tried to renegotiate the TLS 1.2 session, which this server refuses",
            ));
        }
        let request = match *message {
            [HS_KEY_UPDATE, 0, 0, 1, request @ (0 | 1)] => request,
            _ => {
                return Err(invalid(
                    "the client sent a TLS handshake message other than KeyUpdate after the handshake",
                ));
            }
        };
        let (seq, secrets) = lock(&self.shared.keys)
            .update_rx_secret()
            .map_err(io::Error::other)?;
        self.dir = Direction::new(Version::Tls13, Way::Open, seq, secrets)?;
        if request == 1 {
            self.shared.update_requested.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Copies a control message (an alert, a key update) out of a record: it is never longer
/// than `into`.
fn copy_control(into: &mut [u8; 8], message: &[u8]) -> io::Result<usize> {
    let Some(slot) = into.get_mut(..message.len()) else {
        return Err(invalid(
            "the client sent a TLS alert or handshake message this server does not accept \
             after the handshake",
        ));
    };
    slot.copy_from_slice(message);
    Ok(message.len())
}

impl<S: Socket> AsyncRead for TlsReader<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early_at < this.early.len() {
            let n = out.remaining().min(this.early.len() - this.early_at);
            out.put_slice(&this.early[this.early_at..this.early_at + n]);
            this.early_at += n;
            if this.early_at == this.early.len() {
                this.early = Vec::new();
                this.early_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.plain.is_empty() {
                let n = out.remaining().min(this.plain.len());
                out.put_slice(&this.buf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let before = out.filled().len();
            if this.open_next(out)? {
                if out.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            make_room(&mut this.buf, &mut this.start, &mut this.end);
            match this.shared.sock.try_read(&mut this.buf[this.end..]) {
                // Closed without close_notify: an end of stream like any other (a client that
                // vanished mid-request is told apart by the caller).
                Ok(0) => {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => this.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(this.shared.sock.poll_read_ready(cx))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S: Socket> ReplyWriter for TlsWriter<S> {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let shared = &*self.0;
        let mut tx = lock(&shared.tx);
        if tx.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS session is closed",
            ));
        }
        // Records already sealed go first; new ones only once the socket took them.
        if !shared.send(&mut tx)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(TX_BATCH);
        if total == 0 {
            return Ok(0);
        }
        shared.update_keys_if_due(&mut tx)?;
        tx.make_room();
        let Tx { dir, buf, len, .. } = &mut *tx;
        let mut pieces = Pieces::new(bufs);
        let mut taken = 0;
        while taken < total {
            let n = MAX_PLAINTEXT.min(total - taken);
            *len += dir.seal_into(content::APPLICATION_DATA, &mut pieces, n, &mut buf[*len..])?;
            taken += n;
        }
        shared.send(&mut tx)?;
        Ok(taken)
    }

    fn try_flush(&self) -> io::Result<()> {
        let shared = &*self.0;
        if shared.send(&mut lock(&shared.tx))? {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        self.0.sock.writable()
    }

    async fn finish(&self) -> io::Result<()> {
        Shared::<S>::close(&mut lock(&self.0.tx))?;
        loop {
            match self.try_flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.0.sock.writable().await?,
                other => return other,
            }
        }
    }
}

impl<S: Socket> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl<S: Socket> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.writer.try_write_vectored(&[IoSlice::new(buf)]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.writer.0.sock.poll_write_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.writer.try_flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.writer.0.sock.poll_write_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Shared::<S>::close(&mut lock(&self.writer.0.tx))?;
        self.poll_flush(cx)
    }
}

impl<S: Socket> Transport for TlsStream<S> {
    type Reader = TlsReader<S>;
    type Writer = TlsWriter<S>;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        (self.reader, self.writer)
    }
}
