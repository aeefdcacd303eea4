//! The `kms` key verbs on the embedded local KMS, run the same way by the daemon (for a
//! `kms` control request) and by the CLI (without a daemon): the verb, the audit record of
//! a verb that changes the keystore, and the keys it returns.

use std::time::Instant;

use control_api::{KmsKeyRequest, chain};
use kms_client::local::LocalKms;
use kms_client::{KeyMetadata, KmsError};

use crate::audit::AuditRecord;

/// The audit operation of a verb that changes the keystore (None for the reads, which are
/// not audited).
pub fn operation(request: &KmsKeyRequest) -> Option<&'static str> {
    match request {
        KmsKeyRequest::CreateKey { .. } => Some("kms-create-key"),
        KmsKeyRequest::EnableKey { .. } => Some("kms-enable-key"),
        KmsKeyRequest::DisableKey { .. } => Some("kms-disable-key"),
        KmsKeyRequest::ScheduleKeyDeletion { .. } => Some("kms-schedule-key-deletion"),
        KmsKeyRequest::CancelKeyDeletion { .. } => Some("kms-cancel-key-deletion"),
        KmsKeyRequest::RotateKey { .. } => Some("kms-rotate-key"),
        KmsKeyRequest::ListKeys | KmsKeyRequest::DescribeKey { .. } => None,
    }
}

/// Runs `request` on `local`; returns the keys it answers with (one, or all for
/// `list-keys`) and, for a verb that changes the keystore, its audit record (caller
/// `caller_uid`).
pub fn run(
    local: &LocalKms,
    request: &KmsKeyRequest,
    caller_uid: u32,
) -> (Result<Vec<KeyMetadata>, KmsError>, Option<AuditRecord>) {
    let started = Instant::now();
    let one = |r: Result<KeyMetadata, KmsError>| r.map(|k| vec![k]);
    let (result, key) = match request {
        KmsKeyRequest::CreateKey { alias, description } => {
            (one(local.create_key(alias.as_deref(), description)), None)
        }
        KmsKeyRequest::ListKeys => (local.list_keys(), None),
        KmsKeyRequest::DescribeKey { key } => (one(local.describe(key)), Some(key)),
        KmsKeyRequest::EnableKey { key } => (one(local.enable_key(key)), Some(key)),
        KmsKeyRequest::DisableKey { key } => (one(local.disable_key(key)), Some(key)),
        KmsKeyRequest::ScheduleKeyDeletion { key, days } => {
            (one(local.schedule_key_deletion(key, *days)), Some(key))
        }
        KmsKeyRequest::CancelKeyDeletion { key } => {
            (one(local.cancel_key_deletion(key)), Some(key))
        }
        KmsKeyRequest::RotateKey { key } => (one(local.rotate_key(key)), Some(key)),
    };
    let record = operation(request).map(|operation| AuditRecord {
        time: crate::stamp::now(),
        operation: operation.into(),
        backend: "local".into(),
        key_id: result
            .as_ref()
            .ok()
            .and_then(|k| k.first())
            .map(|k| k.key_id.clone())
            .or_else(|| key.cloned()),
        context: None,
        volume: None,
        caller_uid: Some(caller_uid),
        outcome: match &result {
            Ok(_) => "ok".into(),
            Err(e) => chain(e),
        },
        latency_ms: started.elapsed().as_millis() as u64,
        request_id: None,
    });
    (result, record)
}
