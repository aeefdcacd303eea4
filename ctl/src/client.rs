//! A blocking client for the daemon's control socket (one JSON line each way).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use control_api::{
    API_VERSION, ApiError, Envelope, Outcome, Request, Response, ResponseEnvelope, decode_line,
    encode_line,
};

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "the cryptnbd daemon is not running (no answer on {0}): start it with 'cryptnbd' or \
         'systemctl start cryptnbd', or point --socket at it"
    )]
    NotRunning(PathBuf),
    /// The daemon answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The connection broke or the answer was malformed.
    #[error("talking to the daemon on {path} failed: {message}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A connection to the daemon.
pub struct Client {
    path: PathBuf,
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects; `Ok(None)` when no daemon listens there (so a verb may work offline).
    pub fn try_connect(path: &Path) -> Result<Option<Self>, ClientError> {
        match UnixStream::connect(path) {
            Ok(stream) => Ok(Some(Self {
                path: path.into(),
                stream,
                buf: Vec::new(),
            })),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(ClientError::Protocol {
                path: path.into(),
                message: e.to_string(),
            }),
        }
    }

    /// Connects, or explains that the daemon is not running.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        Self::try_connect(path)?.ok_or_else(|| ClientError::NotRunning(path.into()))
    }

    /// Sends a request and waits for its answer.
    pub fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        let proto = |message: String| ClientError::Protocol {
            path: self.path.clone(),
            message,
        };
        self.stream
            .write_all(&encode_line(&Envelope {
                version: API_VERSION,
                request,
            }))
            .map_err(|e| proto(e.to_string()))?;
        let mut chunk = [0u8; 8192];
        loop {
            match decode_line::<ResponseEnvelope>(&mut self.buf) {
                Ok(Some(r)) => {
                    return match r.outcome {
                        Outcome::Ok { result } => Ok(result),
                        Outcome::Error(e) => Err(ClientError::Api(e)),
                    };
                }
                Ok(None) => {}
                Err(e) => return Err(proto(e.to_string())),
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| proto(e.to_string()))?;
            if n == 0 {
                return Err(proto("the daemon closed the connection".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
