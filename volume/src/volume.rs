//! `Volume` = header + unwrapped key + backing store: byte-addressed encrypted I/O.
//!
//! Layout of a volume file (docs/format.md has every byte): two LUKS2 header copies, the
//! keyslot area (unused), then the data segment at 16 MiB, `size` bytes of AES-256-XTS
//! ciphertext in sectors of 512 or 4096 bytes.
//!
//! Rules this module keeps:
//! - The plain64 IV of a sector is its byte offset from the start of the data segment divided
//!   by 512, plus the segment's `iv_tweak`, whatever the sector size (as dm-crypt does).
//! - A sector whose ciphertext is all zero bytes (never written, or a trimmed hole) reads as
//!   zeros. Zeroes written by a client, or by write-zeroes, are encrypted like any data, so
//!   dm-crypt reads them as zeros too; only trim leaves holes.
//! - Sub-sector writes are read-modify-write under a per-sector lock, so two writers touching
//!   different bytes of one sector never lose each other's bytes.
//! - A failed fdatasync puts the volume in a failed state: every later request fails, so a
//!   write that may be lost is never acknowledged by a later successful flush.
//! - A volume file is locked with flock: exclusive for read-write, shared for read-only
//!   (store's file engine does it at open).
//! - The volume sees its bytes only through a [`BackingStore`]: a file here, memory in tests;
//!   opening by path picks the file engine.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use kms_client::{ContextKeys, DataKey, IdentityContext, Kms};
use serde::Serialize;
use store::catalog::Catalog;
use store::file::{Access, FileStore, OpenError};
use store::submit::Owned;
use store::{BackingStore, Discarded};
use zeroize::Zeroizing;

use crate::error::{VolumeError, VolumeErrorKind};
use crate::header::{self, HeaderSet};
use crate::luks2::{
    self, CryptSegment, DEFAULT_DATA_OFFSET, DEFAULT_HDR_SIZE, Metadata, Pbkdf2Digest,
};
use crate::token::{KmsToken, TOKEN_TYPE};
use crate::xts::{XTS_KEY_LEN, XtsCipher};

/// Number of stripes of the read-modify-write lock table. Sectors map to stripes by index, so
/// neighbouring sectors never share a stripe.
const RMW_STRIPES: usize = 1024;
/// Largest buffer write-zeroes encrypts at a time.
const ZERO_CHUNK: u64 = 1 << 20;
/// Plain zeros, written where the file needs zeros that are not ciphertext (a trim without
/// hole punching, a wiped header): static, so writing them never allocates.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Buffers of [`ZERO_CHUNK`] bytes in which write-zeroes encrypts, kept for reuse. The pool
/// only ever holds as many as were in use at once (one per concurrent call, which the NBD
/// server's I/O threads bound), so zeroing allocates nothing once warm: a process serving a
/// kernel block device must not need new memory to make progress.
#[derive(Default)]
struct ScratchPool {
    free: Mutex<Vec<Box<[u8]>>>,
}

impl ScratchPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<[u8]>>> {
        // A push or a pop: consistent after any panic.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Scratch<'_> {
        let buf = self
            .lock()
            .pop()
            .unwrap_or_else(|| vec![0; ZERO_CHUNK as usize].into_boxed_slice());
        Scratch { pool: self, buf }
    }
}

/// A buffer on loan from a [`ScratchPool`]; goes back when dropped.
struct Scratch<'a> {
    pool: &'a ScratchPool,
    buf: Box<[u8]>,
}

impl std::ops::Deref for Scratch<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for Scratch<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        // An empty boxed slice takes no allocation.
        self.pool.lock().push(std::mem::take(&mut self.buf));
    }
}

/// What `create` needs.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Data size in bytes, a multiple of the sector size.
    pub size: u64,
    /// Encryption sector size: 512 or 4096.
    pub sector_size: u32,
    /// The KMS master key (id or alias) that wraps the data key.
    pub key_id: String,
    /// The SID, directory and volume id bound into the encryption context.
    pub identity: IdentityContext,
    /// The context key names for the identity pairs.
    pub context_keys: ContextKeys,
    /// Further context pairs (for example a data classification tag).
    pub extra_context: Vec<(String, String)>,
}

/// How to open a volume.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open for reading only (shared lock; writes fail with `ReadOnly`).
    pub read_only: bool,
    /// If given, the volume's stored SID must be this one, or the open is refused before any
    /// KMS call.
    pub expect_sid: Option<String>,
    /// Likewise for the directory id.
    pub expect_directory: Option<String>,
}

/// An open, unlocked (key in memory) volume.
pub struct Volume {
    /// The store's location, for messages.
    path: PathBuf,
    /// Where the header and the encrypted sectors are.
    store: Box<dyn BackingStore>,
    read_only: bool,
    segment: CryptSegment,
    size: u64,
    cipher: XtsCipher,
    rmw_locks: Vec<Mutex<()>>,
    failed: AtomicBool,
    /// Set when the store reports this host fenced: every request fails from then on.
    fenced: AtomicBool,
    headers: HeaderSet,
    /// Entered by every write to the store (held until it completes), paused by
    /// [`Volume::pause_writes`].
    write_gate: std::sync::Arc<crate::gate::Gate>,
    /// Write-zeroes buffers.
    scratch: ScratchPool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("size", &self.size)
            .field("sector_size", &self.segment.sector_size)
            .finish_non_exhaustive()
    }
}

/// What `inspect` shows: the header and token, never key material.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    /// The volume file.
    pub path: PathBuf,
    /// LUKS2 UUID.
    pub uuid: String,
    /// Header update counter.
    pub seqid: u64,
    /// Bytes per header copy.
    pub header_size: u64,
    /// Where the data starts in the file.
    pub data_offset: u64,
    /// Data size in bytes.
    pub size: u64,
    /// Encryption sector size.
    pub sector_size: u32,
    /// The cipher (always aes-xts-plain64).
    pub cipher: String,
    /// Key size in bits.
    pub key_bits: u32,
    /// Added to every IV.
    pub iv_tweak: u64,
    /// Problem with the primary header copy, if any.
    pub primary_header_problem: Option<String>,
    /// Problem with the secondary header copy, if any.
    pub secondary_header_problem: Option<String>,
    /// Number of LUKS2 keyslots (recovery passphrases).
    pub keyslots: usize,
    /// Their ids.
    pub keyslot_ids: Vec<u32>,
    /// The cryptnbd-kms token, if the volume has one (cryptsetup-made volumes do not).
    pub token: Option<TokenInfo>,
}

/// The token as `inspect` shows it: the wrapped key only by length.
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    /// Token format version.
    pub version: u32,
    /// KMS backend.
    pub backend: String,
    /// Master key id.
    pub key_id: String,
    /// The full encryption context.
    pub context: std::collections::BTreeMap<String, String>,
    /// Volume id.
    pub volume_id: String,
    /// Creation time.
    pub created: String,
    /// Length of the wrapped key blob.
    pub wrapped_key_bytes: usize,
    /// Fields of newer versions, shown as they are.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn invalid(msg: String) -> VolumeError {
    VolumeError::new(VolumeErrorKind::InvalidArgument, msg)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// Opens the volume file at `path` with the file engine: `Access::ReadWrite` takes the
/// exclusive lock, `ReadOnly` a shared one, `Inspect` none. A volume another process holds is
/// refused with `InUse`.
pub fn open_file_store(path: &Path, access: Access) -> Result<FileStore, VolumeError> {
    if path.is_dir() {
        return Err(VolumeError::new(
            VolumeErrorKind::InvalidArgument,
            format!("{} is a directory, not a volume file", path.display()),
        ));
    }
    FileStore::open(path, access).map_err(|e| open_error(path, e))
}

/// Opens volume `name` of `catalog` with `access`, with the same errors as
/// [`open_file_store`].
pub fn open_in(
    catalog: &dyn Catalog,
    name: &str,
    access: Access,
) -> Result<Box<dyn BackingStore>, VolumeError> {
    catalog
        .open(name, access)
        .map_err(|e| open_error(&catalog.location(name), e))
}

pub(crate) fn open_error(path: &Path, e: OpenError) -> VolumeError {
    match e {
        OpenError::Locked => VolumeError::new(
            VolumeErrorKind::InUse,
            format!(
                "{} is open in another process (attached to a running cryptnbd?): detach it first",
                path.display()
            ),
        ),
        OpenError::Held(who) => VolumeError::new(
            VolumeErrorKind::InUse,
            format!(
                "{} is held by {who}: detach it there first, or attach with --take-over if that host is gone",
                path.display()
            ),
        ),
        OpenError::Io(e) => VolumeError::io(path, "opening the volume", e),
    }
}

/// Deletes volume `name` of `catalog` for good, as [`wipe_and_remove`] does a file: under
/// the exclusive lock (a volume in use is refused), checked to be a LUKS2 volume, its header
/// area wiped and flushed, then removed from the catalog (a catalog of immutable volumes, RBD
/// snapshots, has nothing to wipe: checked, then removed).
pub fn wipe_and_remove_in(catalog: &dyn Catalog, name: &str) -> Result<(), VolumeError> {
    let path = catalog.location(name);
    catalog
        .check_remove(name)
        .map_err(|e| VolumeError::io(&path, "deleting the volume", e))?;
    if catalog.immutable() {
        // Nothing can be written: checked to be a volume, then removed (the engine drops
        // its bytes).
        header::read_headers(&*open_in(catalog, name, Access::Inspect)?)?;
    } else {
        wipe_volume(&*open_in(catalog, name, Access::ReadWrite)?)?;
    }
    catalog
        .remove(name)
        .map_err(|e| VolumeError::io(&path, "removing the volume file", e))?;
    tracing::info!(volume = %path.display(), "volume wiped and removed");
    Ok(())
}

fn access_for(read_only: bool) -> Access {
    if read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    }
}

pub(crate) fn token_of(headers: &HeaderSet, path: &Path) -> Result<KmsToken, VolumeError> {
    let md = &headers.active.metadata;
    let (_, obj) = md.token(TOKEN_TYPE).ok_or_else(|| {
        let types = md.token_types();
        VolumeError::new(
            VolumeErrorKind::Unsupported,
            format!(
                "{} has no {TOKEN_TYPE} token (tokens: {}): it is a plain LUKS2 volume; \
                 open it with its volume key or a passphrase",
                path.display(),
                if types.is_empty() {
                    "none".into()
                } else {
                    types.join(", ")
                }
            ),
        )
    })?;
    KmsToken::from_json(obj)
        .map_err(|e| VolumeError::new(VolumeErrorKind::Corrupt, format!("{}: {e}", path.display())))
}

/// Reads the header and token of a volume without the KMS and without locking (it works on
/// an attached volume).
pub fn inspect(path: &Path) -> Result<VolumeInfo, VolumeError> {
    inspect_store(&open_file_store(path, Access::Inspect)?)
}

/// [`inspect`] on any backing store.
pub fn inspect_store(store: &dyn BackingStore) -> Result<VolumeInfo, VolumeError> {
    let path = store.location();
    let headers = header::read_headers(store)?;
    let md = &headers.active.metadata;
    let seg = md.crypt_segment().map_err(|e| {
        VolumeError::new(
            VolumeErrorKind::Unsupported,
            format!("{}: {e}", path.display()),
        )
    })?;
    let file_len = store
        .len()
        .map_err(|e| VolumeError::io(path, "reading the size", e))?;
    let token = match md.token(TOKEN_TYPE) {
        Some(_) => {
            let t = token_of(&headers, path)?;
            Some(TokenInfo {
                version: t.version,
                backend: t.backend.clone(),
                key_id: t.key_id.clone(),
                context: t.context.pairs().clone(),
                volume_id: t.volume_id.clone(),
                created: t.created.clone(),
                wrapped_key_bytes: t.wrapped().map(|w| w.len()).unwrap_or(0),
                extra: t.extra.clone(),
            })
        }
        None => None,
    };
    Ok(VolumeInfo {
        path: path.to_path_buf(),
        uuid: headers.active.binary.uuid.clone(),
        seqid: headers.active.binary.seqid,
        header_size: headers.active.binary.hdr_size,
        data_offset: seg.offset,
        size: data_size(&seg, file_len),
        sector_size: seg.sector_size,
        cipher: luks2::CIPHER.into(),
        key_bits: md.keyslot_key_size().map_or(512, |b| (b * 8) as u32),
        iv_tweak: seg.iv_tweak,
        primary_header_problem: headers.primary_problem.clone(),
        secondary_header_problem: headers.secondary_problem.clone(),
        keyslots: md.value()["keyslots"].as_object().map_or(0, |m| m.len()),
        keyslot_ids: md.value()["keyslots"]
            .as_object()
            .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default(),
        token,
    })
}

/// The volume key, unwrapped exactly as [`Volume::open`] unwraps it (the token's backend, the
/// caller's identity checked before any KMS call, KMS Decrypt with the stored context) and
/// verified against the header's digest, without opening the volume for I/O or locking it:
/// for handing the key to another implementation of the format (the kernel's dm-crypt).
pub async fn unwrap_key<K: Kms>(
    path: &Path,
    opts: &OpenOptions,
    kms: &K,
) -> Result<DataKey, VolumeError> {
    let store = open_file_store(path, Access::Inspect)?;
    let headers = header::read_headers(&store)?;
    let key = unwrap_checked(path, &headers, opts, kms).await?;
    check_key(path, &headers, &key)?;
    Ok(key)
}

/// Checks the token's backend and the caller's identity, then unwraps the key through the KMS
/// with the stored context (not yet checked against the digest).
async fn unwrap_checked<K: Kms>(
    path: &Path,
    headers: &HeaderSet,
    opts: &OpenOptions,
    kms: &K,
) -> Result<DataKey, VolumeError> {
    let token = token_of(headers, path)?;
    if token.backend != kms.backend_name() {
        return Err(VolumeError::new(
            VolumeErrorKind::Unsupported,
            format!(
                "{} was wrapped by the '{}' KMS backend but this cryptnbd uses '{}': configure that backend",
                path.display(),
                token.backend,
                kms.backend_name()
            ),
        ));
    }
    if opts.expect_sid.is_some() || opts.expect_directory.is_some() {
        let id = token.identity_in(path)?;
        for (what, expected, stored) in [
            ("SID", &opts.expect_sid, &id.sid),
            ("directory", &opts.expect_directory, &id.directory),
        ] {
            if let Some(expected) = expected
                && expected != stored
            {
                return Err(VolumeError::new(
                    VolumeErrorKind::IdentityMismatch,
                    format!(
                        "{} belongs to {what} {stored}, not {expected}: check --sid/--directory",
                        path.display()
                    ),
                ));
            }
        }
    }
    let wrapped = token.wrapped_in(path)?;
    kms.decrypt(&wrapped, &token.context, &token.key_id)
        .await
        .map_err(|e| VolumeError::kms(path, "unwrap the volume key", e))
}

/// Checks that the header asks for nothing cryptnbd does not implement and that `key` matches
/// its digest; returns the crypt segment.
fn check_key(path: &Path, headers: &HeaderSet, key: &DataKey) -> Result<CryptSegment, VolumeError> {
    let md = &headers.active.metadata;
    let unsupported = |e: luks2::HeaderError| {
        VolumeError::new(
            VolumeErrorKind::Unsupported,
            format!("{}: {e}", path.display()),
        )
    };
    let requirements = md.mandatory_requirements();
    if !requirements.is_empty() {
        return Err(VolumeError::new(
            VolumeErrorKind::Unsupported,
            format!(
                "{} has requirements cryptnbd does not implement ({}): finish or cancel the operation with the tool that started it",
                path.display(),
                requirements.join(", ")
            ),
        ));
    }
    let segment = md.crypt_segment().map_err(unsupported)?;
    let digest = md.segment_digest().map_err(unsupported)?;
    if key.len() != XTS_KEY_LEN || !digest.verify(key.expose()).map_err(unsupported)? {
        return Err(VolumeError::new(
            VolumeErrorKind::WrongKey,
            format!(
                "{}: the volume key does not match the header's digest (wrong key, or the header was replaced)",
                path.display()
            ),
        ));
    }
    Ok(segment)
}

/// Checks the size and sector size of a new volume; returns the store length it needs.
fn check_create(opts: &CreateOptions) -> Result<u64, VolumeError> {
    if opts.sector_size != 512 && opts.sector_size != 4096 {
        return Err(invalid(format!(
            "sector size {} is not supported: use 512 or 4096",
            opts.sector_size
        )));
    }
    if opts.size == 0 || !opts.size.is_multiple_of(u64::from(opts.sector_size)) {
        return Err(invalid(format!(
            "volume size {} must be a positive multiple of the sector size {}",
            opts.size, opts.sector_size
        )));
    }
    // File offsets are signed 64-bit on Linux.
    DEFAULT_DATA_OFFSET
        .checked_add(opts.size)
        .filter(|&t| i64::try_from(t).is_ok())
        .ok_or_else(|| {
            invalid(format!(
                "volume size {} is too large: the largest is {} bytes",
                opts.size,
                i64::MAX as u64 - DEFAULT_DATA_OFFSET
            ))
        })
}

/// The most data a volume on a device of `device_len` bytes holds: what follows the header
/// area, in whole sectors (0 when the device is too small for the header).
pub fn device_data_size(device_len: u64, sector_size: u32) -> u64 {
    let avail = device_len.saturating_sub(DEFAULT_DATA_OFFSET);
    avail - avail % u64::from(sector_size.max(1))
}

fn data_size(seg: &CryptSegment, file_len: u64) -> u64 {
    seg.size.unwrap_or_else(|| {
        let avail = file_len.saturating_sub(seg.offset);
        avail - avail % u64::from(seg.sector_size)
    })
}

impl Volume {
    /// Creates a new volume file at `path`: asks the KMS for a 64-byte data key under the
    /// identity context, writes both header copies with the digest and the token, and sizes
    /// the file sparsely. The file appears at `path` only when complete; an existing file is
    /// never overwritten. Returns the volume opened read-write.
    pub async fn create<K: Kms>(
        path: &Path,
        opts: &CreateOptions,
        kms: &K,
    ) -> Result<Volume, VolumeError> {
        check_create(opts)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(VolumeError::new(
                VolumeErrorKind::NotFound,
                format!(
                    "{}: the directory {} does not exist: create it first",
                    path.display(),
                    dir.display()
                ),
            ));
        }
        if path.exists() {
            return Err(VolumeError::new(
                VolumeErrorKind::AlreadyExists,
                format!(
                    "{} already exists: choose another name or delete it first",
                    path.display()
                ),
            ));
        }
        // A bad context is refused before any file is made or the KMS is asked.
        opts.identity
            .to_context(&opts.context_keys, &opts.extra_context)
            .map_err(|e| invalid(e.to_string()))?;

        // Build the file under a temporary name, then link it into place (link fails if the
        // name exists, so nothing is overwritten) and remove the temporary name.
        let file_name = path
            .file_name()
            .ok_or_else(|| invalid(format!("{} is not a file path", path.display())))?;
        let tmp = dir.join(format!(
            ".{}.creating-{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let made = store::durable::create_locked(&tmp)
            // Messages name the volume's final path, not the temporary one.
            .and_then(|file| FileStore::from_file(file, path))
            .map_err(|e| VolumeError::io(path, "creating the volume file", e));
        let built = match made {
            Ok(store) => Self::create_on(Box::new(store), opts, kms).await,
            Err(e) => Err(e),
        }
        .and_then(|vol| {
            store::durable::link_new(&tmp, path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    VolumeError::new(
                        VolumeErrorKind::AlreadyExists,
                        format!(
                            "{} already exists: choose another name or delete it first",
                            path.display()
                        ),
                    )
                } else {
                    VolumeError::io(path, "linking the new volume into place", e)
                }
            })?;
            Ok(vol)
        });
        if built.is_err() {
            // Never linked: the temporary name goes.
            let _ = std::fs::remove_file(&tmp);
        }
        built
    }

    /// Formats the block device at `path` (a partition or a whole disk) as a new volume,
    /// in place. The device is opened exclusively, so one that is mounted or in use is
    /// refused; so is one that holds something known (a filesystem, a partition table, a LUKS
    /// header, LVM, swap), naming it: nothing is written over data by mistake. `opts.size`
    /// must fit the device less the header area ([`device_data_size`] gives the most).
    pub async fn create_on_device<K: Kms>(
        path: &Path,
        opts: &CreateOptions,
        kms: &K,
    ) -> Result<Volume, VolumeError> {
        check_create(opts)?;
        let store = store::device::open_exclusive(path)
            .map_err(|e| VolumeError::io(path, "opening the device", e))?;
        let head = store::device::head(store.file())
            .map_err(|e| VolumeError::io(path, "reading the start of the device", e))?;
        if let Some(what) = store::device::signature(&head) {
            return Err(VolumeError::new(
                VolumeErrorKind::AlreadyExists,
                format!(
                    "{} holds {what}: nothing was written. If none of it is needed, erase the \
                     signatures with `wipefs -a {}` and create the volume again",
                    path.display(),
                    path.display()
                ),
            ));
        }
        let len = store
            .len()
            .map_err(|e| VolumeError::io(path, "finding the size of the device", e))?;
        let most = device_data_size(len, opts.sector_size);
        if opts.size > most {
            return Err(invalid(format!(
                "{}: a volume of {} bytes does not fit: the device has {len} bytes, which \
                 leaves at most {most} for data after the {DEFAULT_DATA_OFFSET}-byte header \
                 area (leave out the size to use all of it)",
                path.display(),
                opts.size
            )));
        }
        Self::create_on(Box::new(store), opts, kms).await
    }

    /// Formats the empty `store` as a new volume: asks the KMS for a 64-byte data key under
    /// the identity context, writes both header copies with the digest and the token, sizes
    /// the store (sparsely where the engine can) and flushes. Returns the volume opened
    /// read-write.
    pub async fn create_on<K: Kms>(
        store: Box<dyn BackingStore>,
        opts: &CreateOptions,
        kms: &K,
    ) -> Result<Volume, VolumeError> {
        let total = check_create(opts)?;
        let path = store.location().to_path_buf();
        let path = path.as_path();
        let context = opts
            .identity
            .to_context(&opts.context_keys, &opts.extra_context)
            .map_err(|e| invalid(e.to_string()))?;
        let generated = kms
            .generate_data_key(&opts.key_id, &context, XTS_KEY_LEN)
            .await
            .map_err(|e| VolumeError::kms(path, "generate a data key", e))?;
        let key = generated.plaintext;
        let cipher = XtsCipher::new(key.expose()).map_err(|e| {
            VolumeError::new(
                VolumeErrorKind::WrongKey,
                format!(
                    "{}: the KMS returned an unusable data key ({e}); retry",
                    path.display()
                ),
            )
        })?;
        let digest = Pbkdf2Digest::compute(key.expose()).map_err(|e| invalid(e.to_string()))?;
        let mut metadata = Metadata::new_volume(
            DEFAULT_HDR_SIZE,
            DEFAULT_DATA_OFFSET,
            opts.size,
            opts.sector_size,
            &digest,
        )
        .map_err(|e| invalid(e.to_string()))?;
        let token = KmsToken::new(
            kms.backend_name(),
            &generated.key_id,
            &generated.wrapped,
            context,
            opts.context_keys.clone(),
            &opts.identity.volume_id,
            now_rfc3339(),
        );
        metadata
            .set_token(0, token.to_json())
            .map_err(|e| invalid(e.to_string()))?;
        let uuid = luks2::random_uuid().map_err(|e| invalid(e.to_string()))?;
        let template = luks2::new_binary(true, DEFAULT_HDR_SIZE, 1, &uuid)
            .map_err(|e| invalid(e.to_string()))?;
        header::write_headers(&*store, &template, 1, &metadata)?;
        store
            .set_len(total)
            .map_err(|e| VolumeError::io(path, "sizing the volume file", e))?;
        store
            .flush()
            .map_err(|e| VolumeError::io(path, "syncing the volume file", e))?;
        let headers = header::read_headers(&*store)?;
        let segment = headers
            .active
            .metadata
            .crypt_segment()
            .map_err(|e| invalid(e.to_string()))?;
        tracing::info!(volume = %path.display(), key_id = %generated.key_id, size = opts.size, "volume created");
        Ok(Self::assemble(
            store, false, segment, opts.size, cipher, headers,
        ))
    }

    /// Opens a cryptnbd volume: reads the header (falling back to the other copy when one is
    /// damaged), checks the caller's identity against the stored context, unwraps the key
    /// through the KMS with the stored context, and verifies it against the LUKS2 digest.
    pub async fn open<K: Kms>(
        path: &Path,
        opts: &OpenOptions,
        kms: &K,
    ) -> Result<Volume, VolumeError> {
        let store = open_file_store(path, access_for(opts.read_only))?;
        Self::open_store(Box::new(store), opts, kms).await
    }

    /// [`Volume::open`] on any backing store.
    pub async fn open_store<K: Kms>(
        store: Box<dyn BackingStore>,
        opts: &OpenOptions,
        kms: &K,
    ) -> Result<Volume, VolumeError> {
        let headers = header::read_headers(&*store)?;
        let key = unwrap_checked(store.location(), &headers, opts, kms).await?;
        Self::with_key(store, opts.read_only, headers, &key)
    }

    /// Opens a volume with its plaintext volume key (recovery, and volumes cryptsetup made):
    /// no KMS, the key is checked against the LUKS2 digest.
    pub fn open_with_key(path: &Path, key: &[u8], read_only: bool) -> Result<Volume, VolumeError> {
        let store = open_file_store(path, access_for(read_only))?;
        Self::open_store_with_key(Box::new(store), key, read_only)
    }

    /// [`Volume::open_with_key`] on any backing store.
    pub fn open_store_with_key(
        store: Box<dyn BackingStore>,
        key: &[u8],
        read_only: bool,
    ) -> Result<Volume, VolumeError> {
        let headers = header::read_headers(&*store)?;
        let key = DataKey::new(Zeroizing::new(key.to_vec()));
        Self::with_key(store, read_only, headers, &key)
    }

    fn with_key(
        store: Box<dyn BackingStore>,
        read_only: bool,
        headers: HeaderSet,
        key: &DataKey,
    ) -> Result<Volume, VolumeError> {
        let path = store.location();
        let segment = check_key(path, &headers, key)?;
        let cipher = XtsCipher::new(key.expose()).map_err(|e| {
            VolumeError::new(
                VolumeErrorKind::WrongKey,
                format!("{}: unusable volume key ({e})", path.display()),
            )
        })?;
        let file_len = store
            .len()
            .map_err(|e| VolumeError::io(path, "reading the size", e))?;
        let size = data_size(&segment, file_len);
        let needed = segment.offset.saturating_add(size);
        if file_len < needed {
            return Err(VolumeError::new(
                VolumeErrorKind::Corrupt,
                format!(
                    "{} is {file_len} bytes but its header says the data ends at byte {needed}: \
                     the file was truncated; restore it from a backup or snapshot",
                    path.display()
                ),
            ));
        }
        tracing::info!(volume = %path.display(), size, read_only, "volume opened");
        Ok(Self::assemble(
            store, read_only, segment, size, cipher, headers,
        ))
    }

    fn assemble(
        store: Box<dyn BackingStore>,
        read_only: bool,
        segment: CryptSegment,
        size: u64,
        cipher: XtsCipher,
        headers: HeaderSet,
    ) -> Volume {
        Volume {
            path: store.location().to_path_buf(),
            store,
            read_only,
            segment,
            size,
            cipher,
            rmw_locks: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
            failed: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            headers,
            write_gate: std::sync::Arc::default(),
            scratch: ScratchPool::default(),
        }
    }

    /// Data size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Encryption sector size.
    pub fn sector_size(&self) -> u32 {
        self.segment.sector_size
    }

    /// True when opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The backing store (its header area, for token rewrites on an attached volume). Data
    /// written through it bypasses the encryption: only header code uses it.
    pub fn store(&self) -> &dyn BackingStore {
        &*self.store
    }

    /// Waits for the writes in progress, then holds new ones back until the guard is dropped
    /// (reads go on). With [`Volume::flush`] after it, the file is a crash-consistent image
    /// while the guard lives: what snapshots copy.
    pub fn pause_writes(&self) -> crate::Paused<'_> {
        self.write_gate.pause()
    }

    /// The volume file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header copies as read at open.
    pub fn headers(&self) -> &HeaderSet {
        &self.headers
    }

    /// True after a failed flush: the volume refuses all I/O until reopened.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// True once the store reported this host fenced: the volume refuses all I/O for good.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// A store error of `what`, as a volume error; one that says this host was fenced puts
    /// the volume in the fenced state.
    fn store_error(&self, what: &str, e: std::io::Error) -> VolumeError {
        if store::is_fenced(&e) || self.is_fenced() {
            if !self.fenced.swap(true, Ordering::AcqRel) {
                tracing::error!(volume = %self.path.display(), error = %e, "fenced: another host took the volume over");
            }
            return self.fenced_error().with_source(e);
        }
        VolumeError::io(&self.path, what, e)
    }

    fn fenced_error(&self) -> VolumeError {
        VolumeError::new(
            VolumeErrorKind::Fenced,
            format!(
                "{}: this host was fenced: another host took the volume over (attach \
                 --take-over), and the cluster refuses everything this one sends; nothing is \
                 retried. Detach it here; the host that holds it now has every write this \
                 one flushed",
                self.path.display()
            ),
        )
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), VolumeError> {
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        if self.is_failed() {
            return Err(VolumeError::new(
                VolumeErrorKind::Failed,
                format!(
                    "{}: an earlier flush failed, so recent writes may be lost; the volume refuses I/O until it is detached and reattached",
                    self.path.display()
                ),
            ));
        }
        if write && self.read_only {
            return Err(VolumeError::new(
                VolumeErrorKind::ReadOnly,
                format!("{} is open read-only", self.path.display()),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(invalid(format!(
                "{}: range {offset}+{len} is past the end of the volume ({} bytes)",
                self.path.display(),
                self.size
            ))),
        }
    }

    fn ss(&self) -> u64 {
        u64::from(self.segment.sector_size)
    }

    fn iv_of(&self, offset: u64) -> u64 {
        (offset / 512).wrapping_add(self.segment.iv_tweak)
    }

    /// Decrypts sector-aligned ciphertext that was read from data offset `offset`, leaving
    /// all-zero sectors as zeros. Runs of non-zero sectors are decrypted in one call.
    fn decrypt_read(&self, buf: &mut [u8], offset: u64) {
        let ss = self.ss() as usize;
        let mut run_start: Option<usize> = None;
        let sectors = buf.len() / ss;
        for i in 0..=sectors {
            let zero = i == sectors || buf[i * ss..(i + 1) * ss].iter().all(|&b| b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(i),
                (true, Some(s)) => {
                    let at = offset + (s * ss) as u64;
                    self.cipher
                        .decrypt_sectors(&mut buf[s * ss..i * ss], ss, self.iv_of(at));
                    run_start = None;
                }
                _ => {}
            }
        }
    }

    fn read_raw(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        self.store
            .read_at(buf, self.segment.offset + offset)
            .map_err(|e| self.store_error("reading", e))
    }

    fn write_raw(&self, buf: &[u8], offset: u64) -> Result<(), VolumeError> {
        let _ticket = self.write_gate.enter();
        self.store
            .write_at(buf, self.segment.offset + offset)
            .map_err(|e| self.store_error("writing", e))
    }

    /// Reads `buf.len()` bytes at data offset `offset` (any alignment).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        let len = buf.len() as u64;
        self.check(offset, len, false)?;
        let ss = self.ss();
        if offset.is_multiple_of(ss) && len.is_multiple_of(ss) {
            self.read_raw(buf, offset)?;
            self.decrypt_read(buf, offset);
            return Ok(());
        }
        let start = offset - offset % ss;
        let end = (offset + len).div_ceil(ss) * ss;
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_raw(&mut tmp, start)?;
        self.decrypt_read(&mut tmp, start);
        let from = (offset - start) as usize;
        buf.copy_from_slice(&tmp[from..from + buf.len()]);
        Ok(())
    }

    /// Reads whole sectors at data offset `offset` if the store has them in memory (see
    /// [`store::BackingStore::try_read_at`]): `Ok(true)`, decrypted; `Ok(false)` when the
    /// read would wait, or is not sector-aligned, and [`Volume::read_at`] is the way. Never
    /// blocks.
    pub fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool, VolumeError> {
        let len = buf.len() as u64;
        let ss = self.ss();
        if !(offset.is_multiple_of(ss) && len.is_multiple_of(ss)) {
            return Ok(false);
        }
        self.check(offset, len, false)?;
        let read = self
            .store
            .try_read_at(buf, self.segment.offset + offset)
            .map_err(|e| self.store_error("reading", e))?;
        if read {
            self.decrypt_read(buf, offset);
        }
        Ok(read)
    }

    /// Writes `data` at data offset `offset` (any alignment). Partial sectors at either end
    /// are read, merged and rewritten under their sector lock.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let ss = self.ss();
        let start = offset - offset % ss;
        let end = (offset + len).div_ceil(ss) * ss;
        let head_partial = offset != start;
        let tail_partial = offset + len != end;
        let first = start / ss;
        let last = end / ss - 1;
        // Lock the partial sectors' stripes, lower stripe index first, each stripe once.
        let mut stripes: Vec<usize> = Vec::with_capacity(2);
        if head_partial {
            stripes.push((first % RMW_STRIPES as u64) as usize);
        }
        if tail_partial {
            stripes.push((last % RMW_STRIPES as u64) as usize);
        }
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<_> = stripes
            .iter()
            .map(|&s| self.rmw_locks[s].lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let mut buf = vec![0u8; (end - start) as usize];
        let ssz = ss as usize;
        if head_partial {
            self.read_raw(&mut buf[..ssz], start)?;
            self.decrypt_read(&mut buf[..ssz], start);
        }
        if tail_partial && !(head_partial && first == last) {
            let at = buf.len() - ssz;
            self.read_raw(&mut buf[at..], end - ss)?;
            self.decrypt_read(&mut buf[at..], end - ss);
        }
        let from = (offset - start) as usize;
        buf[from..from + data.len()].copy_from_slice(data);
        self.cipher
            .encrypt_sectors(&mut buf, ssz, self.iv_of(start));
        self.write_raw(&buf, start)
    }

    /// Like [`Volume::write_at`], but a sector-aligned range is encrypted in place in `data`
    /// (which is clobbered) and written without a copy: the NBD server's write path.
    pub fn write_at_mut(&self, data: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        let ss = self.ss();
        if !(offset.is_multiple_of(ss) && len.is_multiple_of(ss)) {
            return self.write_at(data, offset);
        }
        self.check(offset, len, true)?;
        self.cipher
            .encrypt_sectors(data, ss as usize, self.iv_of(offset));
        self.write_raw(data, offset)
    }

    /// Allocation of the data range `offset..offset+len` in the store: `(length, allocated)`
    /// runs covering the range (a file: from SEEK_DATA/SEEK_HOLE). Unallocated runs are holes
    /// (they read as zeros through cryptnbd, but not through dm-crypt).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, VolumeError> {
        self.check(offset, len, false)?;
        let map = self
            .store
            .extents(self.segment.offset + offset, len)
            .map_err(|e| VolumeError::io(&self.path, "finding allocated ranges", e))?;
        Ok(map.into_iter().map(|e| (e.len, e.allocated)).collect())
    }

    /// Writes encrypted zeros over the range (never punches holes, so dm-crypt reads zeros).
    /// Whole sectors are encrypted in place in one reused buffer; only partial sectors at the
    /// ends go through read-modify-write.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check(offset, len, true)?;
        let ss = self.ss();
        let mut buf = self.scratch.take();
        let mut done = 0;
        while done < len {
            let at = offset + done;
            // Up to the next sector boundary first, so that the following pieces are aligned.
            let to_boundary = (ss - at % ss) % ss;
            let n = if to_boundary != 0 {
                to_boundary
            } else {
                ZERO_CHUNK
            }
            .min(len - done);
            let piece = &mut buf[..n as usize];
            piece.fill(0);
            self.write_at_mut(piece, at)?;
            done += n;
        }
        Ok(())
    }

    /// Discards the whole sectors inside the range by punching holes: they read as zeros
    /// through cryptnbd (all-zero ciphertext). Partial sectors at the ends are left alone,
    /// as trim is advisory.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check(offset, len, true)?;
        let ss = self.ss();
        let start = offset.div_ceil(ss) * ss;
        let end = (offset + len) / ss * ss;
        if end <= start {
            return Ok(());
        }
        let ticket = self.write_gate.enter();
        let punched = self.store.discard(self.segment.offset + start, end - start);
        drop(ticket);
        match punched {
            Ok(Discarded::Hole) => Ok(()),
            Ok(Discarded::Unsupported) => {
                // No hole punching here: all-zero ciphertext has the same meaning.
                let mut at = start;
                while at < end {
                    let n = (end - at).min(ZEROS.len() as u64);
                    self.write_raw(&ZEROS[..n as usize], at)?;
                    at += n;
                }
                Ok(())
            }
            Err(e) => Err(self.store_error("trimming", e)),
        }
    }

    /// Makes every completed write durable (fdatasync). On failure the volume enters the
    /// failed state: the error is returned now and every later request fails too.
    pub fn flush(&self) -> Result<(), VolumeError> {
        self.check(0, 0, false)?;
        if self.read_only {
            return Ok(());
        }
        self.store.flush().map_err(|e| self.flush_failed(e))
    }

    /// A failed flush: the volume enters the failed state (unless the host was fenced).
    fn flush_failed(&self, e: std::io::Error) -> VolumeError {
        if store::is_fenced(&e) {
            return self.store_error("flushing", e);
        }
        self.failed.store(true, Ordering::Release);
        tracing::error!(volume = %self.path.display(), error = %e, "flush failed; volume marked failed");
        let kind = VolumeError::io(&self.path, "flushing", std::io::Error::from(e.kind())).kind();
        VolumeError::new(
            kind,
            format!(
                "{}: flushing failed, so writes since the last successful flush may be lost; \
                 the volume refuses I/O until it is detached and reattached (then check the \
                 filesystem and the device, and verify the data)",
                self.path.display()
            ),
        )
        .with_source(e)
    }
}

/// The asynchronous data path, for stores that have one ([`store::submit::Submit`]): the
/// request owns its buffer from submission until the future yields it back, and no thread
/// waits for the store meanwhile. Only whole sectors go this way; anything else, or a store
/// without the interface, is refused with the buffer back (`Err`), for the synchronous calls.
impl Volume {
    /// Whether the store has an asynchronous data path.
    pub fn submits(&self) -> bool {
        self.store.submitter().is_some()
    }

    /// The way of a request of `len` bytes at `offset` to the store's asynchronous path:
    /// None when it must take the synchronous calls (not whole sectors, or no such path);
    /// else the path, or why the request is refused (the volume's state, the range).
    fn admit_owned(
        &self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Option<Result<&dyn store::submit::Submit, VolumeError>> {
        let ss = self.ss();
        if !(offset.is_multiple_of(ss) && len.is_multiple_of(ss)) {
            return None;
        }
        let sub = self.store.submitter()?;
        Some(self.check(offset, len, write).map(|()| sub))
    }

    /// Reads `buf.bytes().len()` bytes at data offset `offset` and decrypts them in the
    /// future (on the thread that polls it).
    pub fn read_owned(
        self: &std::sync::Arc<Self>,
        mut buf: Owned,
        offset: u64,
    ) -> Result<impl Future<Output = (Result<(), VolumeError>, Owned)> + Send + 'static, Owned>
    {
        let Some(admitted) = self.admit_owned(offset, buf.bytes().len() as u64, false) else {
            return Err(buf);
        };
        let started = match admitted {
            Ok(sub) => Ok(sub.read_owned(buf, self.segment.offset + offset)),
            Err(e) => Err((e, buf)),
        };
        let this = std::sync::Arc::clone(self);
        Ok(async move {
            let (result, mut buf) = match started {
                Ok(transfer) => transfer.await,
                Err((e, buf)) => return (Err(e), buf),
            };
            match result {
                Ok(()) => {
                    this.decrypt_read(buf.bytes(), offset);
                    (Ok(()), buf)
                }
                Err(e) => (Err(this.store_error("reading", e)), buf),
            }
        })
    }

    /// Encrypts `buf` in place (now, on the calling thread) and writes it at data offset
    /// `offset`. While writes are paused ([`Volume::pause_writes`]) the call waits; the write
    /// then holds the gate until it completes.
    pub fn write_owned(
        self: &std::sync::Arc<Self>,
        mut buf: Owned,
        offset: u64,
    ) -> Result<impl Future<Output = (Result<(), VolumeError>, Owned)> + Send + 'static, Owned>
    {
        let Some(admitted) = self.admit_owned(offset, buf.bytes().len() as u64, true) else {
            return Err(buf);
        };
        let started = match admitted {
            Ok(sub) => {
                let ticket = self.write_gate.enter_owned();
                let ss = self.ss() as usize;
                self.cipher
                    .encrypt_sectors(buf.bytes(), ss, self.iv_of(offset));
                Ok((ticket, sub.write_owned(buf, self.segment.offset + offset)))
            }
            Err(e) => Err((e, buf)),
        };
        let this = std::sync::Arc::clone(self);
        Ok(async move {
            let (ticket, transfer) = match started {
                Ok(t) => t,
                Err((e, buf)) => return (Err(e), buf),
            };
            let (result, buf) = transfer.await;
            drop(ticket);
            (result.map_err(|e| this.store_error("writing", e)), buf)
        })
    }

    /// [`Volume::flush`] without waiting: every write completed before the call is durable
    /// when the future yields `Ok`. Only for a store that [`submits`](Self::submits); on any
    /// other the future fails.
    pub fn flush_owned(
        self: &std::sync::Arc<Self>,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send + 'static {
        let started = match (self.check(0, 0, false), self.store.submitter()) {
            (Ok(()), _) if self.read_only => None,
            (Ok(()), Some(sub)) => Some(Ok(sub.flush_owned())),
            (Ok(()), None) => Some(Err(invalid(format!(
                "{}: its store has no asynchronous data path: flush it with Volume::flush",
                self.path.display()
            )))),
            (Err(e), _) => Some(Err(e)),
        };
        let this = std::sync::Arc::clone(self);
        async move {
            match started {
                None => Ok(()),
                Some(Err(e)) => Err(e),
                Some(Ok(flushing)) => flushing.await.map_err(|e| this.flush_failed(e)),
            }
        }
    }
}

/// Overwrites everything before the data (both header copies and the keyslot area) with
/// zeros and syncs. The data offset comes from the header when it can be read, else the
/// default (16 MiB).
pub fn wipe_header_area(store: &dyn BackingStore) -> Result<(), VolumeError> {
    let path = store.location();
    let data_offset = header::read_headers(store)
        .ok()
        .and_then(|h| h.active.metadata.crypt_segment().ok())
        .map_or(DEFAULT_DATA_OFFSET, |s| s.offset);
    let end = data_offset.min(store.len().unwrap_or(data_offset));
    let mut at = 0;
    while at < end {
        let n = (end - at).min(ZEROS.len() as u64);
        store
            .write_at(&ZEROS[..n as usize], at)
            .map_err(|e| VolumeError::io(path, "wiping the header", e))?;
        at += n;
    }
    store
        .flush()
        .map_err(|e| VolumeError::io(path, "syncing the wiped header", e))
}

/// Checks that `store` holds a LUKS2 volume (a foreign file is refused, untouched), then
/// wipes its header area: what both deletions do before the store goes.
fn wipe_volume(store: &dyn BackingStore) -> Result<(), VolumeError> {
    header::read_headers(store)?;
    wipe_header_area(store)
}

/// Deletes a volume file for good: takes the exclusive lock (refusing a volume in use),
/// checks that it is a LUKS2 volume, overwrites both header copies and the keyslot area
/// (everything before the data segment) with zeros, syncs, then removes the file and syncs
/// the directory. Without the header the data is unreadable, even with the KMS.
pub fn wipe_and_remove(path: &Path) -> Result<(), VolumeError> {
    wipe_volume(&open_file_store(path, Access::ReadWrite)?)?;
    std::fs::remove_file(path).map_err(|e| VolumeError::io(path, "removing the volume file", e))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = store::durable::sync_dir(dir);
    }
    tracing::info!(volume = %path.display(), "volume wiped and removed");
    Ok(())
}
