//! The control API of cryptnbd: what `cryptnbdctl` sends the daemon and what it answers.
//!
//! Transport (docs/control-api.md): a unix stream socket; each message is one line of JSON
//! (UTF-8, `\n`-terminated, at most [`MAX_MESSAGE_BYTES`]). The client sends an [`Envelope`]
//! with a [`Request`]; the daemon answers with one [`ResponseEnvelope`] per request, in order.
//! Callers are identified by their peer credentials; the daemon checks them against its
//! allow-list before reading a request.
//!
//! Versioning: [`API_VERSION`] is sent in every request. The daemon refuses a newer major
//! version with [`ErrorCode::UnsupportedVersion`]. Fields are only ever added, with defaults,
//! so older clients keep working.
//!
//! This crate holds types, their encoding and the state layout ([`paths`]) only: no
//! sockets, no files. It must not depend
//! on the daemon, the volume format or the KMS.

#![forbid(unsafe_code)]

pub mod dmcrypt;
pub mod paths;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use dmcrypt::{DmCryptMapping, OpenDmCryptRequest, validate_dm_name};

/// An error and its causes as one sentence ("a: b: c"): how an error travels in an
/// [`ApiError`] message, an audit outcome, or the CLI's output.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Version of the control API spoken by this build.
pub const API_VERSION: u32 = 1;
/// Largest message (one JSON line) either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A request with its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The API version the client speaks.
    pub version: u32,
    /// The request.
    pub request: Request,
    /// Send [`Outcome::Progress`] lines while a long operation runs (before its answer).
    #[serde(default)]
    pub progress: bool,
}

impl Envelope {
    /// A request in this build's API version, without progress events.
    pub fn new(request: Request) -> Self {
        Self {
            version: API_VERSION,
            request,
            progress: false,
        }
    }
}

/// Everything the daemon can be asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Daemon version and settings (no side effects).
    Hello,
    /// Create a volume (the daemon asks the KMS and writes the audit record).
    Create(CreateRequest),
    /// Attach a volume: unwrap its key and export it over NBD.
    Attach(AttachRequest),
    /// Detach a volume: drain, flush, wipe the key.
    Detach(DetachRequest),
    /// Every volume in the state directory, attached or not.
    List,
    /// Attached volumes with their exports and connections (one, or all).
    Status {
        /// One volume, or all when absent.
        volume: Option<String>,
    },
    /// Delete a detached volume: wipe both header copies and the keyslot area, then remove.
    Delete {
        /// Volume name.
        volume: String,
        /// Also delete its snapshots (refused while any exist otherwise).
        #[serde(default)]
        with_snapshots: bool,
    },
    /// Read the audit trail.
    Audit(AuditQuery),
    /// Restore a volume's content from its base image, another image or a snapshot.
    Rebuild(RebuildRequest),
    /// Take a crash-consistent point-in-time copy of a volume.
    Snapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name; a UTC timestamp when absent.
        #[serde(default)]
        name: Option<String>,
    },
    /// A volume's snapshots.
    Snapshots {
        /// Volume name.
        volume: String,
    },
    /// Delete one snapshot (wiped like a volume).
    DeleteSnapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// Re-wrap the volume key under another master key and/or context (no data rewritten).
    Rekey(RekeyRequest),
    /// Move a detached volume to another store (files, the RBD pool): copied, then swapped.
    Move {
        /// Volume name.
        volume: String,
        /// The store it goes to (`file`, `rbd`).
        to_store: String,
    },
    /// A new volume key and every sector re-encrypted (the volume must be detached, or
    /// `force`).
    Reencrypt {
        /// Volume name.
        volume: String,
        /// Detach (draining clients), re-encrypt, re-attach under the same export.
        #[serde(default)]
        force: bool,
    },
    /// Add a recovery passphrase keyslot (argon2id) holding the volume key.
    RecoveryAdd {
        /// Volume name.
        volume: String,
        /// The passphrase.
        passphrase: Secret,
    },
    /// Remove recovery keyslots (one, or all).
    RecoveryRemove {
        /// Volume name.
        volume: String,
        /// Keyslot id; all recovery keyslots when absent.
        #[serde(default)]
        keyslot: Option<u32>,
    },
    /// Decrypt a volume into a raw image written to the file descriptor passed with the
    /// request.
    Export(ExportRequest),
    /// Copy a volume's header area (both headers and the keyslot area) to the file descriptor
    /// passed with the request.
    HeaderBackup {
        /// Volume name.
        volume: String,
        /// Where the client writes it (for messages and the audit trail).
        to: String,
    },
    /// Restore a volume's header area from a backup read from the file descriptor passed with
    /// the request.
    HeaderRestore {
        /// Volume name.
        volume: String,
        /// Where the client read it from (for messages and the audit trail).
        from: String,
        /// Restore a backup of another volume (a different LUKS2 UUID).
        #[serde(default)]
        force: bool,
    },
    /// Cancel the long operation running on a volume.
    Cancel {
        /// Volume name.
        volume: String,
    },
    /// The long operations running now.
    Operations,
    /// A `kms ...` key verb on the daemon's local KMS (root or the daemon's own user only).
    Kms(KmsKeyRequest),
    /// Re-read the TLS certificates and CRL, then check every live TLS session again
    /// (revoked, expired or no longer allowed: disconnected). Root or the daemon's user.
    TlsReload,
    /// Replace the certificate allow-list of an attached export (root, the daemon's user or
    /// whoever attached it). Live TLS sessions of the export that the new list refuses are
    /// disconnected, as by a reload; a persistent attachment keeps the new list across
    /// restarts.
    TlsAllow {
        /// Volume name.
        volume: String,
        /// The new list; empty admits every certificate the CA signed and did not revoke.
        allow_certs: Vec<CertRule>,
    },
    /// The incident-response kill switch: detach every attached volume whose key is wrapped
    /// under `kms_key` now (clients disconnected, no drain), wipe their keys, and cancel the
    /// long operations on them.
    Revoke {
        /// Key id, ARN or alias.
        kms_key: String,
    },
    /// Root only: unwrap the volume key as `attach` does and write it into the pipe passed
    /// with the request, for `cryptsetup open`; the volume is held until its mapping exists
    /// or the client reports with `dm-crypt-opened` (docs/control-api.md, "dm-crypt").
    OpenDmCrypt(OpenDmCryptRequest),
    /// Root only: what `cryptsetup open` did with the key of an `open-dm-crypt` (audited).
    DmCryptOpened {
        /// Volume name.
        volume: String,
        /// Device-mapper name.
        name: String,
        /// Why cryptsetup failed (its message); None when it succeeded.
        #[serde(default)]
        error: Option<String>,
    },
    /// Root only: the volume a dm-crypt mapping serves, before the client runs `cryptsetup
    /// close` (refused for mappings that are not of a volume of this daemon).
    CloseDmCrypt {
        /// Device-mapper name.
        name: String,
    },
    /// Root only: what `cryptsetup close` did (audited).
    DmCryptClosed {
        /// Volume name.
        volume: String,
        /// Device-mapper name.
        name: String,
        /// Why cryptsetup failed (its message); None when it succeeded.
        #[serde(default)]
        error: Option<String>,
    },
}

impl Request {
    /// The volume the request is about, if one.
    pub fn volume(&self) -> Option<&str> {
        match self {
            Request::Create(r) => Some(&r.name),
            Request::Attach(r) => Some(&r.volume),
            Request::Detach(r) => Some(&r.volume),
            Request::Status { volume } => volume.as_deref(),
            Request::Rebuild(r) => Some(&r.volume),
            Request::Rekey(r) => Some(&r.volume),
            Request::Export(r) => Some(&r.volume),
            Request::Delete { volume, .. }
            | Request::Snapshot { volume, .. }
            | Request::Snapshots { volume }
            | Request::DeleteSnapshot { volume, .. }
            | Request::Reencrypt { volume, .. }
            | Request::RecoveryAdd { volume, .. }
            | Request::RecoveryRemove { volume, .. }
            | Request::HeaderBackup { volume, .. }
            | Request::HeaderRestore { volume, .. }
            | Request::Cancel { volume }
            | Request::Move { volume, .. }
            | Request::TlsAllow { volume, .. } => Some(volume),
            Request::OpenDmCrypt(r) => Some(&r.volume),
            Request::DmCryptOpened { volume, .. } | Request::DmCryptClosed { volume, .. } => {
                Some(volume)
            }
            Request::Hello
            | Request::Kms(_)
            | Request::TlsReload
            | Request::List
            | Request::Audit(_)
            | Request::Operations
            | Request::Revoke { .. }
            | Request::CloseDmCrypt { .. } => None,
        }
    }
}

/// A secret string (a passphrase): never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A source image the client passes as a file descriptor (SCM_RIGHTS) with the request:
/// the daemon reads it as raw bytes, in order, from its start (a regular file or a pipe).
/// The client opens it with its own permissions, so the daemon never opens a path for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSource {
    /// The image's name as the user gave it (recorded, shown in messages).
    pub path: String,
    /// Its size in bytes when the descriptor is a stream (a converter's output); for a
    /// regular file the daemon takes the file's size.
    #[serde(default)]
    pub size: Option<u64>,
    /// The format the client converted from (`raw` when read as it is).
    #[serde(default)]
    pub format: Option<String>,
}

/// Where a rebuild takes the content from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "kebab-case")]
pub enum RebuildSource {
    /// The base image recorded at create (passed as a descriptor by the client, which opens
    /// the recorded path; its SHA-256 must match the record).
    BaseImage(ImageSource),
    /// Another image (passed as a descriptor).
    Image(ImageSource),
    /// A snapshot of the volume.
    Snapshot {
        /// Snapshot name.
        name: String,
    },
}

/// `rebuild`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildRequest {
    /// Volume name.
    pub volume: String,
    /// Where the content comes from.
    pub source: RebuildSource,
    /// If attached: detach (draining clients), rebuild, re-attach under the same export.
    #[serde(default)]
    pub force: bool,
}

/// `rekey`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RekeyRequest {
    /// Volume name.
    pub volume: String,
    /// The new master key (id or alias).
    pub kms_key: String,
    /// New extra context pairs (replacing the old extras); unchanged when absent.
    #[serde(default)]
    pub context: Option<Vec<(String, String)>>,
}

/// `export`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRequest {
    /// Volume name.
    pub volume: String,
    /// Where the client writes it (for messages and the audit trail).
    pub to: String,
    /// Must be true: the caller asked for plaintext explicitly.
    pub plaintext: bool,
}

/// `create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// Volume name.
    pub name: String,
    /// Data size in bytes.
    pub size: u64,
    /// 512 or 4096.
    pub sector_size: u32,
    /// Master key id or alias.
    pub kms_key: String,
    /// The user's SID.
    pub sid: String,
    /// The directory id.
    pub directory: String,
    /// Extra context pairs.
    #[serde(default)]
    pub context: Vec<(String, String)>,
    /// Encrypt this image (passed as a descriptor) into the new volume.
    #[serde(default)]
    pub from_image: Option<ImageSource>,
    /// Record the image (path, size, SHA-256) as the volume's base image for rebuilds.
    #[serde(default)]
    pub record_base: bool,
    /// Volume id; generated when absent.
    #[serde(default)]
    pub volume_id: Option<String>,
    /// Context key for `[SID]@[DIR]`; the default when absent.
    #[serde(default)]
    pub sid_directory_key: Option<String>,
    /// Context key for the volume id; the default when absent.
    #[serde(default)]
    pub volume_id_key: Option<String>,
    /// The store the volume goes to (`file`, `rbd`); the daemon's `[store] default` when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// `attach`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttachRequest {
    /// Volume name.
    pub volume: String,
    /// Export read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Export name; the volume name when absent.
    #[serde(default)]
    pub export_name: Option<String>,
    /// Do not re-attach when the daemon restarts.
    #[serde(default)]
    pub transient: bool,
    /// If given, must match the volume's stored SID (checked before any KMS call).
    #[serde(default)]
    pub sid: Option<String>,
    /// If given, must match the volume's stored directory.
    #[serde(default)]
    pub directory: Option<String>,
    /// More users who may open the export (the caller, its owner, always may).
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Groups whose members may open the export.
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// Also export on the daemon's TCP listener (off by default).
    #[serde(default)]
    pub tcp: bool,
    /// Serve the export only over TLS (on listeners where TLS is optional it is left out
    /// of LIST and refused until the client upgrades).
    #[serde(default)]
    pub tls_only: bool,
    /// Client certificates that may open the export (any one of them); empty: any the CA
    /// signed and did not revoke. Clients without TLS may not open an export that has some.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_certs: Vec<CertRule>,
    /// Also bind a kernel NBD device to the volume: "/dev/nbdN", or "auto" for the first
    /// free one (the daemon saves the device it got, so a restart reconnects the same one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Kernel device: connections (1..=16; the kernel spreads its queues over them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// Kernel device: seconds a request may go unanswered before the kernel drops its
    /// connection and resends it after a reconnect (0: wait for ever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_timeout_secs: Option<u64>,
    /// Kernel device: seconds the kernel queues I/O while every connection is dead (the
    /// daemon restarting) before failing it with EIO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_conn_timeout_secs: Option<u64>,
    /// Take the volume from the host that holds it (an RBD volume): once that host is gone
    /// (waiting for its watch to lapse), or at once with `force`. The old holder is fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take_over: Option<TakeOver>,
}

/// How `attach --take-over` treats the holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TakeOver {
    /// Only from a holder that is gone (its watch has lapsed).
    IfGone,
    /// Even from a holder that is alive (`--force`).
    Force,
}

/// A kernel NBD device bound to an attached volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDeviceStatus {
    /// `/dev/nbdN`.
    pub path: String,
    /// Connections the kernel has to the daemon.
    pub connections: u32,
    /// Block size (the volume's sector size).
    pub block_size: u32,
    /// See [`AttachRequest::io_timeout_secs`].
    pub io_timeout_secs: u64,
    /// See [`AttachRequest::dead_conn_timeout_secs`].
    pub dead_conn_timeout_secs: u64,
    /// Dead connections replaced since it was bound.
    pub reconnects: u64,
    /// Bound by reconnecting the kernel's existing configuration (the daemon had stopped
    /// without detaching), not by a new connect.
    pub resumed: bool,
}

/// `detach`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetachRequest {
    /// Volume name.
    pub volume: String,
    /// Disconnect connected clients (after finishing their in-flight requests) instead of
    /// refusing.
    #[serde(default)]
    pub force: bool,
}

/// `audit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Only records about this volume.
    #[serde(default)]
    pub volume: Option<String>,
    /// Only records at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<String>,
    /// At most this many records (the newest).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A response with its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// The API version the daemon speaks.
    pub version: u32,
    /// The outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Success with a payload, or an error.
// One is built per request and encoded at once: the size of the largest answer (a volume
// summary) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Outcome {
    /// It worked.
    Ok {
        /// What the request returns.
        result: Response,
    },
    /// It failed.
    Error(ApiError),
    /// Not the answer yet: how far a long operation is (only when asked for).
    Progress(ProgressEvent),
}

/// How far a long operation is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// The operation (`import`, `rebuild`, `snapshot`, `reencrypt`, `export`).
    pub operation: String,
    /// Volume name.
    pub volume: String,
    /// What it is doing now (`copying`, `syncing`, ...).
    pub phase: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all (0 when unknown).
    pub total: u64,
}

/// A long operation running now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationStatus {
    /// Operation id.
    pub id: u64,
    /// What it is.
    pub operation: String,
    /// Volume name.
    pub volume: String,
    /// Who started it.
    pub caller_uid: u32,
    /// Since (RFC 3339).
    pub since: String,
    /// Progress now.
    pub phase: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all (0 when unknown).
    pub total: u64,
}

/// A snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Volume name.
    pub volume: String,
    /// Snapshot name.
    pub name: String,
    /// The snapshot file (a LUKS2 volume file).
    pub path: String,
    /// When it was taken (RFC 3339, from the file).
    pub created: String,
    /// Data size in bytes.
    pub size: u64,
    /// How it was made: `reflink` or `copy` (only when just taken).
    #[serde(default)]
    pub method: Option<String>,
}

/// A volume's recorded base image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseImage {
    /// The path as given at create.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its raw content, hex.
    pub sha256: String,
    /// The format it was read from.
    #[serde(default)]
    pub format: Option<String>,
}

/// A volume whose forced detach waits for requests stuck in its backing store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachingStatus {
    /// Volume name.
    pub volume: String,
    /// When the detach was forced (RFC 3339).
    pub since: String,
}

/// The `kms` key verbs the daemon runs on its local KMS. The keystore's sealing, backup and
/// restore stay with the CLI (they take passphrases and files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "kebab-case")]
pub enum KmsKeyRequest {
    /// A new master key.
    CreateKey {
        /// `alias/NAME`, if any.
        alias: Option<String>,
        /// Free-form description.
        description: String,
    },
    /// Every key.
    ListKeys,
    /// One key.
    DescribeKey {
        /// Key id or `alias/NAME`.
        key: String,
    },
    /// Enable a key.
    EnableKey {
        /// Key id or `alias/NAME`.
        key: String,
    },
    /// Disable a key.
    DisableKey {
        /// Key id or `alias/NAME`.
        key: String,
    },
    /// Schedule a key's deletion after `days`.
    ScheduleKeyDeletion {
        /// Key id or `alias/NAME`.
        key: String,
        /// Waiting period in days (7-30).
        days: u32,
    },
    /// Cancel a scheduled deletion.
    CancelKeyDeletion {
        /// Key id or `alias/NAME`.
        key: String,
    },
    /// A new backing-key version.
    RotateKey {
        /// Key id or `alias/NAME`.
        key: String,
    },
}

/// What each request returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Response {
    /// For `hello`.
    Hello(DaemonInfo),
    /// For `create`.
    Created(VolumeSummary),
    /// For `attach`.
    Attached(AttachmentStatus),
    /// For `detach`.
    Detached {
        /// Volume name.
        volume: String,
        /// Connections that were closed (with `force`).
        disconnected: Vec<ConnectionStatus>,
        /// With `force`, when requests in flight were still stuck in the backing store after
        /// the wait: what remains to happen (the key is wiped once they return).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pending: Option<String>,
    },
    /// For `list`.
    Volumes {
        /// Every volume.
        volumes: Vec<VolumeSummary>,
    },
    /// For `status`.
    Status {
        /// Attached volumes.
        attachments: Vec<AttachmentStatus>,
        /// Volumes detached with `--force` whose requests are still stuck in the backing
        /// store: they hold the volume (and its key) until they return.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        detaching: Vec<DetachingStatus>,
    },
    /// For `delete`.
    Deleted {
        /// Volume name.
        volume: String,
    },
    /// For `audit`: raw JSON records, oldest first.
    Audit {
        /// The records.
        records: Vec<serde_json::Value>,
    },
    /// For `rebuild`.
    Rebuilt {
        /// Volume name.
        volume: String,
        /// What it was rebuilt from.
        source: String,
        /// Bytes written.
        bytes: u64,
        /// Re-attached (it was attached and `force` was given).
        reattached: bool,
    },
    /// For `move`.
    Moved {
        /// Volume name.
        volume: String,
        /// The store it left.
        from_store: String,
        /// The store it is in now.
        to_store: String,
        /// Where it is now.
        path: String,
        /// Bytes copied (holes are not).
        bytes: u64,
    },
    /// For `snapshot`.
    SnapshotTaken(SnapshotInfo),
    /// For `snapshots`.
    Snapshots {
        /// Volume name.
        volume: String,
        /// Oldest first.
        snapshots: Vec<SnapshotInfo>,
    },
    /// For `delete-snapshot`.
    SnapshotDeleted {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// For `rekey`.
    Rekeyed {
        /// Volume name.
        volume: String,
        /// The master key before.
        old_key_id: String,
        /// The master key now.
        key_id: String,
        /// The context now.
        context: BTreeMap<String, String>,
    },
    /// For `reencrypt`.
    Reencrypted {
        /// Volume name.
        volume: String,
        /// Bytes re-encrypted.
        bytes: u64,
        /// Recovery keyslots dropped (they held the old key).
        recovery_removed: Vec<u32>,
        /// Re-attached (it was attached and `force` was given).
        reattached: bool,
    },
    /// For `recovery add`.
    RecoveryAdded {
        /// Volume name.
        volume: String,
        /// The new keyslot.
        keyslot: u32,
    },
    /// For `recovery remove`.
    RecoveryRemoved {
        /// Volume name.
        volume: String,
        /// The keyslots removed.
        keyslots: Vec<u32>,
    },
    /// For `export`.
    Exported {
        /// Volume name.
        volume: String,
        /// Bytes written.
        bytes: u64,
        /// SHA-256 of what was written, hex.
        sha256: String,
    },
    /// For `header backup`.
    HeaderBackedUp {
        /// Volume name.
        volume: String,
        /// Bytes written.
        bytes: u64,
    },
    /// For `header restore`.
    HeaderRestored {
        /// Volume name.
        volume: String,
    },
    /// For `cancel`.
    Cancelled {
        /// The operation asked to stop (it stops at its next step and cleans up).
        operation: OperationStatus,
    },
    /// For `operations`.
    Operations {
        /// Running now.
        operations: Vec<OperationStatus>,
    },
    /// For `kms`: the keys the verb returns (one, or all for `list-keys`), each the KMS's key
    /// metadata as JSON (never key material).
    KmsKeys {
        /// The keys.
        keys: Vec<serde_json::Value>,
    },
    /// For `tls reload`.
    TlsReloaded {
        /// The TCP listener's mode (`off`, `on`, `require`).
        tcp: String,
        /// The unix socket's mode.
        unix: String,
        /// Live TLS sessions checked again.
        sessions_checked: usize,
        /// Those disconnected.
        disconnected: Vec<TlsDisconnect>,
    },
    /// For `tls allow`.
    TlsAllowed {
        /// The volume.
        volume: String,
        /// Its allow-list now (empty: every certificate the CA signed).
        allow_certs: Vec<CertRule>,
        /// Live TLS sessions of the export checked against it.
        sessions_checked: usize,
        /// Those disconnected.
        disconnected: Vec<TlsDisconnect>,
    },
    /// For `revoke`.
    Revoked {
        /// The key as given.
        kms_key: String,
        /// The key's canonical id, when the KMS could resolve it (matching also works without).
        key_id: Option<String>,
        /// Volumes detached (their keys wiped).
        detached: Vec<String>,
        /// Long operations cancelled.
        cancelled: Vec<String>,
    },
    /// For `open-dm-crypt`: the key is in the pipe; run `cryptsetup open` now.
    DmCryptKeySent(DmCryptMapping),
    /// For `dm-crypt-opened`: the mapping exists.
    DmCryptOpened(DmCryptMapping),
    /// For `close-dm-crypt`: the mapping and its volume.
    DmCryptMapping(DmCryptMapping),
    /// For `dm-crypt-closed`.
    DmCryptClosed {
        /// Volume name.
        volume: String,
        /// Device-mapper name.
        name: String,
    },
}

/// What `hello` tells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// Daemon version.
    pub version: String,
    /// API version.
    pub api_version: u32,
    /// State directory.
    pub state_dir: String,
    /// KMS backend in use.
    pub kms_backend: String,
    /// NBD unix socket.
    pub nbd_socket: String,
    /// NBD TCP listener, if any.
    pub nbd_tcp: Option<String>,
    /// Whether memory is locked (key material never swapped).
    pub memory_locked: bool,
    /// The local KMS's keystore (absent with another backend): where `cryptnbdctl kms`
    /// manages keys for this daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keystore: Option<String>,
}

/// A volume as `list` and `create` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeSummary {
    /// Volume name.
    pub name: String,
    /// Volume file.
    pub path: String,
    /// Data size in bytes.
    pub size: u64,
    /// Encryption sector size.
    pub sector_size: u32,
    /// Volume id from the token.
    pub volume_id: Option<String>,
    /// Master key id.
    pub key_id: Option<String>,
    /// The encryption context.
    pub context: BTreeMap<String, String>,
    /// Whether it is attached now.
    pub attached: bool,
    /// Why it could not be read, if so (a damaged header).
    pub problem: Option<String>,
    /// The recorded base image, if any.
    #[serde(default)]
    pub base_image: Option<BaseImage>,
    /// Recovery passphrase keyslots.
    #[serde(default)]
    pub recovery_keyslots: Vec<u32>,
    /// Number of snapshots.
    #[serde(default)]
    pub snapshots: usize,
    /// `/dev/mapper/NAME` when the volume is open through dm-crypt.
    #[serde(default)]
    pub dm_crypt: Option<String>,
    /// The store it lives in (`file`, `rbd`).
    #[serde(default)]
    pub store: String,
    /// Who holds it, when another host does (an RBD volume attached elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
}

/// An attached volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentStatus {
    /// The store the volume lives in (`file`, `rbd`).
    #[serde(default)]
    pub store: String,
    /// The cluster fenced this host from the volume (another host took it over): every
    /// request fails; detach it.
    #[serde(default)]
    pub fenced: bool,
    /// Volume name.
    pub volume: String,
    /// Export name.
    pub export_name: String,
    /// Exported read-only.
    pub read_only: bool,
    /// Not re-attached at restart.
    pub transient: bool,
    /// Also on TCP.
    pub tcp: bool,
    /// Only over TLS.
    #[serde(default)]
    pub tls_only: bool,
    /// The client certificates that may open it (empty: any the CA signed).
    #[serde(default)]
    pub allow_certs: Vec<CertRule>,
    /// Size in bytes.
    pub size: u64,
    /// When it was attached (RFC 3339).
    pub since: String,
    /// Owner uid (who attached it).
    pub owner_uid: u32,
    /// NBD URIs that reach it.
    pub uris: Vec<String>,
    /// Bytes read through the export since attach.
    pub bytes_read: u64,
    /// Bytes written through the export since attach.
    pub bytes_written: u64,
    /// Open connections.
    pub connections: Vec<ConnectionStatus>,
    /// Set when a flush failed: the volume refuses I/O until detached.
    pub failed: bool,
    /// The master key that wraps the volume key.
    #[serde(default)]
    pub kms_key: String,
    /// Its state at the last check (`Enabled`, `Disabled`, `PendingDeletion`, ...), or None
    /// when not checked yet.
    #[serde(default)]
    pub key_state: Option<String>,
    /// When the key was last checked (RFC 3339), and the error if the check failed.
    #[serde(default)]
    pub key_checked: Option<KeyCheck>,
    /// The kernel NBD device bound to the volume, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Box<KernelDeviceStatus>>,
}

/// The last periodic check of an attached volume's master key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyCheck {
    /// When (RFC 3339).
    pub at: String,
    /// Why the check failed (the KMS could not be asked), if it did.
    pub error: Option<String>,
}

/// One NBD connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// Connection id.
    pub id: u64,
    /// Who: `pid 123 (uid 1000)` or `tcp 127.0.0.1:5555`.
    pub peer: String,
    /// Over TLS: the client certificate's subject (RFC 4514), or `(no certificate)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Connected since (RFC 3339).
    pub since: String,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// A TLS session a reload, an allow-list change or the expiry check ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsDisconnect {
    /// The volume it used.
    pub volume: String,
    /// The connection id.
    pub connection: u64,
    /// Who (`tcp 192.0.2.7:51234`).
    pub peer: String,
    /// The client certificate's subject.
    pub certificate: String,
    /// Why.
    pub reason: String,
}

/// A client certificate an export admits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertRule {
    /// The subject matches this RFC 4514 name, written the way `certtool -i` prints it
    /// (`CN=host1.example.com,O=Example`; `*` matches within one value).
    Subject(String),
    /// This issuer (RFC 4514) and serial number (hex).
    IssuerSerial {
        /// The issuer's name.
        issuer: String,
        /// The serial number, hex.
        serial: String,
    },
    /// The certificate's SHA-256 fingerprint (hex; colons allowed).
    Sha256(String),
}

impl std::fmt::Display for CertRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertRule::Subject(s) => write!(f, "subject {s}"),
            CertRule::IssuerSerial { issuer, serial } => {
                write!(f, "issuer {issuer} serial {serial}")
            }
            CertRule::Sha256(h) => write!(f, "sha256 {h}"),
        }
    }
}

/// Error classes a client branches on (and maps to exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Malformed request or bad argument.
    InvalidRequest,
    /// The API version is not supported.
    UnsupportedVersion,
    /// The caller may not do this.
    PermissionDenied,
    /// No such volume or key.
    NotFound,
    /// Conflicts with the current state (exists, attached, in use, clients connected).
    Conflict,
    /// The KMS or the identity check refused.
    KmsRefused,
    /// The KMS could not be reached.
    KmsUnavailable,
    /// The volume is damaged or unsupported.
    Damaged,
    /// I/O error (including a full disk).
    Io,
    /// The daemon is shutting down.
    ShuttingDown,
    /// The operation was cancelled (nothing was changed).
    Cancelled,
    /// Anything else.
    Internal,
}

/// An error the daemon returns: a class and a sentence that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The class.
    pub code: ErrorCode,
    /// What happened and what to do (never key material).
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// More than [`MAX_MESSAGE_BYTES`] without a newline.
    #[error("the message is longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
    /// Not valid JSON of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes a message as one JSON line (with the trailing newline).
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain data types to a Vec cannot fail: no maps with non-string keys,
    // no custom serializers that error.
    let mut v = serde_json::to_vec(msg).unwrap_or_else(|e| unreachable!("encoding: {e}"));
    v.push(b'\n');
    v
}

/// Takes one complete line off the front of `buf` and decodes it. `Ok(None)` means "no
/// complete line yet, read more" (unless `buf` is already too long).
pub fn decode_line<T: for<'de> Deserialize<'de>>(
    buf: &mut Vec<u8>,
) -> Result<Option<T>, DecodeError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(n) if n <= MAX_MESSAGE_BYTES => {
            let line: Vec<u8> = buf.drain(..=n).collect();
            Ok(Some(serde_json::from_slice(&line[..n])?))
        }
        Some(_) => Err(DecodeError::TooLong),
        None if buf.len() > MAX_MESSAGE_BYTES => Err(DecodeError::TooLong),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_lines() {
        let req = Envelope::new(Request::Attach(AttachRequest {
            volume: "v".into(),
            read_only: true,
            ..AttachRequest::default()
        }));
        let mut bytes = encode_line(&req);
        let text = String::from_utf8(bytes.clone()).expect("utf-8");
        assert!(text.contains("\"op\":\"attach\""), "{text}");
        let mut partial = bytes[..5].to_vec();
        assert!(
            decode_line::<Envelope>(&mut partial)
                .expect("partial")
                .is_none()
        );
        bytes.extend(encode_line(&Envelope::new(Request::List)));
        assert_eq!(
            decode_line::<Envelope>(&mut bytes).expect("first"),
            Some(req)
        );
        assert_eq!(
            decode_line::<Envelope>(&mut bytes)
                .expect("second")
                .map(|e| e.request),
            Some(Request::List)
        );
        assert!(bytes.is_empty());
    }

    #[test]
    fn responses_round_trip() {
        let r = ResponseEnvelope {
            version: API_VERSION,
            outcome: Outcome::Error(ApiError::new(ErrorCode::Conflict, "attached")),
        };
        let mut line = encode_line(&r);
        assert_eq!(
            decode_line::<ResponseEnvelope>(&mut line).expect("decode"),
            Some(r)
        );
        let ok = ResponseEnvelope {
            version: API_VERSION,
            outcome: Outcome::Ok {
                result: Response::Deleted { volume: "v".into() },
            },
        };
        let mut line = encode_line(&ok);
        assert_eq!(
            decode_line::<ResponseEnvelope>(&mut line).expect("decode"),
            Some(ok)
        );
    }

    #[test]
    fn hostile_input_is_refused_not_panicked() {
        let mut junk = b"{\"version\":1,\"request\":{\"op\":\"nope\"}}\n".to_vec();
        assert!(matches!(
            decode_line::<Envelope>(&mut junk),
            Err(DecodeError::Malformed(_))
        ));
        let mut long = vec![b'x'; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode_line::<Envelope>(&mut long),
            Err(DecodeError::TooLong)
        ));
        let mut bad = b"\xff\xfe\n".to_vec();
        assert!(decode_line::<Envelope>(&mut bad).is_err());
    }
}
