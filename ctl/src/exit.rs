//! Exit codes (docs/cli.md): the kind of the first typed error in the chain decides.

use kms_client::{ContextError, KmsError, KmsErrorKind};
use volume::{VolumeError, VolumeErrorKind};

/// Success.
#[allow(dead_code)]
pub const OK: u8 = 0;
/// Any error not classified below.
pub const FAILURE: u8 = 1;
/// Bad arguments (clap uses 2 for usage errors too).
pub const USAGE: u8 = 2;
/// A volume or key that does not exist.
pub const NOT_FOUND: u8 = 3;
/// Conflicts with the current state: exists already, in use, read-only.
pub const CONFLICT: u8 = 4;
/// The KMS refused: key disabled or pending deletion, wrong key, context mismatch, access
/// denied; also an identity (SID / directory) that does not match the volume.
pub const KMS_REFUSED: u8 = 5;
/// The KMS could not be reached: retry later.
pub const KMS_UNAVAILABLE: u8 = 6;
/// The volume is damaged or uses an unsupported format.
pub const DAMAGED: u8 = 7;
/// I/O error, including a full filesystem.
pub const IO: u8 = 8;

fn kms_code(kind: KmsErrorKind) -> u8 {
    match kind {
        KmsErrorKind::KeyNotFound => NOT_FOUND,
        KmsErrorKind::InvalidRequest => USAGE,
        KmsErrorKind::Unavailable => KMS_UNAVAILABLE,
        KmsErrorKind::Keystore => IO,
        KmsErrorKind::KeyDisabled
        | KmsErrorKind::KeyPendingDeletion
        | KmsErrorKind::WrongKey
        | KmsErrorKind::InvalidCiphertext
        | KmsErrorKind::AccessDenied => KMS_REFUSED,
    }
}

/// The exit code for an error.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(v) = cause.downcast_ref::<VolumeError>() {
            return match v.kind() {
                VolumeErrorKind::Kms => v.kms_kind().map_or(KMS_REFUSED, kms_code),
                VolumeErrorKind::NotFound => NOT_FOUND,
                VolumeErrorKind::AlreadyExists
                | VolumeErrorKind::InUse
                | VolumeErrorKind::ReadOnly => CONFLICT,
                VolumeErrorKind::IdentityMismatch | VolumeErrorKind::WrongKey => KMS_REFUSED,
                VolumeErrorKind::Corrupt | VolumeErrorKind::Unsupported => DAMAGED,
                VolumeErrorKind::InvalidArgument => USAGE,
                VolumeErrorKind::NoSpace | VolumeErrorKind::Io | VolumeErrorKind::Failed => IO,
            };
        }
        if let Some(k) = cause.downcast_ref::<KmsError>() {
            return kms_code(k.kind());
        }
        if cause.downcast_ref::<ContextError>().is_some() {
            return USAGE;
        }
        if cause.downcast_ref::<UsageError>().is_some() {
            return USAGE;
        }
    }
    FAILURE
}

/// A bad argument found after parsing (a malformed name, a missing passphrase).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
