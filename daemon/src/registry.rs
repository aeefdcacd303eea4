//! The attached volumes, and who may open their exports.
//!
//! Access rule for the data path: a unix-socket client may open an export when its uid is 0,
//! the export's owner (who attached it), in the export's allow-list of uids, or its primary
//! gid is in the allow-list of gids. A TCP client may open only exports attached with `tcp`
//! (it has no credentials). NBD_OPT_LIST shows a client only what it may open; an export it
//! may not open looks exactly like an unknown one.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::SystemTime;

use nbd::device::{Export, ExportRegistry, Peer};
use nbd::server::TlsClient;
use statedir::audit::{AuditLog, AuditRecord};

use crate::device::VolumeDevice;

/// One attached volume.
pub struct Attachment {
    /// Volume name.
    pub volume: String,
    /// Export name.
    pub export_name: String,
    /// The export the server serves.
    pub export: Arc<Export>,
    /// The adapter (byte counters, the volume).
    pub device: Arc<VolumeDevice>,
    /// How it was attached (re-used when re-attaching at start). Its `allow_certs` is the
    /// list given at attach; the list in force is [`Attachment::allow_certs`].
    pub request: control_api::AttachRequest,
    /// The certificates that may open the export now (`tls allow` replaces it).
    pub allow_certs: std::sync::RwLock<Vec<control_api::CertRule>>,
    /// Who attached it.
    pub owner_uid: u32,
    /// When.
    pub since: SystemTime,
    /// The store the volume lives in (`file`, `rbd`), as it was at attach.
    pub store: String,
    /// Master key and context the volume key is wrapped under now (a rekey changes them).
    pub keying: std::sync::Mutex<Keying>,
    /// The last periodic check of the master key's state.
    pub key_check: std::sync::Mutex<Option<KeyCheckResult>>,
    /// The kernel NBD device bound to the volume (set once bound).
    pub kernel: std::sync::OnceLock<Arc<crate::kdev::KernelDevice>>,
}

/// What the last key-state check found.
#[derive(Debug, Clone)]
pub struct KeyCheckResult {
    /// When.
    pub at: SystemTime,
    /// The state, or why it could not be read.
    pub state: Result<kms_client::KeyState, String>,
}

/// What wraps an attached volume's key (for audit records and key-state checks).
#[derive(Debug, Clone, Default)]
pub struct Keying {
    /// Master key id.
    pub key_id: String,
    /// Encryption context.
    pub context: BTreeMap<String, String>,
}

impl Attachment {
    /// The last key check.
    pub fn key_check(&self) -> Option<KeyCheckResult> {
        self.key_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a key check; returns the state found before.
    pub fn set_key_check(&self, result: KeyCheckResult) -> Option<KeyCheckResult> {
        self.key_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(result)
    }

    /// The kernel device, once bound.
    pub fn kernel(&self) -> Option<&Arc<crate::kdev::KernelDevice>> {
        self.kernel.get()
    }

    /// The keying now.
    pub fn keying(&self) -> Keying {
        self.keying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Attachment {
    /// The allow-list in force.
    pub fn allow_certs(&self) -> Vec<control_api::CertRule> {
        self.allow_certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `peer` may open this export.
    pub fn allows(&self, peer: &Peer) -> bool {
        match peer {
            Peer::Unix { uid, gid, .. } => {
                *uid == 0
                    || *uid == self.owner_uid
                    || self.request.allow_uids.contains(uid)
                    || self.request.allow_gids.contains(gid)
            }
            Peer::Tcp(_) => self.request.tcp,
            // Only the daemon makes kernel sessions, for the device it binds.
            Peer::Kernel { .. } => self.request.device.is_some(),
        }
    }
}

/// Attached volumes by volume name.
#[derive(Default)]
pub struct Registry {
    by_volume: RwLock<BTreeMap<String, Arc<Attachment>>>,
    /// Where refused clients are recorded, and the KMS backend's name for the records.
    audit: OnceLock<(Arc<AuditLog>, &'static str)>,
}

impl Registry {
    /// Sets the audit trail that records the clients refused by an allow-list.
    pub fn set_audit(&self, audit: Arc<AuditLog>, backend: &'static str) {
        let _ = self.audit.set((audit, backend));
    }

    /// Records that the cluster fenced this host from `volume` (`why`: the error).
    pub fn record_fenced(&self, volume: &str, why: &str) {
        if let Some((audit, backend)) = self.audit.get() {
            audit.record(&AuditRecord::about_volume(
                "fenced",
                backend,
                volume,
                None,
                None,
                None,
                std::time::Duration::ZERO,
                &Err(why.to_owned()),
            ));
        }
    }

    /// Adds an attachment; fails if the volume or the export name is taken.
    pub fn insert(&self, a: Arc<Attachment>) -> Result<(), String> {
        let mut map = self.by_volume.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&a.volume) {
            return Err(format!("volume {} is already attached", a.volume));
        }
        if let Some(other) = map.values().find(|o| o.export_name == a.export_name) {
            return Err(format!(
                "export name {} is already used by volume {}: choose another with --export-name",
                a.export_name, other.volume
            ));
        }
        map.insert(a.volume.clone(), a);
        Ok(())
    }

    /// Removes an attachment (new connections to its export are refused from now on).
    pub fn remove(&self, volume: &str) -> Option<Arc<Attachment>> {
        self.by_volume
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume)
    }

    /// The attachment of `volume`.
    pub fn get(&self, volume: &str) -> Option<Arc<Attachment>> {
        self.by_volume
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned()
    }

    /// Every attachment.
    pub fn all(&self) -> Vec<Arc<Attachment>> {
        self.by_volume
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Removes and returns every attachment (shutdown).
    pub fn take_all(&self) -> Vec<Arc<Attachment>> {
        std::mem::take(&mut *self.by_volume.write().unwrap_or_else(|p| p.into_inner()))
            .into_values()
            .collect()
    }
}

impl ExportRegistry for Registry {
    fn lookup(&self, name: &str, peer: &Peer) -> Option<Arc<Export>> {
        let map = self.by_volume.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .find(|a| a.export_name == name && a.allows(peer))
            .map(|a| Arc::clone(&a.export))
    }

    fn tls_refused(&self, peer: &Peer, subject: Option<&str>, reason: &str) {
        if let Some((audit, backend)) = self.audit.get() {
            let outcome = Err(format!(
                "refused {peer} (certificate {}): TLS handshake failed: {reason}",
                subject.unwrap_or("none")
            ));
            audit.record(&AuditRecord::about_volume(
                "nbd-tls",
                backend,
                "-",
                None,
                None,
                None,
                std::time::Duration::ZERO,
                &outcome,
            ));
        }
    }

    fn admit(
        &self,
        export: &Export,
        peer: &Peer,
        tls: Option<&TlsClient>,
        opening: bool,
    ) -> Result<(), String> {
        // Looked up under the read lock, without copying the list of every attachment.
        let found = self
            .by_volume
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|a| a.export_name == export.name)
            .cloned();
        let Some(a) = found else {
            return Err("no such export".into());
        };
        let (decision, listed) = {
            let rules = a.allow_certs.read().unwrap_or_else(|p| p.into_inner());
            (crate::certpolicy::admit(&rules, tls), !rules.is_empty())
        };
        if !opening || !listed {
            return decision;
        }
        let subject = tls.map_or("(no TLS)", TlsClient::subject);
        match &decision {
            Ok(()) => tracing::info!(
                export = %a.export_name, %peer, certificate = subject,
                "client certificate on the export's allow-list: admitted"
            ),
            Err(why) => {
                tracing::warn!(export = %a.export_name, %peer, certificate = subject, "refused: {why}");
                if let Some((audit, backend)) = self.audit.get() {
                    let outcome = Err(format!("refused {peer} (certificate {subject}): {why}"));
                    audit.record(&AuditRecord::about_volume(
                        "nbd-open",
                        backend,
                        &a.volume,
                        None,
                        None,
                        None,
                        std::time::Duration::ZERO,
                        &outcome,
                    ));
                }
            }
        }
        decision
    }

    fn list(&self, peer: &Peer) -> Vec<(String, String)> {
        let map = self.by_volume.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter(|a| a.allows(peer))
            .map(|a| (a.export_name.clone(), a.export.description.clone()))
            .collect()
    }
}
