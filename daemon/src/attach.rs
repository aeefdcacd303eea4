//! Handlers of `attach` and `detach`, and what keeps attachments across restarts: the saved
//! attachments file, re-attaching at start, and the shutdown that drains and flushes them.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use control_api::{
    AttachRequest, AttachmentStatus, ConnectionStatus, DetachRequest, ErrorCode, Response,
};
use kms_client::Kms;
use nbd::device::Export;
use nbd::server::TlsMode;
use statedir::audit::{AUDIT_SCOPE, AuditRecord, AuditScope};
use statedir::stamp::rfc3339;
use volume::{OpenOptions, VolumeError};

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::device::VolumeDevice;
use crate::error::{Error, api, chain};
use crate::locks;
use crate::registry::{Attachment, Keying};
use crate::request::RequestContext;

/// Default seconds a kernel device's request may go unanswered (then resent on another
/// connection, after a reconnect if need be).
pub const DEFAULT_IO_TIMEOUT_SECS: u64 = 30;
/// Default seconds a kernel device waits for the daemon to come back before failing I/O.
pub const DEFAULT_DEAD_CONN_TIMEOUT_SECS: u64 = 120;
/// How long a detach waits for connections that are closing before it refuses the volume
/// as having connected clients.
const CLIENT_TEARDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long `detach --force` waits for the volume's requests in flight (and the flush) before
/// it answers anyway: the device and the clients are let go at once, and a backing store that
/// hangs must not hang the command too.
pub const FORCE_DETACH_WAIT: Duration = Duration::from_secs(5);

impl Daemon {
    /// Attaches a volume (`caller` None: re-attach at start, owner from the saved request).
    pub async fn attach(
        &self,
        r: AttachRequest,
        caller: Option<Caller>,
    ) -> Result<AttachmentStatus, Error> {
        self.attach_as(r, caller, None, None).await
    }

    /// Attaches a volume for a request whose context reports progress (a take-over waits).
    pub(crate) async fn attach_with(
        &self,
        r: AttachRequest,
        caller: Caller,
        ctx: &RequestContext,
    ) -> Result<AttachmentStatus, Error> {
        self.attach_as(r, Some(caller), None, Some(ctx)).await
    }

    pub(crate) async fn attach_as(
        &self,
        mut r: AttachRequest,
        caller: Option<Caller>,
        saved_owner: Option<u32>,
        ctx: Option<&RequestContext>,
    ) -> Result<AttachmentStatus, Error> {
        // A take-over is for this attach only: never saved, so a restart does not repeat it.
        let take_over = r.take_over.take();
        let started = Instant::now();
        let path = self.volume_path(&r.volume)?;
        self.refuse_if_detaching(&r.volume)?;
        if let Some(a) = self.state.registry.get(&r.volume) {
            // Asking again for the same attachment succeeds and changes nothing: a boot unit
            // asks after the daemon may already have re-attached the volume (and reconnected
            // its kernel device) from its saved attachments. "auto" matches the device got.
            let device_of = |d: &Option<String>| {
                let d = d.as_deref()?;
                Some(match (crate::kdev::parse_device(d), a.kernel()) {
                    (Ok(None), Some(k)) => k.path(),
                    (Ok(Some(i)), _) => crate::kdev::device_path(i),
                    _ => d.to_owned(),
                })
            };
            let mut have = a.request.clone();
            have.device = a.kernel().map(|k| k.path());
            let mut want = r.clone();
            want.device = device_of(&r.device);
            let same_owner = caller.is_none_or(|c| c.uid == a.owner_uid);
            if have == want && same_owner {
                tracing::info!(volume = %r.volume, "already attached as asked");
                return Ok(self.attachment_status(&a));
            }
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {} is already attached: see 'cryptnbdctl status {}'",
                    r.volume, r.volume
                ),
            ));
        }
        self.refuse_while_dm_open(&r.volume, &path, "attach")?;
        let export_name = r.export_name.clone().unwrap_or_else(|| r.volume.clone());
        if export_name.is_empty() || export_name.len() > 4096 {
            return Err(api(
                ErrorCode::InvalidRequest,
                "an export name is 1 to 4096 bytes",
            ));
        }
        let tls = self.services.server.tls();
        if r.tls_only && tls.tcp == TlsMode::Off && tls.unix == TlsMode::Off {
            return Err(api(
                ErrorCode::InvalidRequest,
                "--tls-only needs TLS on a listener: set [nbd.tls] mode = \"on\" or \"require\" \
                 (and the certificates) in the daemon's configuration, see docs/tls.md",
            ));
        }
        if !r.allow_certs.is_empty() {
            crate::certpolicy::check_rules(&r.allow_certs)
                .map_err(|m| api(ErrorCode::InvalidRequest, m))?;
            if tls.tcp == TlsMode::Off && tls.unix == TlsMode::Off {
                return Err(api(
                    ErrorCode::InvalidRequest,
                    "--allow-cert needs TLS on a listener: set [nbd.tls] mode (and the \
                     certificates) in the daemon's configuration, see docs/tls.md",
                ));
            }
        }
        if r.tcp && self.services.nbd_tcp.is_none() {
            return Err(api(
                ErrorCode::InvalidRequest,
                "the daemon has no TCP listener: set [nbd] tcp = \"127.0.0.1:10809\" in its configuration",
            ));
        }
        let device_index = match &r.device {
            Some(d) => {
                Some(crate::kdev::parse_device(d).map_err(|m| api(ErrorCode::InvalidRequest, m))?)
            }
            None => None,
        };
        let connections = r.connections.unwrap_or(1);
        if !(1..=crate::kdev::MAX_CONNECTIONS).contains(&connections) {
            return Err(api(
                ErrorCode::InvalidRequest,
                format!(
                    "--connections is 1 to {}, not {connections}",
                    crate::kdev::MAX_CONNECTIONS
                ),
            ));
        }
        if r.device.is_none()
            && (r.connections.is_some()
                || r.io_timeout_secs.is_some()
                || r.dead_conn_timeout_secs.is_some())
        {
            return Err(api(
                ErrorCode::InvalidRequest,
                "--connections, --io-timeout and --dead-conn-timeout are for a kernel device: add --device /dev/nbdN (or auto)",
            ));
        }
        if device_index.is_some() {
            crate::kdev::probe()
                .await
                .map_err(|m| api(ErrorCode::Conflict, m))?;
        }
        // What the audit record names, read before the KMS call.
        let info = self.inspect_volume(&r.volume).ok();
        let uuid = info.as_ref().map(|i| i.uuid.clone());
        let token = info.and_then(|i| i.token);
        let opts = OpenOptions {
            read_only: r.read_only,
            expect_sid: r.sid.clone(),
            expect_directory: r.directory.clone(),
        };
        let opened = self
            .open_volume_taking(&r.volume, &opts, take_over.zip(ctx))
            .await;
        let outcome = opened.as_ref().map(|_| ()).map_err(|e| chain(e));
        self.audit_record(
            match take_over {
                None => "attach",
                Some(control_api::TakeOver::IfGone) => "attach-take-over",
                Some(control_api::TakeOver::Force) => "attach-take-over-force",
            },
            &r.volume,
            token.as_ref().map(|t| t.key_id.as_str()),
            token.as_ref().map(|t| &t.context),
            caller,
            started,
            &outcome,
        );
        let vol = Arc::new(opened.map_err(Error::from)?);
        let device = Arc::new(VolumeDevice::new(Arc::clone(&vol), r.read_only));
        {
            let (registry, volume) = (Arc::clone(&self.state.registry), r.volume.clone());
            device.on_fenced(move |why| registry.record_fenced(&volume, why));
        }
        let export = Arc::new(Export {
            name: export_name.clone(),
            description: format!("cryptnbd volume {}", r.volume),
            device: device.clone(),
            tls_only: r.tls_only,
            observer: self.services.metrics.as_ref().map(|m| {
                let observer: Arc<dyn nbd::RequestObserver> = m.volume(&r.volume);
                observer
            }),
        });
        let owner_uid = saved_owner.or(caller.map(|c| c.uid)).unwrap_or(0);
        let attachment = Arc::new(Attachment {
            volume: r.volume.clone(),
            export_name,
            export,
            device,
            request: r.clone(),
            allow_certs: std::sync::RwLock::new(r.allow_certs.clone()),
            owner_uid,
            since: SystemTime::now(),
            store: self
                .services
                .catalog
                .store_of(&r.volume)
                .unwrap_or("file")
                .to_owned(),
            key_check: std::sync::Mutex::new(None),
            kernel: std::sync::OnceLock::new(),
            keying: std::sync::Mutex::new(Keying {
                key_id: token.as_ref().map(|t| t.key_id.clone()).unwrap_or_default(),
                context: token.map(|t| t.context).unwrap_or_default(),
            }),
        });
        self.state
            .registry
            .insert(Arc::clone(&attachment))
            .map_err(|m| api(ErrorCode::Conflict, m))?;
        if let Some(index) = device_index {
            let params = crate::kdev::BindParams {
                index,
                connections,
                io_timeout_secs: r.io_timeout_secs.unwrap_or(DEFAULT_IO_TIMEOUT_SECS),
                dead_conn_timeout_secs: r
                    .dead_conn_timeout_secs
                    .unwrap_or(DEFAULT_DEAD_CONN_TIMEOUT_SECS),
                block_size: vol.sector_size(),
                // The name too: a snapshot or copy shares the header UUID.
                backend: format!("cryptnbd:{}:{}", r.volume, uuid.as_deref().unwrap_or("-")),
            };
            let bound_at = Instant::now();
            let bound = crate::kdev::KernelDevice::bind(
                &self.services.server,
                &attachment.export_name,
                params,
            )
            .await;
            let keying = attachment.keying();
            self.audit_record(
                "attach-device",
                &r.volume,
                Some(&keying.key_id),
                Some(&keying.context),
                caller,
                bound_at,
                &bound.as_ref().map(|_| ()).map_err(Clone::clone),
            );
            match bound {
                Ok(dev) => {
                    tracing::info!(volume = %r.volume, device = %dev.path(), connections, resumed = dev.resumed, "kernel device bound");
                    let _ = attachment.kernel.set(dev);
                }
                Err(m) => {
                    self.state.registry.remove(&r.volume);
                    self.forget_metrics(&r.volume);
                    self.services
                        .server
                        .disconnect_export(&attachment.export_name)
                        .await;
                    return Err(api(ErrorCode::Conflict, m));
                }
            }
        }
        if !r.transient {
            self.save_attachments()?;
        }
        tracing::info!(volume = %r.volume, export = %attachment.export_name, read_only = r.read_only, "attached");
        Ok(self.attachment_status(&attachment))
    }

    /// How clients reach the export: `nbds` where the listener speaks TLS.
    pub(crate) fn uris(&self, a: &Attachment) -> Vec<String> {
        let tls = self.services.server.tls();
        let s = |mode: TlsMode| if mode == TlsMode::Off { "" } else { "s" };
        let mut uris = vec![format!(
            "nbd{}+unix:///{}?socket={}",
            s(tls.unix),
            a.export_name,
            self.services.nbd_socket.display()
        )];
        if a.request.tcp
            && let Some(addr) = self.services.nbd_tcp
        {
            uris.push(format!("nbd{}://{addr}/{}", s(tls.tcp), a.export_name));
        }
        uris
    }

    pub(crate) fn attachment_status(&self, a: &Attachment) -> AttachmentStatus {
        let (key_state, key_checked) = crate::keys::key_check_status(a.key_check());
        AttachmentStatus {
            volume: a.volume.clone(),
            export_name: a.export_name.clone(),
            read_only: a.device.read_only_export(),
            transient: a.request.transient,
            tcp: a.request.tcp,
            tls_only: a.request.tls_only,
            allow_certs: a.allow_certs(),
            size: a.device.volume().size(),
            since: rfc3339(a.since),
            owner_uid: a.owner_uid,
            uris: self.uris(a),
            bytes_read: a.device.bytes_read(),
            bytes_written: a.device.bytes_written(),
            connections: self.connections(&a.export_name),
            failed: a.device.volume().is_failed(),
            fenced: a.device.volume().is_fenced(),
            store: a.store.clone(),
            kms_key: a.keying().key_id,
            key_state,
            key_checked,
            device: a.kernel().map(|k| {
                Box::new(control_api::KernelDeviceStatus {
                    path: k.path(),
                    connections: k.params.connections,
                    block_size: k.params.block_size,
                    io_timeout_secs: k.params.io_timeout_secs,
                    dead_conn_timeout_secs: k.params.dead_conn_timeout_secs,
                    reconnects: k.reconnects(),
                    resumed: k.resumed,
                })
            }),
        }
    }

    /// Sets the metrics' scrape-time gauges: the attached volumes, their connections, the
    /// state of their last key check.
    pub(crate) fn refresh_metrics(&self) {
        let Some(m) = &self.services.metrics else {
            return;
        };
        let gauges: Vec<crate::metrics::AttachedGauge> = self
            .state
            .registry
            .all()
            .iter()
            .map(|a| {
                let (state, checked) = crate::keys::key_check_status(a.key_check());
                crate::metrics::AttachedGauge {
                    volume: a.volume.clone(),
                    connections: self.services.server.connections(Some(&a.export_name)).len(),
                    key_state: match (state, checked) {
                        (Some(s), _) => s,
                        (None, Some(_)) => "error".into(),
                        (None, None) => "unchecked".into(),
                    },
                }
            })
            .collect();
        m.set_attached(&gauges);
    }

    /// Drops a volume's series from the metrics (it is no longer attached).
    fn forget_metrics(&self, volume: &str) {
        if let Some(m) = &self.services.metrics {
            m.forget(volume);
        }
    }

    pub(crate) fn connections(&self, export: &str) -> Vec<ConnectionStatus> {
        self.connections_where(export, |_| true)
    }

    /// The connections to `export` whose peer passes `keep`.
    pub(crate) fn connections_where(
        &self,
        export: &str,
        keep: impl Fn(&nbd::Peer) -> bool,
    ) -> Vec<ConnectionStatus> {
        self.services
            .server
            .connections(Some(export))
            .into_iter()
            .filter(|c| keep(&c.peer))
            .map(|c| ConnectionStatus {
                id: c.id,
                peer: c.peer.to_string(),
                since: rfc3339(c.since),
                bytes_read: c.bytes_read,
                bytes_written: c.bytes_written,
                certificate: c.tls.as_ref().map(|t| t.subject().to_owned()),
            })
            .collect()
    }

    /// Detaches a volume: refuse while clients are connected (unless `force`), stop new
    /// connections, drain and close existing ones, flush, and drop the volume (its key is
    /// wiped when the cipher is freed).
    pub async fn detach(
        &self,
        r: DetachRequest,
        caller: Option<Caller>,
    ) -> Result<Response, Error> {
        self.detach_as(r, caller, "detach").await
    }

    /// [`Daemon::detach`], audited as `operation`.
    pub(crate) async fn detach_as(
        &self,
        r: DetachRequest,
        caller: Option<Caller>,
        operation: &str,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let Some(a) = self.state.registry.get(&r.volume) else {
            return Err(api(
                ErrorCode::NotFound,
                format!("volume {} is not attached", r.volume),
            ));
        };
        if self.services.root_daemon && a.kernel().is_some() {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {} is the root filesystem's device ({}), served by the root storage \
                     daemon: it is not detached while the system runs on it",
                    r.volume,
                    a.kernel().map(|k| k.path()).unwrap_or_default()
                ),
            ));
        }
        // The kernel device's own sessions are not clients: the device is checked below.
        let clients =
            || self.connections_where(&a.export_name, |p| !matches!(p, nbd::Peer::Kernel { .. }));
        let mut connected = clients();
        // A client that has just hung up (nbdcopy exits right after its disconnect) may still
        // be in its session's teardown: give the connections a moment to go before calling
        // them connected.
        let grace_ends = Instant::now() + CLIENT_TEARDOWN_GRACE;
        while !connected.is_empty() && !r.force && Instant::now() < grace_ends {
            tokio::time::sleep(Duration::from_millis(20)).await;
            connected = clients();
        }
        if !connected.is_empty() && !r.force {
            let who: Vec<String> = connected.iter().map(|c| c.peer.clone()).collect();
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {} has {} connected client(s): {}; disconnect them or use --force \
                     (in-flight requests are finished first)",
                    r.volume,
                    connected.len(),
                    who.join(", ")
                ),
            ));
        }
        if let Some(k) = a.kernel() {
            k.release(r.force).await.map_err(|e| match e {
                crate::kdev::ReleaseError::Busy(m) => api(ErrorCode::Conflict, m),
                crate::kdev::ReleaseError::Failed(m) => api(ErrorCode::Io, m),
            })?;
            tracing::info!(volume = %r.volume, device = %k.path(), "kernel device disconnected");
        }
        self.state.registry.remove(&r.volume);
        self.forget_metrics(&r.volume);
        if let Err(e) = self.save_attachments() {
            tracing::error!(error = %e.message(), "cannot save the attachment list");
        }
        let keying = a.keying();
        let volume = a.volume.clone();
        let export = a.export_name.clone();
        // Drain the connections (their requests in flight finish and are answered), flush,
        // and drop the volume, which wipes its key: the attachment and the sessions' device
        // handles are its last references.
        let server = Arc::clone(&self.services.server);
        let mut finish = tokio::spawn(async move {
            server.disconnect_export(&a.export_name).await;
            tokio::task::spawn_blocking(move || {
                let flushed = a.device.volume().flush();
                drop(a);
                flushed
            })
            .await
        });
        let finished = if r.force {
            tokio::time::timeout(FORCE_DETACH_WAIT, &mut finish)
                .await
                .ok()
        } else {
            Some((&mut finish).await)
        };
        let Some(finished) = finished else {
            return Ok(self.detach_pending(
                r, operation, caller, started, keying, export, connected, finish,
            ));
        };
        let (outcome, flushed) = finish_outcome(finished);
        self.audit_record(
            operation,
            &r.volume,
            Some(&keying.key_id),
            Some(&keying.context),
            caller,
            started,
            &outcome,
        );
        tracing::info!(volume = %volume, "detached; key wiped");
        flushed?;
        Ok(Response::Detached {
            volume,
            disconnected: connected,
            pending: None,
        })
    }

    /// `detach --force` whose drain did not finish within [`FORCE_DETACH_WAIT`]: the device
    /// and the clients are gone, but device calls are stuck in the backing store, and they
    /// hold the volume (and its key) until they return. Answers now (audited as `operation`,
    /// with what is stuck); a task finishes the detach (flush, key wiped, audited as
    /// `detach-finished`) when they do.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn detach_pending(
        &self,
        r: DetachRequest,
        operation: &str,
        caller: Option<Caller>,
        started: Instant,
        keying: crate::registry::Keying,
        export: String,
        connected: Vec<ConnectionStatus>,
        finish: tokio::task::JoinHandle<Result<Result<(), VolumeError>, tokio::task::JoinError>>,
    ) -> Response {
        let stuck = self.services.server.connections(Some(&export)).len();
        let path = self
            .volume_path(&r.volume)
            .map_or_else(|_| r.volume.clone(), |p| p.display().to_string());
        let pending = format!(
            "requests on {stuck} connection(s) are still stuck in the backing store ({path}) \
             after {} s: the device and its clients are let go, but the volume's key stays in \
             memory until those requests return; it is then flushed and wiped \
             ('cryptnbdctl status' lists it as detaching until then)",
            FORCE_DETACH_WAIT.as_secs()
        );
        tracing::warn!(volume = %r.volume, "{pending}");
        self.audit_record(
            operation,
            &r.volume,
            Some(&keying.key_id),
            Some(&keying.context),
            caller,
            started,
            &Err(pending.clone()),
        );
        self.state
            .detaching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.volume.clone(), SystemTime::now());
        let detaching = Arc::clone(&self.state.detaching);
        let audit = Arc::clone(&self.services.audit);
        let backend = self.services.kms.backend_name().to_owned();
        let volume = r.volume.clone();
        tokio::spawn(async move {
            let (flushed, _) = finish_outcome(finish.await);
            detaching
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&volume);
            match &flushed {
                Ok(()) => {
                    tracing::info!(volume = %volume, "the stuck requests returned; flushed, detached, key wiped")
                }
                Err(m) => {
                    tracing::error!(volume = %volume, "the stuck requests returned; key wiped, but {m}")
                }
            }
            audit.record(&AuditRecord::about_volume(
                "detach-finished",
                &backend,
                &volume,
                Some(&keying.key_id),
                Some(&keying.context),
                caller.map(|c| c.uid),
                started.elapsed(),
                &flushed,
            ));
        });
        Response::Detached {
            volume: r.volume,
            disconnected: connected,
            pending: Some(pending),
        }
    }

    /// Refuses to use a volume whose forced detach still waits for its backing store.
    pub(crate) fn refuse_if_detaching(&self, volume: &str) -> Result<(), Error> {
        let map = self
            .state
            .detaching
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match map.get(volume) {
            Some(since) => Err(api(
                ErrorCode::Conflict,
                format!(
                    "volume {volume} is still being detached (forced at {}): requests are stuck \
                     in its backing store and hold the volume open; it can be used again once \
                     they return (see 'cryptnbdctl status')",
                    rfc3339(*since)
                ),
            )),
            None => Ok(()),
        }
    }

    /// Writes the persistent attachments (atomically).
    pub(crate) fn save_attachments(&self) -> Result<(), Error> {
        let saved: Vec<SavedAttachment> = self
            .state
            .registry
            .all()
            .iter()
            .filter(|a| !a.request.transient)
            .map(|a| {
                let mut request = a.request.clone();
                // The allow-list in force, which `tls allow` may have changed since.
                request.allow_certs = a.allow_certs();
                // "auto" is saved as the device it got: a restart reconnects that one.
                if let Some(k) = a.kernel() {
                    request.device = Some(k.path());
                }
                SavedAttachment {
                    request,
                    owner_uid: a.owner_uid,
                }
            })
            .collect();
        let _saving = self.state.saving.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.services.layout.attachments();
        let body = serde_json::to_vec_pretty(&saved)
            .map_err(|e| api(ErrorCode::Internal, e.to_string()))?;
        store::durable::write_atomic(&path, &body, store::durable::Existing::Replace).map_err(|e| {
            api(
                ErrorCode::Io,
                format!("cannot save {}: {e}", path.display()),
            )
        })
    }

    /// Re-attaches what was attached when the daemon stopped. Failures are logged and audited;
    /// the others still attach.
    pub async fn restore_attachments(&self) {
        let path = self.services.layout.attachments();
        let saved: Vec<SavedAttachment> = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, path = %path.display(), "cannot parse the saved attachments; none re-attached");
                    return;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "cannot read the saved attachments");
                return;
            }
        };
        for s in saved {
            let volume = s.request.volume.clone();
            let _g = self.state.locks.lock(&[locks::volume(&volume)]).await;
            let scope = AuditScope {
                volume: Some(volume.clone()),
                caller_uid: None,
            };
            let attached = AUDIT_SCOPE
                .scope(
                    scope,
                    self.attach_as(s.request, None, Some(s.owner_uid), None),
                )
                .await;
            match attached {
                Ok(_) => tracing::info!(volume = %volume, "re-attached"),
                Err(e) => {
                    tracing::error!(volume = %volume, error = %e.message(), "cannot re-attach")
                }
            }
        }
    }

    /// Shutdown: drain every connection, flush every volume, drop them (keys wiped).
    pub async fn shutdown(&self) {
        // Kernel devices of saved attachments stay bound: the kernel queues their I/O for
        // the dead-connection timeout and the next start reconnects them. Transient ones
        // will not be re-attached: they are disconnected.
        for a in self.state.registry.all() {
            if let Some(k) = a.kernel() {
                k.stop_supervising();
                if a.request.transient {
                    if let Err(e) = k.release(true).await {
                        tracing::error!(volume = %a.volume, device = %k.path(), error = %e, "cannot disconnect the kernel device");
                    }
                } else {
                    tracing::warn!(
                        volume = %a.volume,
                        device = %k.path(),
                        dead_conn_timeout_secs = k.params.dead_conn_timeout_secs,
                        "kernel device left waiting for the daemon's restart; its I/O fails after the dead-connection timeout"
                    );
                }
            }
        }
        self.services.server.drain_all().await;
        for a in self.state.registry.take_all() {
            if let Err(e) = a.device.volume().flush() {
                tracing::error!(volume = %a.volume, error = %chain(&e), "flush at shutdown failed");
            }
            let keying = a.keying();
            self.audit_record(
                "detach",
                &a.volume,
                Some(&keying.key_id),
                Some(&keying.context),
                None,
                Instant::now(),
                &Ok(()),
            );
        }
    }
}

/// What a detach's drain-flush-drop task ended with: the audit outcome, and the answer.
type FinishResult =
    Result<Result<Result<(), VolumeError>, tokio::task::JoinError>, tokio::task::JoinError>;

fn finish_outcome(r: FinishResult) -> (Result<(), String>, Result<(), Error>) {
    match r {
        Ok(Ok(Ok(()))) => (Ok(()), Ok(())),
        Ok(Ok(Err(e))) => (Err(chain(&e)), Err(Error::from(e))),
        Ok(Err(e)) | Err(e) => {
            let m = format!("the detach task failed: {e}");
            (Err(m.clone()), Err(api(ErrorCode::Io, m)))
        }
    }
}

/// What is saved per attachment to re-attach at start.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedAttachment {
    request: AttachRequest,
    owner_uid: u32,
}
