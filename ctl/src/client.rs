//! A blocking client for the daemon's control socket (one JSON line each way).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use std::os::fd::BorrowedFd;

use control_api::{
    ApiError, Envelope, Outcome, ProgressEvent, Request, Response, ResponseEnvelope, decode_line,
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
        self.call_with(request, None, None)
    }

    /// Sends a request, with a file descriptor passed alongside (SCM_RIGHTS) when given, and
    /// asks for progress events when `progress` is given (each is handed to it) before the
    /// answer.
    pub fn call_with(
        &mut self,
        request: Request,
        fd: Option<BorrowedFd<'_>>,
        mut progress: Option<&mut dyn FnMut(&ProgressEvent)>,
    ) -> Result<Response, ClientError> {
        let proto = |path: &Path, message: String| ClientError::Protocol {
            path: path.into(),
            message,
        };
        let mut envelope = Envelope::new(request);
        envelope.progress = progress.is_some();
        let line = encode_line(&envelope);
        let mut sent = 0;
        if let Some(fd) = fd {
            use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
            let fds = [fd];
            let mut space =
                [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut cmsg = SendAncillaryBuffer::new(&mut space);
            if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(proto(
                    &self.path,
                    "cannot attach the file descriptor".into(),
                ));
            }
            sent = rustix::net::sendmsg(
                &self.stream,
                &[std::io::IoSlice::new(&line)],
                &mut cmsg,
                SendFlags::empty(),
            )
            .map_err(|e| proto(&self.path, e.to_string()))?;
        }
        self.stream
            .write_all(&line[sent..])
            .map_err(|e| proto(&self.path, e.to_string()))?;
        let mut chunk = [0u8; 8192];
        loop {
            match decode_line::<ResponseEnvelope>(&mut self.buf) {
                Ok(Some(r)) => match r.outcome {
                    Outcome::Ok { result } => return Ok(result),
                    Outcome::Error(e) => return Err(ClientError::Api(e)),
                    Outcome::Progress(p) => {
                        if let Some(f) = progress.as_mut() {
                            f(&p);
                        }
                        continue;
                    }
                },
                Ok(None) => {}
                Err(e) => return Err(proto(&self.path, e.to_string())),
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| proto(&self.path, e.to_string()))?;
            if n == 0 {
                return Err(proto(&self.path, "the daemon closed the connection".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
