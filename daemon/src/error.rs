//! The daemon's one error policy. Handlers return [`Error`]: a refusal they classify
//! themselves ([`api`]: a conflict, a missing volume, a bad argument, ...), or a library error
//! they pass on with `?` ([`Error::Volume`]). [`Error::code`] is the one place that maps
//! them to the wire's [`ErrorCode`], and the dispatch turns an [`Error`] into the
//! [`ApiError`] the control socket sends (`From<Error> for ApiError`).

use control_api::{ApiError, ErrorCode};
use kms_client::KmsErrorKind;
use volume::{VolumeError, VolumeErrorKind};

pub use control_api::chain;

/// What went wrong in a handler.
#[derive(Debug)]
pub enum Error {
    /// Refused or failed for a reason the handler states: `code` classifies it, `message`
    /// says what happened and what to do.
    Refused {
        /// The class.
        code: ErrorCode,
        /// What happened and what to do (never key material).
        message: String,
    },
    /// A volume (format, store, KMS unwrap) operation failed; classified by its kind.
    Volume(VolumeError),
}

/// A refusal classified by `code`.
pub(crate) fn api(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::Refused {
        code,
        message: message.into(),
    }
}

impl Error {
    /// The wire's class of this error: the one mapping of the daemon's errors.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Refused { code, .. } => *code,
            Error::Volume(e) => match e.kind() {
                VolumeErrorKind::NotFound => ErrorCode::NotFound,
                VolumeErrorKind::AlreadyExists
                | VolumeErrorKind::InUse
                | VolumeErrorKind::ReadOnly => ErrorCode::Conflict,
                VolumeErrorKind::Corrupt | VolumeErrorKind::Unsupported => ErrorCode::Damaged,
                VolumeErrorKind::IdentityMismatch | VolumeErrorKind::WrongKey => {
                    ErrorCode::KmsRefused
                }
                VolumeErrorKind::InvalidArgument => ErrorCode::InvalidRequest,
                VolumeErrorKind::NoSpace
                | VolumeErrorKind::Io
                | VolumeErrorKind::Failed
                | VolumeErrorKind::Fenced => ErrorCode::Io,
                VolumeErrorKind::Cancelled => ErrorCode::Cancelled,
                VolumeErrorKind::Kms => match e.kms_kind() {
                    Some(KmsErrorKind::KeyNotFound) => ErrorCode::NotFound,
                    Some(KmsErrorKind::Unavailable) => ErrorCode::KmsUnavailable,
                    Some(KmsErrorKind::InvalidRequest) => ErrorCode::InvalidRequest,
                    Some(KmsErrorKind::Keystore) => ErrorCode::Io,
                    _ => ErrorCode::KmsRefused,
                },
            },
        }
    }

    /// What happened and what to do, with the whole cause chain.
    pub fn message(&self) -> String {
        match self {
            Error::Refused { message, .. } => message.clone(),
            Error::Volume(e) => chain(e),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for Error {}

impl From<VolumeError> for Error {
    fn from(e: VolumeError) -> Self {
        Error::Volume(e)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::new(e.code(), e.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_errors_are_classified_by_kind_and_keep_their_cause_chain() {
        let e = Error::from(
            VolumeError::new(VolumeErrorKind::InUse, "v.luks is open in another process")
                .with_source(std::io::Error::other("locked")),
        );
        assert_eq!(e.code(), ErrorCode::Conflict);
        assert_eq!(e.message(), "v.luks is open in another process: locked");
        let wire = ApiError::from(api(ErrorCode::NotFound, "no volume x"));
        assert_eq!(
            (wire.code, wire.message.as_str()),
            (ErrorCode::NotFound, "no volume x")
        );
    }
}
