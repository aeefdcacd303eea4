//! The daemon's one error policy: what went wrong in a handler becomes the wire's
//! [`ErrorCode`] here and nowhere else. Handlers say what happened ([`api`] with the code
//! that names it, or a library error that [`volume_error`] maps by its kind); the control
//! socket sends the result as it is.

use control_api::{ApiError, ErrorCode};
use kms_client::KmsErrorKind;
use volume::{VolumeError, VolumeErrorKind};

pub use control_api::chain;

/// An error for the wire: `code` says what kind, `message` says what happened and what to do.
pub(crate) fn api(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

/// Maps a volume error to the API's classes; the message keeps the whole cause chain.
pub(crate) fn volume_error(e: &VolumeError) -> ApiError {
    let code = match e.kind() {
        VolumeErrorKind::NotFound => ErrorCode::NotFound,
        VolumeErrorKind::AlreadyExists | VolumeErrorKind::InUse | VolumeErrorKind::ReadOnly => {
            ErrorCode::Conflict
        }
        VolumeErrorKind::Corrupt | VolumeErrorKind::Unsupported => ErrorCode::Damaged,
        VolumeErrorKind::IdentityMismatch | VolumeErrorKind::WrongKey => ErrorCode::KmsRefused,
        VolumeErrorKind::InvalidArgument => ErrorCode::InvalidRequest,
        VolumeErrorKind::NoSpace | VolumeErrorKind::Io | VolumeErrorKind::Failed => ErrorCode::Io,
        VolumeErrorKind::Cancelled => ErrorCode::Cancelled,
        VolumeErrorKind::Kms => match e.kms_kind() {
            Some(KmsErrorKind::KeyNotFound) => ErrorCode::NotFound,
            Some(KmsErrorKind::Unavailable) => ErrorCode::KmsUnavailable,
            Some(KmsErrorKind::InvalidRequest) => ErrorCode::InvalidRequest,
            Some(KmsErrorKind::Keystore) => ErrorCode::Io,
            _ => ErrorCode::KmsRefused,
        },
    };
    api(code, chain(e))
}
