//! Master-key policy in the daemon: per-volume grants (AWS), the periodic key-state check of
//! attached volumes, and `revoke`, the incident-response kill switch.
//!
//! - Grants: with `kms.aws.grants = true`, `create` makes a grant on the master key for the
//!   daemon's principal, limited to Decrypt and ReEncryptFrom and to this volume's id
//!   (EncryptionContextSubset), retirable by the configured principal, and uses it at once
//!   through its grant token (a Decrypt of the new volume key). The grant id is kept in the
//!   volume's token. `rekey` makes the grant on the new key before the header names it, then
//!   retires the old one; `delete` retires it.
//! - Key checks: every `kms.key_check_interval_secs`, DescribeKey on each master key wrapping
//!   an attached volume. A volume keeps working when its key is disabled (its key is in memory,
//!   as with EBS); the state is logged, audited and shown by `status`, and with
//!   `kms.on_unusable_key = "detach"` the volume is detached at once.
//! - Revoke: detach every attached volume wrapped under a key now, wipe the keys, cancel the
//!   long operations on them. Works without the KMS (then ids are matched as given).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use control_api::{DetachRequest, ErrorCode, KmsKeyRequest, Response};
use kms_client::aws::{GrantOp, GrantSpec, same_key};
use kms_client::{EncryptionContext, Kms, KmsBackend, KmsError, KmsErrorKind};
use store::catalog::Catalog;
use volume::token::{GrantRef, KmsToken};
use volume::{VolumeError, VolumeErrorKind};

use crate::caller::Caller;
use crate::config::UnusableKeyAction;
use crate::daemon::Daemon;
use crate::error::{Error, api, chain};
use crate::registry::KeyCheckResult;
use crate::services::GrantPolicy;

fn kms_error(path: &Path, what: &str, e: KmsError) -> VolumeError {
    VolumeError::kms(path, what, e)
}

impl Daemon {
    async fn grantee(
        &self,
        policy: &GrantPolicy,
        path: &Path,
    ) -> Result<(String, String), VolumeError> {
        let grantee = match &policy.grantee {
            Some(g) => g.clone(),
            None => {
                let cached = self
                    .services
                    .principal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                match cached {
                    Some(p) => p,
                    None => {
                        let aws = self.services.kms.aws().ok_or_else(|| {
                            VolumeError::new(
                                VolumeErrorKind::InvalidArgument,
                                "grants need the AWS KMS backend",
                            )
                        })?;
                        let p = aws
                            .caller_principal()
                            .await
                            .map_err(|e| kms_error(path, "name the grantee principal", e))?;
                        *self
                            .services
                            .principal
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(p.clone());
                        p
                    }
                }
            }
        };
        let retiring = policy.retiring.clone().unwrap_or_else(|| grantee.clone());
        Ok((grantee, retiring))
    }

    /// Makes the volume's grant on `key_id` (when grants are on) and proves it works by
    /// decrypting `wrapped` with its token. Returns what the token should record.
    pub(crate) async fn make_grant(
        &self,
        path: &Path,
        key_id: &str,
        token: &KmsToken,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> Result<Option<GrantRef>, VolumeError> {
        let (Some(policy), Some(aws)) = (&self.services.key_policy.grants, self.services.kms.aws())
        else {
            return Ok(None);
        };
        let (grantee, retiring) = self.grantee(policy, path).await?;
        let subset = EncryptionContext::from_pairs([(
            token.context_keys.volume_id.clone(),
            token.volume_id.clone(),
        )])
        .map_err(|e| VolumeError::new(VolumeErrorKind::InvalidArgument, e.to_string()))?;
        let name = format!("cryptnbd-{}", token.volume_id);
        let grant = aws
            .create_grant(&GrantSpec {
                key_id,
                grantee_principal: &grantee,
                retiring_principal: &retiring,
                operations: &[GrantOp::Decrypt, GrantOp::ReEncryptFrom],
                context_subset: &subset,
                name: &name,
            })
            .await
            .map_err(|e| kms_error(path, "create the volume's grant (CreateGrant)", e))?;
        let used = aws
            .decrypt_with_grant_tokens(
                wrapped,
                context,
                key_id,
                std::slice::from_ref(&grant.grant_token),
            )
            .await;
        if let Err(e) = used {
            self.retire(&GrantRef {
                grant_id: grant.grant_id.clone(),
                key_id: grant.key_id.clone(),
            })
            .await;
            return Err(kms_error(
                path,
                "use the new grant (Decrypt with its grant token)",
                e,
            ));
        }
        tracing::info!(volume_id = %token.volume_id, key = %key_id, grant = %grant.grant_id, "grant created");
        Ok(Some(GrantRef {
            grant_id: grant.grant_id,
            key_id: grant.key_id,
        }))
    }

    /// Retires a grant; a failure is logged and audited (the grant stays until an
    /// administrator revokes it), never fatal.
    pub(crate) async fn retire(&self, grant: &GrantRef) {
        let Some(aws) = self.services.kms.aws() else {
            return;
        };
        match aws.retire_grant(&grant.key_id, &grant.grant_id).await {
            Ok(()) => tracing::info!(key = %grant.key_id, grant = %grant.grant_id, "grant retired"),
            Err(e) => tracing::warn!(
                key = %grant.key_id,
                grant = %grant.grant_id,
                error = %e,
                "cannot retire the grant: revoke it with `aws kms revoke-grant --key-id KEY --grant-id ID`"
            ),
        }
    }

    /// After `create`: the grant, recorded in the token. On failure the caller removes the
    /// new volume.
    pub(crate) async fn grant_new_volume(&self, name: &str) -> Result<(), VolumeError> {
        if self.services.key_policy.grants.is_none() || self.services.kms.aws().is_none() {
            return Ok(());
        }
        let catalog = &*self.services.catalog;
        let path = &catalog.location(name);
        let token = volume::lifecycle::read_token_in(&*volume::open_in(
            catalog,
            name,
            store::file::Access::Inspect,
        )?)?;
        let wrapped = token.wrapped_in(path)?;
        let grant = self
            .make_grant(path, &token.key_id, &token, &wrapped, &token.context)
            .await?;
        let file = volume::open_in(catalog, name, store::file::Access::ReadWrite)?;
        let written = volume::lifecycle::rewrite_token(&*file, |t| t.set_grant(grant.clone()));
        if written.is_err()
            && let Some(g) = &grant
        {
            self.retire(g).await;
        }
        written.map(drop)
    }

    /// Checks the master keys of the attached volumes once.
    pub async fn check_keys(&self) {
        let attached = self.state.registry.all();
        let mut by_key: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for a in attached {
            by_key.entry(a.keying().key_id).or_default().push(a);
        }
        for (key_id, volumes) in by_key {
            let state = self
                .services
                .kms
                .describe_key(&key_id)
                .await
                .map(|m| m.state)
                .map_err(|e| e.to_string());
            for a in volumes {
                let before = a.set_key_check(KeyCheckResult {
                    at: SystemTime::now(),
                    state: state.clone(),
                });
                let was = before.and_then(|b| b.state.ok());
                match &state {
                    Ok(s) if s.is_unusable() => {
                        if was != Some(*s) {
                            tracing::warn!(
                                volume = %a.volume,
                                key = %key_id,
                                state = %s,
                                "the volume's master key is not usable: the volume keeps \
                                 working until detached, but cannot be attached or rebuilt again"
                            );
                            self.audit_record(
                                "key-state",
                                &a.volume,
                                Some(&key_id),
                                None,
                                None,
                                Instant::now(),
                                &Err(format!("master key is {s}")),
                            );
                        }
                        if self.services.key_policy.on_unusable == UnusableKeyAction::Detach {
                            let _ = self
                                .force_detach(&a.volume, "key-unusable-detach", None)
                                .await;
                        }
                    }
                    Ok(s) => {
                        if was.is_some_and(|w| w.is_unusable()) {
                            tracing::info!(volume = %a.volume, key = %key_id, state = %s, "the volume's master key is usable again");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(volume = %a.volume, key = %key_id, error = %e, "cannot check the volume's master key")
                    }
                }
            }
        }
    }

    /// Runs [`Daemon::check_keys`] every interval until the daemon stops.
    pub async fn key_checker(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(every) = self.services.key_policy.check_interval else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.check_keys().await;
        }
    }

    /// Detaches now: cancels the volume's long operation (true when there was one), gives it
    /// up to 5 s to stop and clean up, disconnects the clients (in-flight requests finish),
    /// flushes, wipes the key.
    async fn force_detach(
        &self,
        volume: &str,
        operation: &str,
        caller: Option<Caller>,
    ) -> (bool, Result<Response, Error>) {
        let cancelled = self.state.ops.cancel(volume).is_some();
        for _ in 0..100 {
            if self.state.ops.check_idle(volume).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _g = self.state.locks.lock(&[crate::locks::volume(volume)]).await;
        let detached = self
            .detach_as(
                DetachRequest {
                    volume: volume.into(),
                    force: true,
                },
                caller,
                operation,
            )
            .await;
        (cancelled, detached)
    }

    /// `revoke --kms-key KEY`.
    pub(crate) async fn revoke(&self, kms_key: &str, caller: Caller) -> Result<Response, Error> {
        let started = Instant::now();
        let resolved = match self.services.kms.describe_key(kms_key).await {
            Ok(m) => Some(m.key_id),
            Err(e) => {
                tracing::warn!(key = %kms_key, error = %e, "revoke: the KMS cannot resolve the key; matching the id as given");
                None
            }
        };
        let matches = |key: &str| {
            same_key(key, kms_key) || resolved.as_deref().is_some_and(|r| same_key(key, r))
        };
        let mut detached = Vec::new();
        let mut cancelled = Vec::new();
        let mut errors = Vec::new();
        for a in self.state.registry.all() {
            if !matches(&a.keying().key_id) {
                continue;
            }
            let (was_busy, result) = self
                .force_detach(&a.volume, "revoke-detach", Some(caller))
                .await;
            if was_busy {
                cancelled.push(a.volume.clone());
            }
            match result {
                Ok(_) => detached.push(a.volume.clone()),
                // Detach drops the volume (and its key) even when the final flush fails.
                Err(e) if self.state.registry.get(&a.volume).is_none() => {
                    detached.push(a.volume.clone());
                    errors.push(format!("{}: {}", a.volume, e.message()));
                }
                Err(e) => errors.push(format!("{}: {}", a.volume, e.message())),
            }
        }
        let outcome = if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        };
        self.services.audit.record(&statedir::audit::AuditRecord {
            time: statedir::stamp::now(),
            operation: "revoke".into(),
            backend: self.services.kms.backend_name().into(),
            key_id: Some(resolved.clone().unwrap_or_else(|| kms_key.to_owned())),
            context: None,
            volume: None,
            caller_uid: Some(caller.uid),
            outcome: match &outcome {
                Ok(()) => format!("ok: detached {}", detached.join(", ")),
                Err(e) => e.clone(),
            },
            latency_ms: started.elapsed().as_millis() as u64,
            request_id: None,
        });
        tracing::warn!(key = %kms_key, detached = ?detached, "revoke: volumes detached and keys wiped");
        if let Err(e) = outcome {
            return Err(api(
                ErrorCode::Io,
                format!("revoke detached {} volume(s) but: {e}", detached.len()),
            ));
        }
        Ok(Response::Revoked {
            kms_key: kms_key.to_owned(),
            key_id: resolved,
            detached,
            cancelled,
        })
    }
}

/// The key check shown by `status`.
pub(crate) fn key_check_status(
    check: Option<KeyCheckResult>,
) -> (Option<String>, Option<control_api::KeyCheck>) {
    match check {
        None => (None, None),
        Some(c) => {
            let at = statedir::stamp::rfc3339(c.at);
            match c.state {
                Ok(s) => (
                    Some(s.to_string()),
                    Some(control_api::KeyCheck { at, error: None }),
                ),
                Err(e) => (None, Some(control_api::KeyCheck { at, error: Some(e) })),
            }
        }
    }
}

impl Daemon {
    /// `kms ...` key verbs on the local KMS, for root or the daemon's own user only (a key
    /// disabled or scheduled for deletion takes every volume under it down), each audited
    /// with its caller.
    pub(crate) fn kms_keys(&self, r: KmsKeyRequest, caller: Caller) -> Result<Response, Error> {
        let KmsBackend::Local(local) = &self.services.kms else {
            return Err(api(
                ErrorCode::Conflict,
                format!(
                    "this daemon uses the {} KMS, whose keys are managed there (AWS KMS: the aws \
                     CLI or console); 'cryptnbdctl kms' manages the embedded local KMS",
                    self.services.kms.backend_name()
                ),
            ));
        };
        if caller.uid != 0 && caller.uid != rustix::process::getuid().as_raw() {
            return Err(api(
                ErrorCode::PermissionDenied,
                format!(
                    "only root or the daemon's own user may manage its master keys (uid {} \
                     asked): run cryptnbdctl as root",
                    caller.uid
                ),
            ));
        }
        let (result, record) = statedir::keys::run(local, &r, caller.uid);
        if let Some(record) = record {
            self.services.audit.record(&record);
        }
        let keys = result.map_err(|e| {
            let code = match e.kind() {
                KmsErrorKind::KeyNotFound => ErrorCode::NotFound,
                KmsErrorKind::InvalidRequest => ErrorCode::InvalidRequest,
                KmsErrorKind::Keystore => ErrorCode::Io,
                _ => ErrorCode::KmsRefused,
            };
            api(code, chain(&e))
        })?;
        Ok(Response::KmsKeys {
            keys: keys
                .iter()
                .map(|k| serde_json::to_value(k).unwrap_or_default())
                .collect(),
        })
    }
}
