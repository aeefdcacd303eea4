//! `tls reload` and SIGHUP: the certificates and the CRL read again, validated before
//! anything changes (a failure keeps the old configuration and says why), then every live
//! TLS session checked again. A session whose certificate is now revoked, expired or no
//! longer on its export's allow-list is disconnected (gracefully: requests in flight are
//! answered) and audited. New connections use the new configuration at once.
//!
//! The same check runs when `tls allow` replaces an export's allow-list (that export's
//! sessions), and every `session_check_interval_secs` (all sessions, against the
//! configuration in force), so that a certificate that expires between reloads is noticed.

use std::time::Instant;

use control_api::{CertRule, ErrorCode, Response, TlsDisconnect};
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
        let (checked, disconnected) =
            self.recheck_sessions(None, loaded.verifier.as_deref(), caller, "a reload");
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

    /// Checks the live TLS sessions (of `volume`, or all) against `verifier` and their
    /// export's allow-list, and disconnects (and audits) those refused now, saying it was
    /// `after`. Returns how many were checked, and those disconnected.
    fn recheck_sessions(
        &self,
        volume: Option<&str>,
        verifier: Option<&dyn ClientCertVerifier>,
        caller: Option<Caller>,
        after: &str,
    ) -> (usize, Vec<TlsDisconnect>) {
        let mut checked = 0;
        let mut disconnected = Vec::new();
        for a in self.state.registry.all() {
            if volume.is_some_and(|v| v != a.volume) {
                continue;
            }
            for c in self.services.server.connections(Some(&a.export_name)) {
                let Some(client) = &c.tls else { continue };
                checked += 1;
                let Err(reason) = still_admitted(&a, client, verifier) else {
                    continue;
                };
                self.services.server.stop_connection(c.id);
                disconnected.push(self.audit_disconnect(&a, &c, client, &reason, caller, after));
            }
        }
        (checked, disconnected)
    }

    /// Replaces the allow-list of attached `volume` for `caller` (root, the daemon's user or
    /// the attachment's owner), then disconnects its sessions that the new list refuses.
    pub fn tls_allow(
        &self,
        volume: &str,
        allow_certs: Vec<CertRule>,
        caller: Caller,
    ) -> Result<Response, Error> {
        let started = Instant::now();
        let Some(a) = self.state.registry.get(volume) else {
            return Err(api(
                ErrorCode::NotFound,
                format!(
                    "volume {volume} is not attached: give the list with 'attach --allow-cert'"
                ),
            ));
        };
        if caller.uid != 0
            && caller.uid != rustix::process::getuid().as_raw()
            && caller.uid != a.owner_uid
        {
            return Err(api(
                ErrorCode::PermissionDenied,
                format!(
                    "only root, the daemon's user or whoever attached volume {volume} (uid {}) \
                     may change who may open it (uid {} asked)",
                    a.owner_uid, caller.uid
                ),
            ));
        }
        crate::certpolicy::check_rules(&allow_certs)
            .map_err(|m| api(ErrorCode::InvalidRequest, m))?;
        *a.allow_certs.write().unwrap_or_else(|p| p.into_inner()) = allow_certs.clone();
        if !a.request.transient {
            self.save_attachments()?;
        }
        let verifier = self.services.tls.verifier();
        let (checked, disconnected) = self.recheck_sessions(
            Some(volume),
            verifier.as_deref(),
            Some(caller),
            "its export's allow-list changed",
        );
        let listed: Vec<String> = allow_certs.iter().map(ToString::to_string).collect();
        let summary = if listed.is_empty() {
            "any certificate the CA signed".to_owned()
        } else {
            listed.join("; ")
        };
        self.audit_record(
            "tls-allow",
            volume,
            None,
            None,
            Some(caller),
            started,
            &Ok(()),
        );
        tracing::info!(
            volume, allowed = %summary, checked, disconnected = disconnected.len(),
            "export allow-list replaced"
        );
        Ok(Response::TlsAllowed {
            volume: volume.to_owned(),
            allow_certs,
            sessions_checked: checked,
            disconnected,
        })
    }

    /// Checks every live TLS session again every `session_check_interval_secs` until
    /// `stop`: a certificate that expired since the last check (or reload) loses its session.
    pub async fn session_checker(
        self: std::sync::Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let secs = self.services.tls.config.session_check_interval_secs;
        if secs == 0 {
            return;
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {
                    let verifier = self.services.tls.verifier();
                    // Only a configuration that verifies clients has anything to re-check.
                    if verifier.is_some() {
                        self.recheck_sessions(None, verifier.as_deref(), None, "a periodic check");
                    }
                }
            }
        }
    }

    fn audit_disconnect(
        &self,
        a: &Attachment,
        c: &ConnectionInfo,
        client: &TlsClient,
        reason: &str,
        caller: Option<Caller>,
        after: &str,
    ) -> TlsDisconnect {
        tracing::warn!(
            volume = %a.volume, connection = c.id, peer = %c.peer, certificate = client.subject(),
            "TLS session disconnected after {after}: {reason}"
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
    crate::certpolicy::admit(&a.allow_certs(), Some(client))
}
