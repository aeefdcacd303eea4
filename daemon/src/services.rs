//! What the daemon uses to do its work, apart from what it holds (state.rs): the state
//! layout, the KMS, the audit trail, the NBD server and the policies from the configuration.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_api::paths::StateLayout;
use kms_client::KmsBackend;
use statedir::audit::AuditLog;
use store::stores::Stores;

use crate::config::UnusableKeyAction;

/// The daemon's services.
pub struct Services {
    /// Where everything lives.
    pub layout: StateLayout,
    /// The KMS.
    pub kms: KmsBackend,
    /// The NBD server.
    pub server: Arc<nbd::server::Server>,
    /// The audit trail.
    pub audit: Arc<AuditLog>,
    /// Rotated audit files kept (for reading).
    pub audit_keep: u32,
    /// The NBD unix socket (for URIs).
    pub nbd_socket: PathBuf,
    /// The NBD TCP listener, if any.
    pub nbd_tcp: Option<std::net::SocketAddr>,
    /// Whether memory is locked.
    pub memory_locked: bool,
    /// argon2id cost of new recovery keyslots.
    pub recovery_params: volume::keyslot::Argon2Params,
    /// Grants, key-state checks.
    pub key_policy: KeyPolicy,
    /// The daemon's AWS principal, once asked of STS (for grants).
    pub principal: Mutex<Option<String>>,
    /// Where the volumes live, by name: the volumes directory, and the RBD pool when
    /// configured.
    pub catalog: Arc<Stores>,
    /// The RBD pool among them, for who holds its volumes.
    pub rbd: Option<Arc<rbd::RbdCatalog>>,
    /// The local KMS's keystore (None with AWS KMS), told to `cryptnbdctl kms`.
    pub keystore: Option<PathBuf>,
    /// `[nbd.tls]` and what it loaded to (changed by `tls reload` and SIGHUP).
    pub tls: crate::tls::TlsService,
    /// This is the root storage daemon (`@cryptnbd`, docs/root-volume.md).
    pub root_daemon: bool,
    /// The metrics endpoint's counters (`[metrics] listen`; None when it is off).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// The daemon's key policy (from `[kms]` and `[kms.aws]`).
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    /// Time between key-state checks (None: never).
    pub check_interval: Option<Duration>,
    /// What an unusable key does to its attached volumes.
    pub on_unusable: UnusableKeyAction,
    /// Per-volume grants (AWS only).
    pub grants: Option<GrantPolicy>,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            check_interval: None,
            on_unusable: UnusableKeyAction::Report,
            grants: None,
        }
    }
}

/// Who grants name.
#[derive(Debug, Clone, Default)]
pub struct GrantPolicy {
    /// Grantee (None: the daemon's principal, asked of STS on first use).
    pub grantee: Option<String>,
    /// Retiring principal (None: the grantee).
    pub retiring: Option<String>,
}
