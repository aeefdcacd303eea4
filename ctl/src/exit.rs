//! Exit codes (docs/cli.md): the kind of the first typed error in the chain decides.

use kms_client::{ContextError, KmsError, KmsErrorKind};
use volume::{VolumeError, VolumeErrorKind};

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
/// The daemon is not running (for verbs that need it).
pub const NO_DAEMON: u8 = 9;
/// The caller may not control the daemon.
pub const DENIED: u8 = 10;
/// dm-crypt is not available on this host: no device-mapper in the kernel, or no
/// cryptsetup (`open --dm-crypt`); `attach` (NBD) still works.
pub const NO_DM_CRYPT: u8 = 11;
/// A long operation was cancelled (Ctrl-C or `cryptnbdctl cancel`); nothing was changed.
pub const CANCELLED: u8 = 130;

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
                VolumeErrorKind::NoSpace
                | VolumeErrorKind::Io
                | VolumeErrorKind::Failed
                | VolumeErrorKind::Fenced => IO,
                VolumeErrorKind::Cancelled => CANCELLED,
            };
        }
        if let Some(k) = cause.downcast_ref::<KmsError>() {
            return kms_code(k.kind());
        }
        if cause.downcast_ref::<ContextError>().is_some() {
            return USAGE;
        }
        if let Some(e) = cause.downcast_ref::<crate::client::ClientError>() {
            use control_api::ErrorCode as C;
            return match e {
                crate::client::ClientError::NotRunning(_) => NO_DAEMON,
                crate::client::ClientError::Protocol { .. } => FAILURE,
                crate::client::ClientError::Api(a) => match a.code {
                    C::InvalidRequest | C::UnsupportedVersion => USAGE,
                    C::PermissionDenied => DENIED,
                    C::NotFound => NOT_FOUND,
                    C::Conflict => CONFLICT,
                    C::KmsRefused => KMS_REFUSED,
                    C::KmsUnavailable => KMS_UNAVAILABLE,
                    C::Damaged => DAMAGED,
                    C::Io => IO,
                    C::Cancelled => CANCELLED,
                    C::ShuttingDown | C::Internal => FAILURE,
                },
            };
        }
        if let Some(e) = cause.downcast_ref::<CliError>() {
            return e.code;
        }
    }
    FAILURE
}

/// An error the CLI finds itself (a malformed name, a missing passphrase, no keystore), with
/// its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// The exit code.
    pub code: u8,
    /// What is wrong and what to do.
    pub message: String,
}

impl CliError {
    /// A bad argument (exit 2).
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: USAGE,
            message: message.into(),
        }
    }

    /// Something that does not exist (exit 3).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: NOT_FOUND,
            message: message.into(),
        }
    }
}
