//! The crate's error type.

/// What went wrong while decoding NBD messages or serving a connection.
///
/// Decoding never reports "not enough bytes yet" as an error: that is
/// [`crate::proto::Decoded::Incomplete`]. Every variant here means the peer sent something the
/// protocol does not allow, or the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A message did not start with the magic number the protocol requires at that point.
    #[error("bad {what} magic {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// Which message was expected.
        what: &'static str,
        /// The magic the protocol requires.
        expected: u64,
        /// The value received.
        found: u64,
    },
    /// A message had the right framing but contents the protocol forbids.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which message or field.
        what: &'static str,
        /// Why it is rejected (a fixed sentence: never data from the peer).
        reason: &'static str,
    },
    /// The client set handshake flags this server did not offer.
    #[error("client sent unknown client flags {0:#010x}")]
    UnknownClientFlags(u32),
    /// A length field announced more data than this server accepts for that message.
    #[error("{what} of {length} bytes exceeds the limit of {limit} bytes")]
    TooLong {
        /// Which message.
        what: &'static str,
        /// The announced length.
        length: u64,
        /// The limit.
        limit: u64,
    },
    /// The peer closed the connection in the middle of a message.
    #[error("peer closed the connection in the middle of {0}")]
    UnexpectedEof(&'static str),
    /// The handshake did not finish in time.
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The TLS handshake failed (a client that does not speak TLS, an untrusted, expired or
    /// revoked certificate, no certificate where one is required).
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(TlsHandshakeError),
    /// The transport failed.
    #[error("connection I/O failed")]
    Io(#[from] std::io::Error),
}

impl NbdError {
    pub(crate) const fn invalid(what: &'static str, reason: &'static str) -> Self {
        Self::Invalid { what, reason }
    }
}

/// Why a TLS handshake failed: rustls's reason, and the subject of the client certificate it
/// rejected, if it was one.
#[derive(Debug)]
pub struct TlsHandshakeError {
    /// The I/O error (`InvalidData` with rustls's error for a refusal).
    pub error: std::io::Error,
    /// The rejected certificate's subject.
    pub subject: Option<String>,
}

impl std::fmt::Display for TlsHandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.subject {
            Some(s) => write!(f, "{} (client certificate {s})", self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

impl TlsHandshakeError {
    /// Whether the server refused the client (a bad certificate, no certificate, not TLS),
    /// as opposed to the client going away or timing out.
    pub fn is_refusal(&self) -> bool {
        self.error.kind() == std::io::ErrorKind::InvalidData
    }
}
