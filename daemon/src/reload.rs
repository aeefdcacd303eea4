//! `tls reload` and SIGHUP: the certificates and the CRL read again, validated before
//! anything changes (a failure keeps the old configuration and says why), then every live
//! TLS session checked again. A session whose certificate is now revoked, expired or no
//! longer on its export's allow-list is disconnected (gracefully: requests in flight are
//! answered) and audited. New connections use the new configuration at once.

use std::time::Instant;

use control_api::{ErrorCode, Response, TlsDisconnect};
use nbd::server::{ConnectionInfo, TlsClient};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::error::{Error, api};
use crate::registry::Attachment;

impl Daemon {
    /// Reloads the TLS configuration for `caller` (None: SIGHUP).
    pub fn tls_reload(&self, caller: Option<Caller>) -> Result<Response, Error> {
        let started = Instant::now();
        if let Some(c) = caller
            && c.uid != 0
            && c.uid != rustix::process::getuid().as_raw()
        {
            return Err(api(
                ErrorCode::PermissionDenied,
                format!(
                    "only root or the daemon's own user may reload its TLS configuration (uid \
                     {} asked): run cryptnbdctl as root",
                    c.uid
                ),
            ));
        }
        let tls = &self.services.tls;
        let loaded = match crate::tls::load(&tls.config) {
            Ok(l) => l,
            Err(e) => {
                let message = format!("{e}; the TLS configuration in force is unchanged");
                self.audit_record(
                    "tls-reload",
                    "-",
                    None,
                    None,
                    caller,
                    started,
                    &Err(message.clone()),
                );
                tracing::warn!("TLS reload refused: {message}");
                return Err(api(ErrorCode::Damaged, message));
            }
        };
        self.services.server.set_tls(loaded.settings.clone());
        *tls.loaded.lock().unwrap_or_else(|p| p.into_inner()) = loaded.clone();
        let mut checked = 0;
        let mut disconnected = Vec::new();
        for a in self.state.registry.all() {
            for c in self.services.server.connections(Some(&a.export_name)) {
                let Some(client) = &c.tls else { continue };
                checked += 1;
                let Err(reason) = still_admitted(&a, client, loaded.verifier.as_deref()) else {
                    continue;
                };
                self.services.server.stop_connection(c.id);
                disconnected.push(self.audit_disconnect(&a, &c, client, &reason, caller));
            }
        }
        self.audit_record("tls-reload", "-", None, None, caller, started, &Ok(()));
        tracing::info!(
            tcp = loaded.settings.tcp.as_str(),
            unix = loaded.settings.unix.as_str(),
            checked,
            disconnected = disconnected.len(),
            "TLS configuration reloaded"
        );
        Ok(Response::TlsReloaded {
            tcp: loaded.settings.tcp.as_str().into(),
            unix: loaded.settings.unix.as_str().into(),
            sessions_checked: checked,
            disconnected,
        })
    }

    fn audit_disconnect(
        &self,
        a: &Attachment,
        c: &ConnectionInfo,
        client: &TlsClient,
        reason: &str,
        caller: Option<Caller>,
    ) -> TlsDisconnect {
        tracing::warn!(
            volume = %a.volume, connection = c.id, peer = %c.peer, certificate = client.subject(),
            "TLS session disconnected after a reload: {reason}"
        );
        let outcome = Err(format!(
            "disconnected {} (certificate {}): {reason}",
            c.peer,
            client.subject()
        ));
        self.audit_record(
            "nbd-disconnect",
            &a.volume,
            None,
            None,
            caller,
            Instant::now(),
            &outcome,
        );
        TlsDisconnect {
            volume: a.volume.clone(),
            connection: c.id,
            peer: c.peer.to_string(),
            certificate: client.subject().to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// Reloads the TLS configuration on every SIGHUP until `stop`.
    pub async fn reload_on_sighup(
        self: std::sync::Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: reload TLS with 'cryptnbdctl tls reload'");
            return;
        };
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP: reloading the TLS configuration");
                    // Errors were logged and audited by the reload.
                    let _ = self.tls_reload(None);
                }
            }
        }
    }
}

/// Whether a live session may go on under the new configuration: its certificate still
/// verifies (CA, validity, CRL) and is still on its export's allow-list.
fn still_admitted(
    a: &Attachment,
    client: &TlsClient,
    verifier: Option<&dyn ClientCertVerifier>,
) -> Result<(), String> {
    match (verifier, &client.certificate) {
        (Some(v), Some(der)) => {
            let ee = CertificateDer::from(der.as_slice());
            let chain: Vec<CertificateDer<'_>> = client
                .intermediates
                .iter()
                .map(|c| CertificateDer::from(c.as_slice()))
                .collect();
            v.verify_client_cert(&ee, &chain, UnixTime::now())
                .map_err(|e| format!("its certificate is no longer accepted: {e}"))?;
        }
        (Some(v), None) if v.client_auth_mandatory() => {
            return Err("it has no certificate, and client certificates are now required".into());
        }
        (None, _) => return Err("TLS is now off".into()),
        _ => {}
    }
    crate::certpolicy::admit(&a.request.allow_certs, Some(client))
}
