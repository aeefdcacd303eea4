//! The control socket: one JSON line per request and per response (control-api). Callers are
//! identified by SO_PEERCRED and must be root, the daemon's own user, or on the allow-lists;
//! others are told so and disconnected before anything they send is read.

use std::sync::Arc;

use control_api::{
    API_VERSION, ApiError, Envelope, ErrorCode, Outcome, ResponseEnvelope, decode_line, encode_line,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::{Caller, Daemon};

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

async fn reply(stream: &mut UnixStream, outcome: Outcome) -> std::io::Result<()> {
    stream
        .write_all(&encode_line(&ResponseEnvelope {
            version: API_VERSION,
            outcome,
        }))
        .await
}

async fn connection(mut stream: UnixStream, daemon: Arc<Daemon>, acl: ControlAcl) {
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
            &mut stream,
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
    let mut chunk = [0u8; 4096];
    loop {
        let envelope = loop {
            match decode_line::<Envelope>(&mut buf) {
                Ok(Some(e)) => break Ok(e),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            match stream.read(&mut chunk).await {
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
                    &mut stream,
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
                match daemon.handle(env.request, caller).await {
                    Ok(result) => Outcome::Ok { result },
                    Err(e) => Outcome::Error(e),
                }
            }
        };
        if let Err(e) = reply(&mut stream, outcome).await {
            tracing::debug!(error = %e, "control connection write failed");
            return;
        }
    }
}
