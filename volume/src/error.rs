//! The volume crate's one error type.

use std::path::Path;

/// The small set of outcomes callers branch on (the daemon maps them to NBD errors and exit
/// codes; the CLI to exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeErrorKind {
    /// The volume file does not exist.
    NotFound,
    /// A volume already exists at that path.
    AlreadyExists,
    /// Another process has the volume open.
    InUse,
    /// The header (both copies) or the token is damaged or not a volume.
    Corrupt,
    /// A valid LUKS2 volume that uses something cryptnbd does not implement.
    Unsupported,
    /// The KMS refused or failed; [`VolumeError::kms_kind`] says how.
    Kms,
    /// The caller's SID or directory does not match the volume's stored context.
    IdentityMismatch,
    /// The key the KMS returned does not match the header's digest.
    WrongKey,
    /// An argument is invalid (size, sector size, offset past the end).
    InvalidArgument,
    /// A write to a volume opened read-only.
    ReadOnly,
    /// The filesystem is full.
    NoSpace,
    /// A flush failed earlier: the volume refuses all I/O until it is reopened.
    Failed,
    /// The cluster fenced this host (another host took the volume over): the volume refuses
    /// all I/O here, for good.
    Fenced,
    /// Any other I/O error.
    Io,
    /// A long operation was cancelled (and cleaned up).
    Cancelled,
}

/// An error about one volume. The message names the volume and says what to do; it never
/// contains key material.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct VolumeError {
    kind: VolumeErrorKind,
    kms_kind: Option<kms_client::KmsErrorKind>,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl VolumeError {
    /// A new error with a complete message.
    pub fn new(kind: VolumeErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            kms_kind: None,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause (not repeated in the message).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// An error from the KMS while working on `path`.
    pub fn kms(path: &Path, what: &str, err: kms_client::KmsError) -> Self {
        let kind = err.kind();
        let mut e = Self::new(
            VolumeErrorKind::Kms,
            if kind == kms_client::KmsErrorKind::Unavailable {
                format!("{}: the KMS could not be asked to {what}", path.display())
            } else {
                format!("{}: the KMS refused to {what}", path.display())
            },
        )
        .with_source(err);
        e.kms_kind = Some(kind);
        e
    }

    /// An I/O error while doing `what` on `path`, classified (ENOSPC, ENOENT, EROFS ...).
    pub fn io(path: &Path, what: &str, err: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let (kind, hint) = match err.kind() {
            K::NotFound => (
                VolumeErrorKind::NotFound,
                ": no such file; check the name or path",
            ),
            K::AlreadyExists => (VolumeErrorKind::AlreadyExists, ""),
            // A verb the store cannot do (not a damaged volume): its sentence says which
            // and why.
            K::Unsupported => {
                return Self::new(VolumeErrorKind::InvalidArgument, err.to_string());
            }
            K::StorageFull | K::QuotaExceeded => (
                VolumeErrorKind::NoSpace,
                ": the filesystem is full; free space and retry",
            ),
            K::PermissionDenied | K::ReadOnlyFilesystem => (
                VolumeErrorKind::Io,
                ": check the file's permissions and the filesystem",
            ),
            _ => (VolumeErrorKind::Io, ""),
        };
        Self::new(kind, format!("{}: {what} failed{hint}", path.display())).with_source(err)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> VolumeErrorKind {
        self.kind
    }

    /// For [`VolumeErrorKind::Kms`]: what the KMS said.
    pub fn kms_kind(&self) -> Option<kms_client::KmsErrorKind> {
        self.kms_kind
    }
}
