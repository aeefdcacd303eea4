//! The daemon: its state (state.rs) and services (services.rs), and the dispatch of each
//! control request to its handler (attach.rs, volumes.rs, lifecycle.rs, dmcrypt.rs,
//! keys.rs). Lifecycle operations (create, attach, detach, delete) take their volume's lock
//! (locks.rs), so two of them never race on a volume while different volumes go side by
//! side; the data path never takes it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use control_api::paths::StateLayout;
use control_api::{DaemonInfo, ErrorCode, Request, Response};
use kms_client::{Kms, KmsBackend};

use statedir::audit::{AuditLog, AuditRecord};

use crate::caller::Caller;
use crate::error::{Error, api};
use crate::locks;
use crate::registry::Registry;
use crate::request::RequestContext;
use crate::services::{KeyPolicy, Services};
use crate::state::State;

/// The running daemon: what it holds ([`State`]) and what it uses ([`Services`]). The
/// handlers are `impl Daemon` blocks grouped by verb in their own files (attach.rs,
/// volumes.rs, lifecycle.rs, dmcrypt.rs, keys.rs); [`Daemon::handle`] dispatches to them.
pub struct Daemon {
    /// Attached volumes, operations in flight, forced detaches, locks.
    pub state: State,
    /// The KMS, the audit trail, the NBD server, the layout and the policies.
    pub services: Services,
}

pub use statedir::audit::{AUDIT_SCOPE, AuditScope};

impl Daemon {
    /// A daemon over already-opened parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layout: StateLayout,
        kms: KmsBackend,
        registry: Arc<Registry>,
        server: Arc<nbd::server::Server>,
        audit: Arc<AuditLog>,
        audit_keep: u32,
        nbd_socket: PathBuf,
        nbd_tcp: Option<std::net::SocketAddr>,
        memory_locked: bool,
        recovery_params: volume::keyslot::Argon2Params,
        key_policy: KeyPolicy,
        keystore: Option<PathBuf>,
    ) -> Self {
        Self {
            state: State {
                registry,
                ops: Arc::default(),
                locks: Default::default(),
                saving: std::sync::Mutex::new(()),
                dm_crypt: Default::default(),
                detaching: Arc::default(),
            },
            services: Services {
                catalog: Arc::new(
                    store::stores::Stores::new(
                        vec![(
                            "file".into(),
                            Arc::new(store::catalog::DirCatalog::new(
                                &layout.volumes(),
                                &layout.snapshots(),
                            )),
                        )],
                        "file",
                    )
                    .expect("the file store is the default"),
                ),
                rbd: None,
                layout,
                kms,
                server,
                audit,
                audit_keep,
                nbd_socket,
                nbd_tcp,
                memory_locked,
                recovery_params,
                key_policy,
                principal: std::sync::Mutex::new(None),
                keystore,
                tls: Default::default(),
                root_daemon: false,
                metrics: None,
            },
        }
    }

    /// Runs one request for `caller`; the answer as the control socket sends it.
    pub async fn handle(
        &self,
        request: Request,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, control_api::ApiError> {
        let scope = AuditScope {
            volume: request.volume().map(str::to_owned),
            caller_uid: Some(caller.uid),
        };
        AUDIT_SCOPE
            .scope(scope, self.handle_in_scope(request, caller, ctx))
            .await
            // The one place a handler's error becomes the wire's (error.rs has the mapping).
            .map_err(control_api::ApiError::from)
    }

    async fn handle_in_scope(
        &self,
        request: Request,
        caller: Caller,
        ctx: &mut RequestContext,
    ) -> Result<Response, Error> {
        match request {
            Request::Hello => Ok(Response::Hello(self.info())),
            Request::Create(r) if r.from_image.is_some() => self.create(r, caller, ctx).await,
            Request::Create(r) => {
                let _g = self.state.locks.lock(&[locks::volume(&r.name)]).await;
                self.create(r, caller, ctx).await
            }
            Request::Attach(r) => {
                let _g = self.state.locks.lock(&[locks::volume(&r.volume)]).await;
                self.state.ops.check_idle(&r.volume)?;
                self.attach_with(r, caller, ctx)
                    .await
                    .map(Response::Attached)
            }
            Request::Detach(r) => {
                let _g = self.state.locks.lock(&[locks::volume(&r.volume)]).await;
                self.state.ops.check_idle(&r.volume)?;
                self.detach(r, Some(caller)).await
            }
            Request::List => self.list(),
            Request::Status { volume } => self.status(volume.as_deref()),
            Request::Delete {
                volume,
                with_snapshots,
            } => {
                let _g = self.state.locks.lock(&[locks::volume(&volume)]).await;
                self.state.ops.check_idle(&volume)?;
                self.refuse_while_dm_open(&volume, &self.volume_path(&volume)?, "delete")?;
                self.delete(&volume, with_snapshots, caller).await
            }
            Request::Revoke { kms_key } => self.revoke(&kms_key, caller).await,
            r @ (Request::OpenDmCrypt(_)
            | Request::DmCryptOpened { .. }
            | Request::CloseDmCrypt { .. }
            | Request::DmCryptClosed { .. }) => self.dm_crypt(r, caller, ctx).await,
            Request::Rebuild(r) => self.rebuild(r, caller, ctx).await,
            Request::Move { volume, to_store } => {
                self.move_volume(&volume, &to_store, caller, ctx).await
            }
            Request::Snapshot { volume, name } => self.snapshot(&volume, name, caller, ctx).await,
            Request::Snapshots { volume } => self.snapshots(&volume),
            Request::DeleteSnapshot { volume, name } => {
                self.delete_snapshot(&volume, &name, caller).await
            }
            Request::Rekey(r) => self.rekey(r, caller, ctx).await,
            Request::Reencrypt { volume, force } => {
                self.reencrypt(&volume, force, caller, ctx).await
            }
            Request::RecoveryAdd { volume, passphrase } => {
                self.recovery_add(&volume, &passphrase, caller, ctx).await
            }
            Request::RecoveryRemove { volume, keyslot } => {
                self.recovery_remove(&volume, keyslot, caller, ctx).await
            }
            Request::Export(r) => self.export(r, caller, ctx).await,
            Request::HeaderBackup { volume, to } => {
                self.header_backup(&volume, &to, caller, ctx).await
            }
            Request::HeaderRestore {
                volume,
                from,
                force,
            } => {
                self.header_restore(&volume, &from, force, caller, ctx)
                    .await
            }
            Request::Cancel { volume } => match self.state.ops.cancel(&volume) {
                Some(operation) => Ok(Response::Cancelled { operation }),
                None => Err(api(
                    ErrorCode::NotFound,
                    format!("no operation is running on volume {volume}"),
                )),
            },
            Request::Operations => Ok(Response::Operations {
                operations: self.state.ops.list(),
            }),
            Request::Kms(r) => self.kms_keys(r, caller),
            Request::TlsReload => self.tls_reload(Some(caller)),
            Request::TlsAllow {
                volume,
                allow_certs,
            } => {
                let _g = self.state.locks.lock(&[locks::volume(&volume)]).await;
                self.tls_allow(&volume, allow_certs, caller)
            }
            Request::Audit(q) => AuditLog::read(
                &self.services.layout.audit_log(),
                self.services.audit_keep,
                q.volume.as_deref(),
                q.since.as_deref(),
                q.limit,
            )
            .map(|records| Response::Audit { records })
            .map_err(|e| {
                let code = if e.kind() == std::io::ErrorKind::InvalidInput {
                    ErrorCode::InvalidRequest
                } else {
                    ErrorCode::Io
                };
                api(code, format!("cannot read the audit trail: {e}"))
            }),
        }
    }

    fn info(&self) -> DaemonInfo {
        DaemonInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: control_api::API_VERSION,
            state_dir: self.services.layout.state_dir.display().to_string(),
            kms_backend: self.services.kms.backend_name().into(),
            nbd_socket: self.services.nbd_socket.display().to_string(),
            nbd_tcp: self.services.nbd_tcp.map(|a| a.to_string()),
            memory_locked: self.services.memory_locked,
            keystore: self
                .services
                .keystore
                .as_ref()
                .map(|k| k.display().to_string()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn audit_record(
        &self,
        operation: &str,
        volume: &str,
        key_id: Option<&str>,
        context: Option<&BTreeMap<String, String>>,
        caller: Option<Caller>,
        started: Instant,
        outcome: &Result<(), String>,
    ) {
        self.services.audit.record(&AuditRecord::about_volume(
            operation,
            self.services.kms.backend_name(),
            volume,
            key_id,
            context,
            caller.map(|c| c.uid),
            started.elapsed(),
            outcome,
        ));
    }
}
