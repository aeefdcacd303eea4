//! Kernel NBD devices (`/dev/nbdN`) bound to attached volumes by the daemon itself.
//!
//! For each connection the daemon makes a unix socket pair, serves one end with the NBD
//! server (a session already in transmission phase: the kernel does not negotiate) and gives
//! the other end to the kernel with a netlink CONNECT ([`crate::netlink`]). The device's
//! block size is the volume's sector size, so the kernel never sends a write smaller than a
//! sector (no read-modify-write on the data path).
//!
//! A session that ends while the device is bound (the kernel timed a request out and dropped
//! the connection, or the session failed) is replaced: a new pair, a netlink RECONFIGURE in
//! place of the dead connection, retried with a back-off until it works or the device is
//! let go. When the daemon stops without detaching (a restart, a crash), the kernel keeps
//! the device and queues its I/O for the dead-connection timeout; the daemon re-attaches the
//! volume at start and reconnects the same device with a RECONFIGURE (the kernel checks the
//! backend identifier, `cryptnbd:<volume name>:<uuid>`, so a device is never reconnected to another
//! volume).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nbd::device::Peer;
use nbd::server::Server;

use crate::netlink::{ConnectConfig, NbdNetlink, NetlinkError};

/// Highest connection count accepted per device.
pub const MAX_CONNECTIONS: u32 = 16;
/// Back-off between reconnection attempts of a dead connection, capped.
const RECONNECT_BACKOFF: [u64; 6] = [50, 100, 250, 500, 1000, 5000];

/// How to bind a device.
#[derive(Debug, Clone)]
pub struct BindParams {
    /// N of /dev/nbdN, or None for the first free device.
    pub index: Option<u32>,
    /// Connections (the kernel spreads its hardware queues over them).
    pub connections: u32,
    /// See [`ConnectConfig::io_timeout_secs`].
    pub io_timeout_secs: u64,
    /// See [`ConnectConfig::dead_conn_timeout_secs`].
    pub dead_conn_timeout_secs: u64,
    /// The volume's sector size (the device's block size).
    pub block_size: u32,
    /// `cryptnbd:<volume name>:<LUKS uuid>`.
    pub backend: String,
}

/// `/dev/nbdN`.
pub fn device_path(index: u32) -> String {
    format!("/dev/nbd{index}")
}

/// Parses `--device`: "auto", "/dev/nbdN" or "nbdN".
pub fn parse_device(s: &str) -> Result<Option<u32>, String> {
    if s == "auto" {
        return Ok(None);
    }
    let name = s.strip_prefix("/dev/").unwrap_or(s);
    name.strip_prefix("nbd")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u32>().ok())
        .map(Some)
        .ok_or_else(|| format!("{s:?} is not an NBD device: give /dev/nbdN or auto"))
}

/// A kernel device bound to an attached volume.
pub struct KernelDevice {
    /// N of /dev/nbdN.
    pub index: u32,
    /// How it was bound.
    pub params: BindParams,
    /// Whether the device was reconnected to an existing kernel configuration at bind
    /// (the daemon had stopped without detaching).
    pub resumed: bool,
    /// Dead connections replaced since bound.
    reconnects: AtomicU64,
    /// Set when the device is let go (detach) or the daemon stops: ended sessions are not
    /// replaced any more.
    stopping: AtomicBool,
    /// The tasks that watch the sessions, one per connection.
    watchers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("index", &self.index)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// Runs a netlink call off the async runtime.
async fn netlink<T: Send + 'static>(
    f: impl FnOnce(&mut NbdNetlink) -> Result<T, NetlinkError> + Send + 'static,
) -> Result<T, NetlinkError> {
    tokio::task::spawn_blocking(move || {
        let mut nl = NbdNetlink::open()?;
        f(&mut nl)
    })
    .await
    .unwrap_or_else(|e| {
        Err(NetlinkError {
            errno: None,
            message: format!("the netlink call failed: {e}"),
        })
    })
}

/// Checks that the kernel's NBD driver answers over netlink (before a key is unwrapped for
/// a device that could not be bound anyway).
pub async fn probe() -> Result<(), String> {
    netlink(|nl| nl.status(Some(0)).map(|_| ()))
        .await
        .map_err(|e| e.message)
}

/// A new session for connection `connection` of `/dev/nbd{index}`: our end served, the
/// kernel's end returned.
fn new_session(
    server: &Arc<Server>,
    export: &str,
    index: u32,
    connection: u32,
) -> Result<(OwnedFd, nbd::SessionParams, tokio::task::JoinHandle<()>), String> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("cannot create a socket pair: {e}"))?;
    ours.set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(ours))
        .map_err(|e| format!("cannot register a socket with the runtime: {e}"))
        .and_then(|ours| {
            server
                .serve_preconnected(ours, export, Peer::Kernel { index, connection })
                .ok_or_else(|| {
                    format!("export {export} is gone (detached, or the daemon is stopping)")
                })
        })
        .map(|(params, handle)| (OwnedFd::from(theirs), params, handle))
}

fn sysfs_backend(index: u32) -> String {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/backend"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl KernelDevice {
    /// `/dev/nbdN`.
    pub fn path(&self) -> String {
        device_path(self.index)
    }

    /// Dead connections replaced since bound.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Binds a device to `export` (already in the registry, so the server finds it). A
    /// device that still has this volume's configuration (the daemon stopped without
    /// detaching) is reconnected in place; a free one is connected.
    pub async fn bind(
        server: &Arc<Server>,
        export: &str,
        params: BindParams,
    ) -> Result<Arc<Self>, String> {
        let want = params.index;
        let devices = netlink(|nl| nl.status(None)).await.map_err(|e| e.message)?;
        let mut candidates: Vec<(u32, bool)> = match want {
            Some(i) => {
                let configured = devices.iter().any(|d| d.index == i && d.connected);
                vec![(i, configured)]
            }
            None => {
                // Our own device left waiting by a stopped daemon is never picked by auto:
                // it is reconnected only when named.
                let mut free: Vec<(u32, bool)> = devices
                    .iter()
                    .filter(|d| !d.connected)
                    .map(|d| (d.index, false))
                    .collect();
                let next = devices.iter().map(|d| d.index + 1).max().unwrap_or(0);
                free.push((next, false));
                free
            }
        };
        if let [(i, true)] = candidates.as_slice() {
            let backend = sysfs_backend(*i);
            if backend != params.backend {
                return Err(format!(
                    "/dev/nbd{i} is in use{}: choose another device or --device auto",
                    if backend.is_empty() {
                        String::new()
                    } else {
                        format!(" (bound to \"{backend}\")")
                    }
                ));
            }
        }
        let mut last = String::new();
        for (index, resume) in candidates.drain(..) {
            match Self::bind_one(server, export, &params, index, resume).await {
                Ok(dev) => return Ok(dev),
                // Taken by another client between STATUS and CONNECT: try the next one.
                Err((Some(16), m)) if want.is_none() => last = m,
                Err((_, m)) => return Err(m),
            }
        }
        Err(last)
    }

    async fn bind_one(
        server: &Arc<Server>,
        export: &str,
        params: &BindParams,
        index: u32,
        resume: bool,
    ) -> Result<Arc<Self>, (Option<i32>, String)> {
        let mut kernel_ends = Vec::new();
        let mut handles = Vec::new();
        let mut session = None;
        for c in 0..params.connections {
            let (fd, p, h) = new_session(server, export, index, c).map_err(|m| (None, m))?;
            kernel_ends.push(fd);
            handles.push(h);
            session = Some(p);
        }
        let Some(session) = session else {
            return Err((None, "a device needs at least one connection".into()));
        };
        let cfg = ConnectConfig {
            index,
            size: session.size,
            block_size: u64::from(params.block_size),
            io_timeout_secs: params.io_timeout_secs,
            dead_conn_timeout_secs: params.dead_conn_timeout_secs,
            server_flags: u64::from(session.flags),
            backend: params.backend.clone(),
        };
        let backend = params.backend.clone();
        // The kernel's ends go to the blocking call and are closed when it returns (the
        // kernel holds its own references); on failure that closes them, so our sessions
        // see end-of-file and finish.
        let bound = netlink(move |nl| {
            let fds: Vec<_> = kernel_ends.iter().map(|f| f.as_fd()).collect();
            if resume {
                nl.reconfigure(index, &backend, &fds).map(|()| index)
            } else {
                nl.connect(&cfg, &fds)
            }
        })
        .await
        .map_err(|e| (e.errno, e.message))?;
        let dev = Arc::new(Self {
            index: bound,
            params: params.clone(),
            resumed: resume,
            reconnects: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            watchers: std::sync::Mutex::new(Vec::new()),
        });
        let watchers = handles
            .into_iter()
            .zip(0..)
            .map(|(h, c)| {
                tokio::spawn(watch(
                    Arc::clone(&dev),
                    Arc::clone(server),
                    export.to_owned(),
                    c,
                    h,
                ))
            })
            .collect();
        *dev.watchers.lock().unwrap_or_else(|p| p.into_inner()) = watchers;
        Ok(dev)
    }

    /// Stops replacing ended sessions (detach, or the daemon stopping).
    pub fn stop_supervising(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Lets the device go: unless `force`, refuses while it is in use (mounted, or held by
    /// device-mapper or another exclusive opener) and flushes it; then disconnects it (the
    /// kernel sends NBD_CMD_DISC on every connection and fails what is still queued).
    pub async fn release(&self, force: bool) -> Result<(), ReleaseError> {
        let path = self.path();
        if !force {
            let p = path.clone();
            tokio::task::spawn_blocking(move || flush_unless_busy(&p))
                .await
                .map_err(|e| ReleaseError::Failed(format!("cannot check {path}: {e}")))??;
        }
        self.stop_supervising();
        let index = self.index;
        let done = netlink(move |nl| nl.disconnect(index))
            .await
            .map_err(|e| ReleaseError::Failed(e.message));
        if done.is_err() {
            // Still bound: keep replacing dead connections.
            self.stopping.store(false, Ordering::SeqCst);
        }
        done
    }
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        for w in self
            .watchers
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            w.abort();
        }
    }
}

/// Why a device could not be let go.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// It is in use (mounted, held): nothing was done.
    #[error("{0}")]
    Busy(String),
    /// The flush or the disconnect failed.
    #[error("{0}")]
    Failed(String),
}

/// Opens the device exclusively (which fails with EBUSY while a filesystem is mounted on it
/// or device-mapper holds it) and flushes it: dirty pages reach the daemon and a FLUSH
/// follows.
fn flush_unless_busy(path: &str) -> Result<(), ReleaseError> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        if e == rustix::io::Errno::BUSY {
            ReleaseError::Busy(format!(
                "{path} is in use (a mounted filesystem, a dm-crypt or LVM mapping, or another \
                 exclusive user): unmount it first, or detach --force (its users get I/O errors)"
            ))
        } else {
            ReleaseError::Failed(format!("cannot open {path}: {e}"))
        }
    })?;
    rustix::fs::fsync(&fd).map_err(|e| ReleaseError::Failed(format!("cannot flush {path}: {e}")))
}

/// Watches connection `connection` of `dev`: when its session ends while the device is
/// bound, makes a new one and gives it to the kernel in place of the dead connection.
async fn watch(
    dev: Arc<KernelDevice>,
    server: Arc<Server>,
    export: String,
    connection: u32,
    mut session: tokio::task::JoinHandle<()>,
) {
    // The watcher must not keep the device alive: the attachment owns it.
    let weak = Arc::downgrade(&dev);
    let index = dev.index;
    let backend = dev.params.backend.clone();
    drop(dev);
    loop {
        let _ = (&mut session).await;
        let mut attempt = 0usize;
        loop {
            let Some(dev) = weak.upgrade() else { return };
            if dev.stopping.load(Ordering::SeqCst) {
                return;
            }
            drop(dev);
            let delay = RECONNECT_BACKOFF[attempt.min(RECONNECT_BACKOFF.len() - 1)];
            tokio::time::sleep(Duration::from_millis(delay)).await;
            attempt += 1;
            let (fd, _, handle) = match new_session(&server, &export, index, connection) {
                Ok(s) => s,
                Err(m) => {
                    tracing::warn!(device = index, connection, error = %m, "cannot reconnect");
                    continue;
                }
            };
            let b = backend.clone();
            let done = netlink(move |nl| nl.reconfigure(index, &b, &[fd.as_fd()])).await;
            match done {
                Ok(()) => {
                    if let Some(dev) = weak.upgrade() {
                        dev.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(device = index, connection, "connection replaced");
                    session = handle;
                    break;
                }
                // EINVAL: the kernel has no configuration for the device any more (it was
                // disconnected behind the daemon's back) or it is bound to another backend.
                // Retrying cannot help.
                Err(e) if e.errno == Some(22) => {
                    handle.abort();
                    tracing::error!(
                        device = index,
                        connection,
                        error = %e.message,
                        "cannot reconnect the kernel device, giving up: run 'cryptnbdctl detach' and attach it again"
                    );
                    return;
                }
                Err(e) => {
                    handle.abort();
                    // Right after a session ends the kernel may not have marked the
                    // connection dead yet (ENOSPC): the next attempt finds it dead.
                    if attempt > 2 {
                        tracing::warn!(device = index, connection, error = %e.message, "cannot reconnect; retrying");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_device;

    #[test]
    fn device_names() {
        assert_eq!(parse_device("auto"), Ok(None));
        assert_eq!(parse_device("/dev/nbd0"), Ok(Some(0)));
        assert_eq!(parse_device("nbd15"), Ok(Some(15)));
        for bad in [
            "/dev/sda",
            "nbd",
            "/dev/nbd-1",
            "nbd1p1",
            "",
            "/dev/nbd99999999999",
        ] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
    }
}
