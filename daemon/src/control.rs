//! The control socket: one JSON line per request and per response (control-api). Callers are
//! identified by SO_PEERCRED and must be root, the daemon's own user, or on the allow-lists;
//! others are told so and disconnected before anything they send is read.

use std::sync::Arc;

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use control_api::{
    API_VERSION, ApiError, Envelope, ErrorCode, Outcome, ProgressEvent, Request, ResponseEnvelope,
    decode_line, encode_line,
};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::request::RequestContext;

/// Who may use the control socket.
#[derive(Debug, Clone)]
pub struct ControlAcl {
    /// Allowed users (root and the daemon's own uid always are).
    pub uids: Vec<u32>,
    /// Allowed primary groups.
    pub gids: Vec<u32>,
}

impl ControlAcl {
    fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == rustix::process::geteuid().as_raw()
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
    }
}

/// Serves the control socket until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    acl: ControlAcl,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = Arc::clone(&daemon);
                    let acl = acl.clone();
                    tokio::spawn(async move { connection(stream, daemon, acl).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Descriptors a connection may have queued (passed with SCM_RIGHTS, not yet used).
const MAX_QUEUED_FDS: usize = 4;
/// How often a long operation reports progress to a client that asked.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Reads what is there, with any descriptors passed alongside (SCM_RIGHTS); 0 at EOF.
async fn recv(
    stream: &UnixStream,
    chunk: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
) -> std::io::Result<usize> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    loop {
        stream.readable().await?;
        let got = stream.try_io(Interest::READABLE, || {
            let mut space = [std::mem::MaybeUninit::<u8>::uninit();
                rustix::cmsg_space!(ScmRights(MAX_QUEUED_FDS))];
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [std::io::IoSliceMut::new(chunk)];
            let r = rustix::net::recvmsg(stream, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            for m in cmsg.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = m {
                    for fd in rights {
                        // Beyond the limit they are closed (dropped) at once.
                        if fds.len() < MAX_QUEUED_FDS {
                            fds.push_back(fd);
                        }
                    }
                }
            }
            Ok(r.bytes)
        });
        match got {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn send(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn reply(stream: &UnixStream, outcome: Outcome) -> std::io::Result<()> {
    send(
        stream,
        &encode_line(&ResponseEnvelope {
            version: API_VERSION,
            outcome,
        }),
    )
    .await
}

/// A progress event from the operation's (phase, done, total).
fn progress_event(
    operation: &str,
    volume: &str,
    (phase, done, total): (&str, u64, u64),
) -> Outcome {
    Outcome::Progress(ProgressEvent {
        operation: operation.into(),
        volume: volume.into(),
        phase: phase.into(),
        done,
        total,
    })
}

/// The operation name and volume a request's progress events carry.
fn progress_label(request: &Request) -> (&'static str, String) {
    match request {
        Request::Create(r) => ("import", r.name.clone()),
        Request::Rebuild(r) => ("rebuild", r.volume.clone()),
        Request::Snapshot { volume, .. } => ("snapshot", volume.clone()),
        Request::Reencrypt { volume, .. } => ("reencrypt", volume.clone()),
        Request::Export(r) => ("export", r.volume.clone()),
        _ => ("", String::new()),
    }
}

async fn connection(stream: UnixStream, daemon: Arc<Daemon>, acl: ControlAcl) {
    let caller = match stream.peer_cred() {
        Ok(c) => Caller {
            uid: c.uid(),
            gid: c.gid(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "control socket: no peer credentials; closing");
            return;
        }
    };
    if !acl.allows(caller.uid, caller.gid) {
        tracing::warn!(uid = caller.uid, "control socket: caller not allowed");
        let _ = reply(
            &stream,
            Outcome::Error(ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "uid {} may not control this cryptnbd: ask its administrator to add you to \
                     control.allow_uids or control.allow_gids",
                    caller.uid
                ),
            )),
        )
        .await;
        return;
    }
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 8192];
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    loop {
        let envelope = loop {
            match decode_line::<Envelope>(&mut buf) {
                Ok(Some(e)) => break Ok(e),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            match recv(&stream, &mut chunk, &mut fds).await {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    tracing::debug!(error = %e, "control connection read failed");
                    return;
                }
            }
        };
        let outcome = match envelope {
            Err(e) => {
                let _ = reply(
                    &stream,
                    Outcome::Error(ApiError::new(ErrorCode::InvalidRequest, e.to_string())),
                )
                .await;
                // The stream may be out of sync (an overlong line): close it.
                return;
            }
            Ok(env) if env.version > API_VERSION => Outcome::Error(ApiError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this cryptnbd speaks control API version {API_VERSION}, the client {}: upgrade the daemon",
                    env.version
                ),
            )),
            Ok(env) => {
                tracing::debug!(uid = caller.uid, request = ?std::mem::discriminant(&env.request), "control request");
                let (operation, volume) = progress_label(&env.request);
                // The descriptor sent with this request; any others are closed.
                let mut ctx = RequestContext {
                    fd: fds.pop_front(),
                    ..RequestContext::default()
                };
                fds.clear();
                let (progress, cancel) = (Arc::clone(&ctx.progress), ctx.cancel.clone());
                // Boxed: the handlers' futures nest deep (a handler awaits the volume, which
                // awaits the KMS), and one allocation per control request keeps the
                // connection's own future small.
                let mut handled = Box::pin(daemon.handle(env.request, caller, &mut ctx));
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last = None;
                let mut closed = false;
                let result = loop {
                    tokio::select! {
                        r = &mut handled => break r,
                        _ = tick.tick(), if env.progress && !closed && !operation.is_empty() => {
                            let now = progress.get();
                            if last != Some(now) {
                                last = Some(now);
                                let event = progress_event(operation, &volume, now);
                                if reply(&stream, event).await.is_err() {
                                    closed = true;
                                    cancel.cancel();
                                }
                            }
                        }
                        r = recv(&stream, &mut chunk, &mut fds), if !closed => match r {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => {
                                // The client went away (Ctrl-C): stop the operation; it
                                // cleans up before `handled` completes.
                                closed = true;
                                cancel.cancel();
                            }
                        },
                    }
                };
                if closed {
                    return;
                }
                // The last state too, so a client that asked sees where the operation ended.
                if env.progress && result.is_ok() && !operation.is_empty() {
                    let now = progress.get();
                    if last != Some(now) {
                        let event = progress_event(operation, &volume, now);
                        if reply(&stream, event).await.is_err() {
                            return;
                        }
                    }
                }
                match result {
                    Ok(result) => Outcome::Ok { result },
                    Err(e) => Outcome::Error(e),
                }
            }
        };
        if let Err(e) = reply(&stream, outcome).await {
            tracing::debug!(error = %e, "control connection write failed");
            return;
        }
    }
}
