//! The embedded local KMS: master keys in a keystore directory on this machine, so cryptnbd runs
//! with no cloud account.
//!
//! **Losing the keystore loses every volume.** Each volume's data key is wrapped by a master key
//! that exists only in the keystore: without it (or without its passphrase, when sealed) the
//! volumes cannot be decrypted by anyone. Keep a [`LocalKms::backup`] somewhere else.
//!
//! The semantics follow AWS KMS strictly (unlike moto): a disabled key or a key pending deletion
//! refuses every cryptographic operation, a blob made by another key than the one the caller
//! expects is `WrongKey`, and a blob only unwraps under exactly the context it was made with.
//!
//! # Wrapped data key ("blob") layout, version 1
//!
//! All integers big-endian. `L` is the length of the key id (36 for the UUIDs made here).
//!
//! | offset   | size  | field                                                          |
//! |----------|-------|----------------------------------------------------------------|
//! | 0        | 4     | magic `0x434e4b57` ("CNKW": cryptnbd key wrap)                 |
//! | 4        | 1     | format version, `0x01`                                         |
//! | 5        | 1     | `L`, length of the master key id, 1..=255                      |
//! | 6        | L     | master key id, printable ASCII                                 |
//! | 6+L      | 4     | master key version (1 = the key as created, +1 per rotation)   |
//! | 10+L     | 12    | AES-GCM nonce, random                                          |
//! | 22+L     | n     | ciphertext of the `n`-byte data key (`n` in 1..=1024)          |
//! | 22+L+n   | 16    | AES-GCM tag                                                    |
//!
//! The cipher is AES-256-GCM under the named version of the master key. Its additional
//! authenticated data is the header (bytes `0..22+L`) followed by
//! [`EncryptionContext::canonical_bytes`], so a changed header byte or context pair fails
//! authentication.
//!
//! # Passphrase envelope layout, version 1
//!
//! Used for a sealed keystore (magic "CNKS") and for backups (magic "CNKB"):
//!
//! | offset | size | field                                                              |
//! |--------|------|--------------------------------------------------------------------|
//! | 0      | 4    | magic `0x434e4b53` ("CNKS") or `0x434e4b42` ("CNKB")               |
//! | 4      | 1    | format version, `0x01`                                             |
//! | 5      | 1    | KDF, `0x01` = argon2id version 0x13                                |
//! | 6      | 4    | argon2 memory cost in KiB                                          |
//! | 10     | 4    | argon2 time cost (passes)                                          |
//! | 14     | 4    | argon2 parallelism                                                 |
//! | 18     | 16   | argon2 salt, random                                                |
//! | 34     | 12   | AES-GCM nonce, random                                              |
//! | 46     | n+16 | AES-256-GCM ciphertext and tag of the key list (JSON), AAD = bytes 0..46 |
//!
//! The AES key (the KEK) is argon2id(passphrase, salt) with the parameters in the header.
//!
//! # Keystore directory layout
//!
//! ```text
//! DIR/                 0700, refused if group or other have any access
//!   .lock              0600, empty; flock'ed shared by reads, exclusive by mutations
//!   keystore.json      0600; {"format": 1, "keys": [KEY...]} when unsealed,
//!                      {"format": 1, "sealed": "<base64 CNKS envelope of {"keys": [KEY...]}>"}
//!                      when sealed with a passphrase
//! KEY = {"key_id", "aliases", "description", "state", "created", "deletion_date",
//!        "versions": [{"version", "created", "material": "<base64 of 32 bytes>"}]}
//! ```
//!
//! Every mutation takes the exclusive lock, re-reads the keystore, changes it and replaces the
//! file atomically (temporary file, fsync, rename, fsync of the directory), so an offline CLI and
//! a running daemon can share a keystore. Nothing is cached between calls except the KEK of a
//! sealed keystore.
//!
//! A purged key is removed from the keystore file; earlier copies of the file may survive in
//! free blocks of the disk until they are reused, so seal the keystore or put it on an encrypted
//! filesystem if that matters.
//!
//! The methods do small synchronous file I/O (and, the first time a sealed keystore is read, an
//! argon2 derivation); they never wait on anything but the keystore lock, which mutations hold
//! only for a few milliseconds.

use std::borrow::Cow;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};
use zeroize::Zeroizing;

use crate::{
    CallObserver, DataKey, EncryptionContext, GeneratedKey, KeyMetadata, KeyState, Kms, KmsCall,
    KmsError, KmsErrorKind, WrappedKey,
};

/// Backend name stored in volume tokens and in [`KeyMetadata::backend`].
pub const BACKEND_NAME: &str = "local";

/// Largest data key `generate_data_key` makes, as AWS KMS `NumberOfBytes`.
pub const MAX_DATA_KEY_LEN: usize = 1024;

/// Shortest and longest deletion windows, in days, as AWS KMS `PendingWindowInDays`.
pub const DELETION_WINDOW_DAYS: std::ops::RangeInclusive<u32> = 7..=30;

const BLOB_MAGIC: [u8; 4] = *b"CNKW"; // 0x434e4b57
const BLOB_VERSION: u8 = 0x01;
const SEALED_MAGIC: [u8; 4] = *b"CNKS"; // 0x434e4b53
const BACKUP_MAGIC: [u8; 4] = *b"CNKB"; // 0x434e4b42
const ENVELOPE_VERSION: u8 = 0x01;
const KDF_ARGON2ID: u8 = 0x01;
const SALT_LEN: usize = 16;
const ENVELOPE_HEADER_LEN: usize = 4 + 1 + 1 + 4 + 4 + 4 + SALT_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;
const MASTER_KEY_LEN: usize = 32;
const KEYSTORE_FILE: &str = "keystore.json";
const LOCK_FILE: &str = ".lock";
const KEYSTORE_FORMAT: u32 = 1;
/// A keystore or backup larger than this is refused rather than read into memory.
const MAX_FILE_LEN: u64 = 64 << 20;
const ALIAS_PREFIX: &str = "alias/";
const MAX_ALIAS_LEN: usize = 256;
const MAX_DESCRIPTION_LEN: usize = 8192;

/// The time source of a [`LocalKms`]; tests inject one to move past deletion dates.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// argon2id cost parameters for deriving a key from a passphrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub m_cost_kib: u32,
    /// Number of passes.
    pub t_cost: u32,
    /// Degree of parallelism.
    pub p_cost: u32,
}

impl KdfParams {
    /// The default: 64 MiB, 3 passes, 1 lane (RFC 9106's second recommended option, one lane).
    pub const STRONG: Self = Self {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };

    /// The cheapest parameters argon2 accepts. Only for tests: they protect nothing.
    pub const INSECURE_FAST: Self = Self {
        m_cost_kib: 8,
        t_cost: 1,
        p_cost: 1,
    };

    /// Upper bounds accepted from a file, so a hostile header cannot exhaust memory or time.
    const MAX: Self = Self {
        m_cost_kib: 2 * 1024 * 1024,
        t_cost: 64,
        p_cost: 64,
    };

    fn to_argon2(self) -> Result<argon2::Params, KmsError> {
        let in_bounds = self.m_cost_kib <= Self::MAX.m_cost_kib
            && self.t_cost <= Self::MAX.t_cost
            && self.p_cost <= Self::MAX.p_cost;
        argon2::Params::new(
            self.m_cost_kib,
            self.t_cost,
            self.p_cost,
            Some(MASTER_KEY_LEN),
        )
        .ok()
        .filter(|_| in_bounds)
        .ok_or_else(|| {
            KmsError::new(
                KmsErrorKind::InvalidRequest,
                format!(
                    "argon2 parameters {self:?} are out of range: use at least 8 KiB per lane, \
                         1 to {} passes, 1 to {} lanes and at most {} KiB",
                    Self::MAX.t_cost,
                    Self::MAX.p_cost,
                    Self::MAX.m_cost_kib
                ),
            )
        })
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::STRONG
    }
}

/// How [`LocalKms::open`] opens a keystore.
#[derive(Clone)]
pub struct LocalKmsOptions {
    /// Create the directory (0700) and an empty keystore if there is none. Off by default so a
    /// mistyped path is an error rather than a new, empty keystore.
    pub create_if_missing: bool,
    /// The passphrase of a sealed keystore; a keystore created with one is created sealed.
    pub passphrase: Option<Zeroizing<Vec<u8>>>,
    /// The time source (deletion dates, creation times).
    pub clock: Clock,
    /// argon2id costs used when sealing the keystore or writing a backup.
    pub kdf: KdfParams,
}

impl Default for LocalKmsOptions {
    fn default() -> Self {
        Self {
            create_if_missing: false,
            passphrase: None,
            clock: Arc::new(OffsetDateTime::now_utc),
            kdf: KdfParams::default(),
        }
    }
}

impl fmt::Debug for LocalKmsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKmsOptions")
            .field("create_if_missing", &self.create_if_missing)
            .field("passphrase", &self.passphrase.as_ref().map(|_| "redacted"))
            .field("kdf", &self.kdf)
            .finish_non_exhaustive()
    }
}

/// The embedded local KMS over one keystore directory. See the module documentation.
pub struct LocalKms {
    dir: PathBuf,
    clock: Clock,
    kdf: KdfParams,
    /// The passphrase and derived KEK of a sealed keystore. `passphrase.is_some()` means the
    /// keystore is expected to be sealed: an unsealed file is then refused (downgrade).
    unlock: Mutex<Unlock>,
    /// Told of every KMS operation ([`LocalKms::with_observer`]).
    observer: Option<CallObserver>,
}

#[derive(Default)]
struct Unlock {
    passphrase: Option<Zeroizing<Vec<u8>>>,
    kek: Option<Kek>,
}

/// A KEK with the parameters and salt it was derived with.
#[derive(Clone)]
struct Kek {
    params: KdfParams,
    salt: [u8; SALT_LEN],
    key: Zeroizing<[u8; MASTER_KEY_LEN]>,
}

impl fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKms")
            .field("dir", &self.dir)
            .field("sealed", &self.unlock().passphrase.is_some())
            .finish_non_exhaustive()
    }
}

impl LocalKms {
    /// Reports every KMS operation (GenerateDataKey, Decrypt, ReEncrypt, DescribeKey: the
    /// operation, the key, the outcome, the time it took) to `observer`, as the AWS backend
    /// does. The daemon's metrics count them.
    pub fn with_observer(mut self, observer: CallObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Runs operation `operation` on key `key_id` and reports it to the observer.
    fn observed<T>(
        &self,
        operation: &'static str,
        key_id: &str,
        context: Option<&EncryptionContext>,
        call: impl FnOnce() -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let Some(observer) = &self.observer else {
            return call();
        };
        let started = std::time::Instant::now();
        let result = call();
        observer(&KmsCall {
            operation,
            key_id: key_id.to_owned(),
            context: context.cloned(),
            request_id: None,
            outcome: result.as_ref().map(|_| ()).map_err(ToString::to_string),
            latency: started.elapsed(),
        });
        result
    }

    /// Opens (or with `create_if_missing`, creates) the keystore in `dir`.
    ///
    /// Fails with `Keystore` when the directory or a file in it is accessible by group or others,
    /// is missing, or is damaged; with `AccessDenied` when the keystore is sealed and the
    /// passphrase is missing or wrong.
    pub fn open(dir: &Path, options: LocalKmsOptions) -> Result<Self, KmsError> {
        options.kdf.to_argon2()?;
        if let Some(p) = &options.passphrase {
            check_passphrase(p)?;
        }
        let missing = |p: &Path| -> Result<bool, KmsError> {
            Ok(!p.try_exists().map_err(io_error("look for", p))?)
        };
        if options.create_if_missing && missing(dir)? {
            store::durable::create_private_dir(dir)
                .map_err(io_error("create the keystore directory", dir))?;
        }
        let kms = Self {
            dir: dir.to_path_buf(),
            clock: options.clock,
            kdf: options.kdf,
            unlock: Mutex::new(Unlock {
                passphrase: options.passphrase,
                kek: None,
            }),
            observer: None,
        };
        let file = kms.keystore_path();
        if missing(&file)? {
            if !options.create_if_missing {
                return Err(KmsError::new(
                    KmsErrorKind::Keystore,
                    format!(
                        "there is no keystore in {}: give the directory of an existing \
                         keystore, or create one there first",
                        dir.display()
                    ),
                ));
            }
            // Checks the directory's permissions, and settles a race with another creator.
            let _lock = kms.lock(true)?;
            if missing(&file)? {
                kms.save(&KeyList::default())?;
                tracing::info!(dir = %dir.display(), sealed = kms.is_sealed(), "created a local KMS keystore");
            }
        }
        // Checks the permissions and the passphrase, and purges keys past their deletion date.
        kms.read(|_| Ok(()))?;
        Ok(kms)
    }

    /// Restores the backup `from` (made by [`LocalKms::backup`] with `passphrase`) into the
    /// keystore in `dir`, which is created if needed and must hold no key. `options` apply to
    /// the new keystore (give a passphrase to have it sealed).
    pub fn restore(
        dir: &Path,
        from: &Path,
        passphrase: &[u8],
        options: LocalKmsOptions,
    ) -> Result<Self, KmsError> {
        check_passphrase(passphrase)?;
        // The backup is encrypted: unlike the keystore, it may have been copied with any mode.
        let bytes = read_file(from, false)?;
        let not_backup = || {
            KmsError::new(
                KmsErrorKind::InvalidRequest,
                format!(
                    "{} is not a cryptnbd local KMS backup (or is damaged): give the file \
                     `backup` wrote",
                    from.display()
                ),
            )
        };
        let header = EnvelopeHeader::parse(&BACKUP_MAGIC, &bytes).ok_or_else(not_backup)?;
        let kek = derive_kek(passphrase, header.params, header.salt)?;
        let plaintext = open_envelope(&kek, &bytes).ok_or_else(|| {
            KmsError::new(
                KmsErrorKind::AccessDenied,
                format!(
                    "the backup {} could not be decrypted: the passphrase is wrong or the file \
                     is damaged; give the passphrase the backup was made with",
                    from.display()
                ),
            )
        })?;
        let restored = KeyList::from_json(&plaintext).map_err(|_| not_backup())?;
        let count = restored.keys.len();
        let kms = Self::open(
            dir,
            LocalKmsOptions {
                create_if_missing: true,
                ..options
            },
        )?;
        kms.mutate(|list, _| {
            if !list.keys.is_empty() {
                return Err(KmsError::new(
                    KmsErrorKind::InvalidRequest,
                    format!(
                        "the keystore in {} already holds {} keys and a restore never \
                         overwrites keys: restore into a new, empty directory",
                        dir.display(),
                        list.keys.len()
                    ),
                ));
            }
            list.keys = restored.keys;
            Ok(())
        })?;
        tracing::info!(dir = %dir.display(), from = %from.display(), keys = count, "restored a local KMS keystore");
        Ok(kms)
    }

    /// The keystore directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the keystore is sealed with a passphrase.
    pub fn is_sealed(&self) -> bool {
        self.unlock().passphrase.is_some()
    }

    /// Creates a master key (state `Enabled`, version 1), optionally with an alias, given as
    /// `alias/NAME` or `NAME` (stored as `alias/NAME` either way).
    pub fn create_key(
        &self,
        alias: Option<&str>,
        description: &str,
    ) -> Result<KeyMetadata, KmsError> {
        let alias = alias.map(normalize_alias).transpose()?;
        if description.len() > MAX_DESCRIPTION_LEN {
            return Err(KmsError::new(
                KmsErrorKind::InvalidRequest,
                format!("the description is too long: use at most {MAX_DESCRIPTION_LEN} bytes"),
            ));
        }
        let key_id = new_key_id()?;
        let material = new_material()?;
        let meta = self.mutate(|list, now| {
            if let Some(alias) = &alias
                && list
                    .keys
                    .iter()
                    .any(|k| k.aliases.iter().any(|a| a == alias))
            {
                return Err(KmsError::new(
                    KmsErrorKind::InvalidRequest,
                    format!("the alias {alias} already names a key: choose another alias"),
                ));
            }
            let created = rfc3339(now)?;
            let record = KeyRecord {
                key_id,
                aliases: alias.into_iter().collect(),
                description: description.to_owned(),
                state: KeyState::Enabled,
                created: created.clone(),
                deletion_date: None,
                versions: vec![KeyVersion {
                    version: 1,
                    created,
                    material,
                }],
            };
            let meta = record.metadata();
            list.keys.push(record);
            Ok(meta)
        })?;
        tracing::info!(key_id = %meta.key_id, "created a master key");
        Ok(meta)
    }

    /// Every key not yet purged, in creation order.
    pub fn list_keys(&self) -> Result<Vec<KeyMetadata>, KmsError> {
        self.read(|list| Ok(list.keys.iter().map(KeyRecord::metadata).collect()))
    }

    /// DescribeKey: `key_id` is a key id or `alias/NAME` (ARNs are refused: local keys have
    /// none).
    pub fn describe(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        self.read(|list| Ok(list.get(key_id)?.metadata()))
    }

    /// EnableKey. A key pending deletion must first have its deletion cancelled.
    pub fn enable_key(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        self.update(key_id, "enabled a master key", |key, _| {
            key.refuse_if_pending()?;
            key.state = KeyState::Enabled;
            Ok(())
        })
    }

    /// DisableKey: the key refuses every cryptographic operation until enabled again.
    pub fn disable_key(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        self.update(key_id, "disabled a master key", |key, _| {
            key.refuse_if_pending()?;
            key.state = KeyState::Disabled;
            Ok(())
        })
    }

    /// ScheduleKeyDeletion: after `pending_window_days` (7 to 30) the key and every version of
    /// its material are purged, and every volume wrapped by it is lost for good.
    pub fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyMetadata, KmsError> {
        if !DELETION_WINDOW_DAYS.contains(&pending_window_days) {
            return Err(KmsError::new(
                KmsErrorKind::InvalidRequest,
                format!(
                    "a deletion window of {pending_window_days} days is not allowed: give {} to {} days",
                    DELETION_WINDOW_DAYS.start(),
                    DELETION_WINDOW_DAYS.end()
                ),
            ));
        }
        self.update(key_id, "scheduled a master key for deletion", |key, now| {
            key.refuse_if_pending()?;
            key.deletion_date = Some(rfc3339(now + Duration::days(pending_window_days.into()))?);
            key.state = KeyState::PendingDeletion;
            Ok(())
        })
    }

    /// CancelKeyDeletion: the key goes back to `Disabled` (as in AWS KMS); enable it to use it.
    pub fn cancel_key_deletion(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        self.update(
            key_id,
            "cancelled the deletion of a master key",
            |key, _| {
                if key.state != KeyState::PendingDeletion {
                    return Err(KmsError::new(
                        KmsErrorKind::InvalidRequest,
                        format!(
                            "key {} is not pending deletion: there is nothing to cancel",
                            key.key_id
                        ),
                    ));
                }
                key.state = KeyState::Disabled;
                key.deletion_date = None;
                Ok(())
            },
        )
    }

    /// RotateKeyOnDemand: adds a new version of the key material. New data keys are wrapped by
    /// the newest version; blobs made by older versions still decrypt.
    pub fn rotate_key(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        let material = new_material()?;
        self.update(key_id, "rotated a master key", |key, now| {
            key.check_usable()?;
            let version = key.newest()?.version.checked_add(1).ok_or_else(|| {
                KmsError::new(
                    KmsErrorKind::InvalidRequest,
                    format!(
                        "key {} cannot be rotated any more: create a new key",
                        key.key_id
                    ),
                )
            })?;
            key.versions.push(KeyVersion {
                version,
                created: rfc3339(now)?,
                material,
            });
            Ok(())
        })
    }

    /// Seals the keystore with `passphrase` (argon2id KEK, AES-256-GCM), or changes the
    /// passphrase of a sealed keystore. From then on, opening it needs the passphrase.
    pub fn seal(&self, passphrase: &[u8]) -> Result<(), KmsError> {
        check_passphrase(passphrase)?;
        let _lock = self.lock(true)?;
        let list = self.load()?;
        let new = Unlock {
            passphrase: Some(Zeroizing::new(passphrase.to_vec())),
            kek: None,
        };
        let old = std::mem::replace(&mut *self.unlock(), new);
        if let Err(e) = self.save(&list) {
            *self.unlock() = old;
            return Err(e);
        }
        tracing::info!(dir = %self.dir.display(), "sealed the local KMS keystore with a passphrase");
        Ok(())
    }

    /// Writes an encrypted backup of every key to `to` (a new file, 0600, written atomically;
    /// an existing file is never overwritten). Restore it with [`LocalKms::restore`].
    pub fn backup(&self, to: &Path, passphrase: &[u8]) -> Result<(), KmsError> {
        check_passphrase(passphrase)?;
        let (plaintext, count) = self.read(|list| Ok((list.to_json()?, list.keys.len())))?;
        let kek = derive_kek(passphrase, self.kdf, random_array()?)?;
        let envelope = seal_envelope(&BACKUP_MAGIC, &kek, &plaintext)?;
        write_atomic(to, &envelope, false).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                KmsError::new(
                    KmsErrorKind::InvalidRequest,
                    format!(
                        "{} already exists and a backup never overwrites a file: choose a new \
                         file name or remove the old file first",
                        to.display()
                    ),
                )
            } else {
                io_error("write the backup", to)(e)
            }
        })?;
        tracing::info!(to = %to.display(), keys = count, "wrote a local KMS keystore backup");
        Ok(())
    }

    fn keystore_path(&self) -> PathBuf {
        self.dir.join(KEYSTORE_FILE)
    }

    fn now(&self) -> OffsetDateTime {
        (self.clock)()
    }

    fn unlock(&self) -> MutexGuard<'_, Unlock> {
        // The guarded data stays consistent even if a holder panicked: every write replaces it whole.
        self.unlock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the keystore lock (released when the returned file is dropped). A fresh file
    /// descriptor per call: flock locks belong to the open file, so sharing one would let two
    /// threads of this process both hold the exclusive lock.
    fn lock(&self, exclusive: bool) -> Result<File, KmsError> {
        check_private(
            &self.dir,
            &fs::metadata(&self.dir).map_err(io_error("open the keystore directory", &self.dir))?,
        )?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("open the keystore lock file", &path))?;
        check_private(&path, &file.metadata().map_err(io_error("inspect", &path))?)?;
        let locked = if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        };
        locked.map_err(io_error("lock", &path))?;
        Ok(file)
    }

    /// Reads the keystore under the shared lock and runs `f` on it. Keys past their deletion
    /// date are invisible to `f`, then purged on disk under the exclusive lock.
    fn read<T>(&self, f: impl FnOnce(&KeyList) -> Result<T, KmsError>) -> Result<T, KmsError> {
        let (out, expired) = {
            let _lock = self.lock(false)?;
            let mut list = self.load()?;
            let expired = !list.purge_expired(self.now())?.is_empty();
            (f(&list), expired)
        };
        if expired {
            self.mutate(|_, _| Ok(()))?;
        }
        out
    }

    /// Re-reads the keystore under the exclusive lock, purges keys past their deletion date,
    /// runs `f` and writes the result. `f` must check everything before it changes anything.
    fn mutate<T>(
        &self,
        f: impl FnOnce(&mut KeyList, OffsetDateTime) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let _lock = self.lock(true)?;
        let mut list = self.load()?;
        let now = self.now();
        let purged = list.purge_expired(now)?;
        let out = f(&mut list, now);
        if out.is_ok() || !purged.is_empty() {
            self.save(&list)?;
        }
        for key_id in purged {
            tracing::info!(%key_id, "purged a master key at the end of its deletion window");
        }
        out
    }

    /// Changes one key with `f` and logs `event`.
    fn update(
        &self,
        key_id: &str,
        event: &str,
        f: impl FnOnce(&mut KeyRecord, OffsetDateTime) -> Result<(), KmsError>,
    ) -> Result<KeyMetadata, KmsError> {
        let meta = self.mutate(|list, now| {
            let key = list.get_mut(key_id)?;
            f(key, now)?;
            Ok(key.metadata())
        })?;
        tracing::info!(key_id = %meta.key_id, state = ?meta.state, "{event}");
        Ok(meta)
    }

    /// Reads and checks the keystore file. The caller holds the lock.
    fn load(&self) -> Result<KeyList, KmsError> {
        let path = self.keystore_path();
        let bytes = read_file(&path, true)?;
        let damaged = |detail: &str| {
            KmsError::new(
                KmsErrorKind::Keystore,
                format!(
                    "the keystore {} is damaged ({detail}): restore it from a backup",
                    path.display()
                ),
            )
        };
        let file: KeystoreFile<'_> =
            serde_json::from_slice(&bytes).map_err(|_| damaged("not valid keystore JSON"))?;
        if file.format != KEYSTORE_FORMAT {
            return Err(KmsError::new(
                KmsErrorKind::Keystore,
                format!(
                    "the keystore {} has format {}, which this cryptnbd does not know: use the \
                     cryptnbd version that wrote it",
                    path.display(),
                    file.format
                ),
            ));
        }
        let sealed = self.is_sealed();
        let list = match (file.keys, file.sealed) {
            (Some(keys), None) if !sealed => KeyList {
                keys: keys.into_owned(),
            }
            .validated()
            .map_err(|e| damaged(&e))?,
            (Some(_), None) => {
                return Err(KmsError::new(
                    KmsErrorKind::Keystore,
                    format!(
                        "the keystore {} is not sealed, but a passphrase was given: if you did \
                         not unseal it, it may have been replaced; check it, or open it without \
                         a passphrase",
                        path.display()
                    ),
                ));
            }
            (None, Some(envelope)) => {
                let envelope = BASE64
                    .decode(envelope)
                    .map_err(|_| damaged("the sealed keys are not base64"))?;
                let plaintext = self.unseal(&envelope, &path)?;
                KeyList::from_json(&plaintext).map_err(|e| damaged(&e))?
            }
            _ => {
                return Err(damaged(
                    "it must hold exactly one of \"keys\" and \"sealed\"",
                ));
            }
        };
        Ok(list)
    }

    /// Decrypts the envelope of a sealed keystore, deriving (and caching) the KEK.
    fn unseal(&self, envelope: &[u8], path: &Path) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let header = EnvelopeHeader::parse(&SEALED_MAGIC, envelope).ok_or_else(|| {
            KmsError::new(
                KmsErrorKind::Keystore,
                format!(
                    "the keystore {} is damaged (bad sealed header): restore it from a backup",
                    path.display()
                ),
            )
        })?;
        let mut unlock = self.unlock();
        let cached = unlock
            .kek
            .as_ref()
            .filter(|k| k.params == header.params && k.salt == header.salt);
        let kek = match cached {
            Some(kek) => kek.clone(),
            None => {
                let passphrase = unlock.passphrase.as_ref().ok_or_else(|| {
                    KmsError::new(
                        KmsErrorKind::AccessDenied,
                        format!(
                            "the keystore {} is sealed: give the keystore passphrase",
                            path.display()
                        ),
                    )
                })?;
                derive_kek(passphrase, header.params, header.salt)?
            }
        };
        let plaintext = open_envelope(&kek, envelope).ok_or_else(|| {
            KmsError::new(
                KmsErrorKind::AccessDenied,
                format!(
                    "the keystore {} could not be unsealed: the passphrase is wrong (or the file \
                     is damaged); give the keystore passphrase",
                    path.display()
                ),
            )
        })?;
        unlock.kek = Some(kek);
        Ok(plaintext)
    }

    /// Writes the keystore file atomically, sealed if the keystore is. The caller holds the
    /// exclusive lock.
    fn save(&self, list: &KeyList) -> Result<(), KmsError> {
        let sealing_kek = {
            let mut unlock = self.unlock();
            match (&unlock.passphrase, &unlock.kek) {
                (None, _) => None,
                (Some(_), Some(kek)) => Some(kek.clone()),
                (Some(passphrase), None) => {
                    let kek = derive_kek(passphrase, self.kdf, random_array()?)?;
                    unlock.kek = Some(kek.clone());
                    Some(kek)
                }
            }
        };
        let file = match sealing_kek {
            None => KeystoreFile {
                format: KEYSTORE_FORMAT,
                keys: Some(Cow::Borrowed(&list.keys)),
                sealed: None,
            },
            Some(kek) => {
                let envelope = seal_envelope(&SEALED_MAGIC, &kek, &list.to_json()?)?;
                KeystoreFile {
                    format: KEYSTORE_FORMAT,
                    keys: None,
                    sealed: Some(BASE64.encode(envelope)),
                }
            }
        };
        let bytes = to_secret_json(&file)?;
        let path = self.keystore_path();
        write_atomic(&path, &bytes, true).map_err(io_error("write the keystore", &path))
    }
}

impl Kms for LocalKms {
    fn backend_name(&self) -> &'static str {
        BACKEND_NAME
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        len: usize,
    ) -> Result<GeneratedKey, KmsError> {
        if !(1..=MAX_DATA_KEY_LEN).contains(&len) {
            return Err(KmsError::new(
                KmsErrorKind::InvalidRequest,
                format!(
                    "a data key of {len} bytes cannot be generated: ask for 1 to {MAX_DATA_KEY_LEN} bytes"
                ),
            ));
        }
        self.observed("GenerateDataKey", key_id, Some(context), || {
            self.read(|list| {
                let key = list.get(key_id)?;
                key.check_usable()?;
                let mut plaintext = Zeroizing::new(vec![0u8; len]);
                random_fill(&mut plaintext)?;
                let wrapped = key.wrap(context, &plaintext)?;
                Ok(GeneratedKey {
                    plaintext: DataKey::new(plaintext),
                    wrapped,
                    key_id: key.key_id.clone(),
                })
            })
        })
    }

    async fn decrypt(
        &self,
        wrapped: &[u8],
        context: &EncryptionContext,
        expected_key_id: &str,
    ) -> Result<DataKey, KmsError> {
        self.observed("Decrypt", expected_key_id, Some(context), || {
            self.read(|list| list.unwrap(wrapped, context, expected_key_id))
                .map(DataKey::new)
        })
    }

    async fn re_encrypt(
        &self,
        wrapped: &[u8],
        context: &EncryptionContext,
        key_id: &str,
        new_key_id: &str,
        new_context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.observed("ReEncrypt", key_id, Some(context), || {
            self.read(|list| {
                let plaintext = list.unwrap(wrapped, context, key_id)?;
                let new_key = list.get(new_key_id)?;
                new_key.check_usable()?;
                Ok(WrappedKey {
                    wrapped: new_key.wrap(new_context, &plaintext)?,
                    key_id: new_key.key_id.clone(),
                })
            })
        })
    }

    async fn describe_key(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        self.observed("DescribeKey", key_id, None, || self.describe(key_id))
    }
}

/// The keystore file. `keys` when unsealed, `sealed` (a base64 envelope of a [`KeyList`]) when
/// sealed.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeystoreFile<'a> {
    format: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keys: Option<Cow<'a, [KeyRecord]>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
}

/// Every master key: the keystore's content, and the plaintext of sealed envelopes and backups.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyList {
    keys: Vec<KeyRecord>,
}

/// One master key with every version of its material.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    key_id: String,
    aliases: Vec<String>,
    description: String,
    state: KeyState,
    /// RFC 3339, UTC.
    created: String,
    /// RFC 3339, UTC; set exactly when the state is `PendingDeletion`.
    deletion_date: Option<String>,
    /// Oldest first; never empty.
    versions: Vec<KeyVersion>,
}

/// One version of a master key's material.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyVersion {
    version: u32,
    created: String,
    #[serde(with = "secret_base64")]
    material: Zeroizing<Vec<u8>>,
}

impl KeyList {
    fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let list: Self =
            serde_json::from_slice(bytes).map_err(|_| "not a valid key list".to_owned())?;
        list.validated()
    }

    fn to_json(&self) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        to_secret_json(self)
    }

    /// Checks what the rest of the code relies on; the error says what is wrong.
    fn validated(self) -> Result<Self, String> {
        let mut ids = std::collections::BTreeSet::new();
        let mut aliases = std::collections::BTreeSet::new();
        for key in &self.keys {
            if !ids.insert(key.key_id.as_str())
                || validate_blob_key_id(key.key_id.as_bytes()).is_none()
            {
                return Err(format!("key id {:?} is repeated or invalid", key.key_id));
            }
            for alias in &key.aliases {
                if !aliases.insert(alias.as_str()) || validate_alias(alias).is_err() {
                    return Err(format!("alias {alias:?} is repeated or invalid"));
                }
            }
            let pending = key.state == KeyState::PendingDeletion;
            let date_ok = match &key.deletion_date {
                Some(d) => pending && OffsetDateTime::parse(d, &Rfc3339).is_ok(),
                None => !pending,
            };
            if !date_ok {
                return Err(format!(
                    "key {} has an inconsistent deletion date",
                    key.key_id
                ));
            }
            let versions_ok = !key.versions.is_empty()
                && key.versions.windows(2).all(|w| w[0].version < w[1].version)
                && key
                    .versions
                    .iter()
                    .all(|v| v.material.len() == MASTER_KEY_LEN);
            if !versions_ok {
                return Err(format!("key {} has invalid versions", key.key_id));
            }
        }
        Ok(self)
    }

    /// Removes the keys whose deletion date has passed; returns their ids.
    fn purge_expired(&mut self, now: OffsetDateTime) -> Result<Vec<String>, KmsError> {
        let mut purged = Vec::new();
        let mut kept = Vec::with_capacity(self.keys.len());
        for key in std::mem::take(&mut self.keys) {
            if key.deletion_due(now)? {
                // Dropping the record zeroizes its material.
                purged.push(key.key_id);
            } else {
                kept.push(key);
            }
        }
        self.keys = kept;
        Ok(purged)
    }

    /// Finds a key by id or `alias/NAME`.
    fn position(&self, key_ref: &str) -> Result<usize, KmsError> {
        if key_ref.is_empty() || key_ref.starts_with("arn:") {
            return Err(KmsError::new(
                KmsErrorKind::InvalidRequest,
                format!(
                    "{key_ref:?} does not name a local key: give a key id or alias/NAME (local \
                     keys have no ARN)"
                ),
            ));
        }
        let found = if key_ref.starts_with(ALIAS_PREFIX) {
            self.keys
                .iter()
                .position(|k| k.aliases.iter().any(|a| a == key_ref))
        } else {
            self.keys.iter().position(|k| k.key_id == key_ref)
        };
        found.ok_or_else(|| {
            KmsError::new(
                KmsErrorKind::KeyNotFound,
                format!(
                    "there is no key {key_ref} in the local keystore: check the key id or alias \
                     (list the keys to see them)"
                ),
            )
        })
    }

    fn get(&self, key_ref: &str) -> Result<&KeyRecord, KmsError> {
        let i = self.position(key_ref)?;
        Ok(&self.keys[i])
    }

    fn get_mut(&mut self, key_ref: &str) -> Result<&mut KeyRecord, KmsError> {
        let i = self.position(key_ref)?;
        Ok(&mut self.keys[i])
    }

    /// Unwraps a blob that must have been made by `expected_key_id` under `context`.
    fn unwrap(
        &self,
        wrapped: &[u8],
        context: &EncryptionContext,
        expected_key_id: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let key = self.get(expected_key_id)?;
        let blob = Blob::parse(wrapped)?;
        if blob.key_id != key.key_id {
            return Err(KmsError::new(
                KmsErrorKind::WrongKey,
                format!(
                    "the wrapped key was made by master key {}, not by {expected_key_id}: give \
                     the key it was wrapped with",
                    blob.key_id
                ),
            ));
        }
        key.check_usable()?;
        key.unwrap(&blob, context)
    }
}

impl KeyRecord {
    fn metadata(&self) -> KeyMetadata {
        KeyMetadata {
            key_id: self.key_id.clone(),
            aliases: self.aliases.clone(),
            description: self.description.clone(),
            state: self.state,
            created: self.created.clone(),
            deletion_date: self.deletion_date.clone(),
            versions: u32::try_from(self.versions.len()).unwrap_or(u32::MAX),
            backend: BACKEND_NAME.to_owned(),
        }
    }

    fn deletion_due(&self, now: OffsetDateTime) -> Result<bool, KmsError> {
        let Some(date) = &self.deletion_date else {
            return Ok(false);
        };
        let date = OffsetDateTime::parse(date, &Rfc3339).map_err(|_| {
            KmsError::new(
                KmsErrorKind::Keystore,
                format!(
                    "key {} has an unreadable deletion date: restore the keystore from a backup",
                    self.key_id
                ),
            )
        })?;
        Ok(date <= now)
    }

    fn refuse_if_pending(&self) -> Result<(), KmsError> {
        if self.state == KeyState::PendingDeletion {
            return Err(KmsError::new(
                KmsErrorKind::KeyPendingDeletion,
                format!(
                    "key {} is pending deletion (on {}): cancel the deletion first",
                    self.key_id,
                    self.deletion_date.as_deref().unwrap_or("an unknown date")
                ),
            ));
        }
        Ok(())
    }

    /// Refuses cryptographic use unless the key is enabled.
    fn check_usable(&self) -> Result<(), KmsError> {
        self.refuse_if_pending()?;
        if self.state == KeyState::Disabled {
            return Err(KmsError::new(
                KmsErrorKind::KeyDisabled,
                format!("key {} is disabled: enable it to use it", self.key_id),
            ));
        }
        Ok(())
    }

    fn newest(&self) -> Result<&KeyVersion, KmsError> {
        self.versions.last().ok_or_else(|| {
            KmsError::new(
                KmsErrorKind::Keystore,
                format!(
                    "key {} has no key material: restore the keystore from a backup",
                    self.key_id
                ),
            )
        })
    }

    /// Wraps `plaintext` under the newest version, bound to `context`.
    fn wrap(&self, context: &EncryptionContext, plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
        let version = self.newest()?;
        let nonce = random_array()?;
        let key_id_len = u8::try_from(self.key_id.len()).map_err(|_| {
            KmsError::new(
                KmsErrorKind::Keystore,
                format!("key id {} is too long", self.key_id),
            )
        })?;
        let mut header = Vec::with_capacity(Blob::header_len(self.key_id.len()));
        header.extend_from_slice(&BLOB_MAGIC);
        header.push(BLOB_VERSION);
        header.push(key_id_len);
        header.extend_from_slice(self.key_id.as_bytes());
        header.extend_from_slice(&version.version.to_be_bytes());
        header.extend_from_slice(&nonce);
        let aad = [header.as_slice(), &context.canonical_bytes()].concat();
        aead_seal(&version.material, nonce, &aad, header, plaintext)
    }

    fn unwrap(
        &self,
        blob: &Blob<'_>,
        context: &EncryptionContext,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let version = self
            .versions
            .iter()
            .find(|v| v.version == blob.version)
            .ok_or_else(invalid_ciphertext)?;
        let aad = [blob.header, &context.canonical_bytes()].concat();
        aead_open(&version.material, blob.nonce, &aad, blob.sealed).ok_or_else(invalid_ciphertext)
    }
}

/// A parsed wrapped data key; see the layout in the module documentation.
struct Blob<'a> {
    header: &'a [u8],
    key_id: &'a str,
    version: u32,
    nonce: [u8; NONCE_LEN],
    /// Ciphertext and tag.
    sealed: &'a [u8],
}

impl<'a> Blob<'a> {
    const fn header_len(key_id_len: usize) -> usize {
        4 + 1 + 1 + key_id_len + 4 + NONCE_LEN
    }

    fn parse(bytes: &'a [u8]) -> Result<Self, KmsError> {
        Self::try_parse(bytes).ok_or_else(invalid_ciphertext)
    }

    fn try_parse(bytes: &'a [u8]) -> Option<Self> {
        let rest = bytes
            .strip_prefix(&BLOB_MAGIC)?
            .strip_prefix(&[BLOB_VERSION])?;
        let (&id_len, rest) = rest.split_first()?;
        let (key_id, rest) = rest.split_at_checked(usize::from(id_len))?;
        let key_id = validate_blob_key_id(key_id)?;
        let (version, rest) = rest.split_first_chunk::<4>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        if sealed.len() <= TAG_LEN {
            return None;
        }
        let (header, _) = bytes.split_at_checked(Self::header_len(key_id.len()))?;
        Some(Self {
            header,
            key_id,
            version: u32::from_be_bytes(*version),
            nonce: *nonce,
            sealed,
        })
    }
}

/// A key id as blobs carry it: 1 to 255 printable ASCII bytes.
fn validate_blob_key_id(id: &[u8]) -> Option<&str> {
    let ok = (1..=255).contains(&id.len()) && id.iter().all(u8::is_ascii_graphic);
    ok.then(|| std::str::from_utf8(id).ok()).flatten()
}

fn invalid_ciphertext() -> KmsError {
    KmsError::new(
        KmsErrorKind::InvalidCiphertext,
        "the wrapped key could not be unwrapped: it is damaged, or the encryption context differs \
         from the one it was wrapped under; give the exact context it was created with",
    )
}

/// The header of a passphrase envelope; see the layout in the module documentation.
struct EnvelopeHeader {
    params: KdfParams,
    salt: [u8; SALT_LEN],
}

impl EnvelopeHeader {
    fn parse(magic: &[u8; 4], bytes: &[u8]) -> Option<Self> {
        let rest = bytes
            .strip_prefix(magic)?
            .strip_prefix(&[ENVELOPE_VERSION, KDF_ARGON2ID])?;
        let (m, rest) = rest.split_first_chunk::<4>()?;
        let (t, rest) = rest.split_first_chunk::<4>()?;
        let (p, rest) = rest.split_first_chunk::<4>()?;
        let (salt, rest) = rest.split_first_chunk::<SALT_LEN>()?;
        if rest.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let params = KdfParams {
            m_cost_kib: u32::from_be_bytes(*m),
            t_cost: u32::from_be_bytes(*t),
            p_cost: u32::from_be_bytes(*p),
        };
        params.to_argon2().ok()?;
        Some(Self {
            params,
            salt: *salt,
        })
    }
}

fn seal_envelope(magic: &[u8; 4], kek: &Kek, plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
    let nonce = random_array()?;
    let mut header = Vec::with_capacity(ENVELOPE_HEADER_LEN);
    header.extend_from_slice(magic);
    header.extend_from_slice(&[ENVELOPE_VERSION, KDF_ARGON2ID]);
    for n in [kek.params.m_cost_kib, kek.params.t_cost, kek.params.p_cost] {
        header.extend_from_slice(&n.to_be_bytes());
    }
    header.extend_from_slice(&kek.salt);
    header.extend_from_slice(&nonce);
    let aad = header.clone();
    aead_seal(kek.key.as_slice(), nonce, &aad, header, plaintext)
}

/// Opens an envelope whose header was checked with [`EnvelopeHeader::parse`].
fn open_envelope(kek: &Kek, bytes: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let (header, sealed) = bytes.split_at_checked(ENVELOPE_HEADER_LEN)?;
    let (_, nonce) = header.split_last_chunk::<NONCE_LEN>()?;
    aead_open(kek.key.as_slice(), *nonce, header, sealed)
}

fn derive_kek(passphrase: &[u8], params: KdfParams, salt: [u8; SALT_LEN]) -> Result<Kek, KmsError> {
    let argon_params = params.to_argon2()?;
    let mut memory = Zeroizing::new(vec![argon2::Block::default(); argon_params.block_count()]);
    let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    )
    .hash_password_into_with_memory(passphrase, &salt, key.as_mut_slice(), memory.as_mut_slice())
    .map_err(|e| {
        KmsError::new(
            KmsErrorKind::InvalidRequest,
            format!("the passphrase could not be stretched ({e}): use another passphrase"),
        )
    })?;
    Ok(Kek { params, salt, key })
}

fn check_passphrase(passphrase: &[u8]) -> Result<(), KmsError> {
    if passphrase.is_empty() {
        return Err(KmsError::new(
            KmsErrorKind::InvalidRequest,
            "the passphrase is empty: give a non-empty passphrase",
        ));
    }
    Ok(())
}

/// AES-256-GCM: returns `prefix || ciphertext || tag`. The plaintext is only ever copied into
/// zeroized memory (the buffer is sized up front so it never reallocates).
fn aead_seal(
    key: &[u8],
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    prefix: Vec<u8>,
    plaintext: &[u8],
) -> Result<Vec<u8>, KmsError> {
    let start = prefix.len();
    let mut out = Zeroizing::new(Vec::with_capacity(start + plaintext.len() + TAG_LEN));
    out.extend_from_slice(&prefix);
    out.extend_from_slice(plaintext);
    let tag = aead_key(key)?
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start..],
        )
        .map_err(|_| {
            KmsError::new(
                KmsErrorKind::Keystore,
                "AES-GCM encryption failed: retry, and report it if it persists",
            )
        })?;
    out.extend_from_slice(tag.as_ref());
    // Now ciphertext only: no need to zeroize it.
    Ok(std::mem::take(&mut *out))
}

/// AES-256-GCM decryption of `ciphertext || tag`; `None` when authentication fails.
fn aead_open(
    key: &[u8],
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(sealed.to_vec());
    let len = aead_key(key)
        .ok()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

fn aead_key(key: &[u8]) -> Result<LessSafeKey, KmsError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| {
            KmsError::new(
                KmsErrorKind::Keystore,
                "a master key has the wrong length: restore the keystore from a backup",
            )
        })
}

fn random_fill(buf: &mut [u8]) -> Result<(), KmsError> {
    aws_lc_rs::rand::fill(buf).map_err(|_| {
        KmsError::new(
            KmsErrorKind::Unavailable,
            "the system random number generator failed: retry later",
        )
    })
}

fn random_array<const N: usize>() -> Result<[u8; N], KmsError> {
    let mut out = [0u8; N];
    random_fill(&mut out)?;
    Ok(out)
}

fn new_material() -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let mut material = Zeroizing::new(vec![0u8; MASTER_KEY_LEN]);
    random_fill(&mut material)?;
    Ok(material)
}

/// A random UUID version 4, lowercase.
fn new_key_id() -> Result<String, KmsError> {
    let mut b: [u8; 16] = random_array()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// `NAME` or `alias/NAME` as `alias/NAME`, checked with [`validate_alias`].
fn normalize_alias(alias: &str) -> Result<String, KmsError> {
    let alias = if alias.starts_with(ALIAS_PREFIX) {
        alias.to_owned()
    } else {
        format!("{ALIAS_PREFIX}{alias}")
    };
    validate_alias(&alias)?;
    Ok(alias)
}

/// AWS alias rules: `alias/` then letters, digits, `/`, `_`, `-`; at most 256 characters;
/// `alias/aws/` is reserved.
fn validate_alias(alias: &str) -> Result<(), KmsError> {
    let name = alias.strip_prefix(ALIAS_PREFIX).unwrap_or_default();
    let ok = !name.is_empty()
        && alias.len() <= MAX_ALIAS_LEN
        && !name.starts_with("aws/")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KmsError::new(
            KmsErrorKind::InvalidRequest,
            format!(
                "invalid alias {alias:?}: expected alias/NAME such as alias/workspaces, NAME made of \
                 letters, digits, '/', '_' and '-', at most {MAX_ALIAS_LEN} characters in all, not \
                 starting with aws/"
            ),
        ))
    }
}

fn rfc3339(t: OffsetDateTime) -> Result<String, KmsError> {
    t.to_offset(UtcOffset::UTC).format(&Rfc3339).map_err(|e| {
        KmsError::new(
            KmsErrorKind::InvalidRequest,
            format!("the time {t} cannot be written as RFC 3339 ({e}): check the clock"),
        )
    })
}

/// `"{action} {path}"` as a `Keystore` error carrying the I/O error.
fn io_error<'a>(action: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> KmsError + 'a {
    move |e| {
        KmsError::new(
            KmsErrorKind::Keystore,
            format!(
                "could not {action} {}: check that it exists and that this user may use it",
                path.display()
            ),
        )
        .with_source(e)
    }
}

/// Refuses a keystore directory or file that group or others can access.
fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), KmsError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let fix = if meta.is_dir() {
        "chmod 700"
    } else {
        "chmod 600"
    };
    Err(KmsError::new(
        KmsErrorKind::Keystore,
        format!(
            "{} is accessible by other users (mode {mode:04o}) but holds master keys: run `{fix} {}`",
            path.display(),
            path.display()
        ),
    ))
}

/// Reads a keystore or backup file into zeroized memory; `private` refuses a file that group or
/// others can access.
fn read_file(path: &Path, private: bool) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let meta = file.metadata().map_err(io_error("inspect", path))?;
    if private {
        check_private(path, &meta)?;
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(KmsError::new(
            KmsErrorKind::Keystore,
            format!(
                "{} is larger than {MAX_FILE_LEN} bytes, so it is not a keystore or a backup: check the path",
                path.display()
            ),
        ));
    }
    // Sized up front (+1 to see the end) so reading does not reallocate and leave copies.
    let mut buf = Zeroizing::new(Vec::with_capacity(
        usize::try_from(meta.len()).unwrap_or(0) + 1,
    ));
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(io_error("read", path))?;
    Ok(buf)
}

/// Serializes to JSON in zeroized memory (the JSON may hold key material).
fn to_secret_json<T: Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let mut out = SecretBuf(Zeroizing::new(Vec::with_capacity(4096)));
    serde_json::to_writer_pretty(&mut out, value).map_err(|e| {
        KmsError::new(
            KmsErrorKind::Keystore,
            "could not serialize the keystore: report this bug",
        )
        .with_source(e)
    })?;
    Ok(out.0)
}

/// A growable buffer that zeroizes every allocation it leaves behind.
struct SecretBuf(Zeroizing<Vec<u8>>);

impl Write for SecretBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let needed = self.0.len() + data.len();
        if needed > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(needed.max(2 * self.0.capacity())));
            bigger.extend_from_slice(&self.0);
            // The old buffer is zeroized as it drops.
            self.0 = bigger;
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically and durably (store's one helper: temporary file 0600,
/// fsync, rename (`replace`) or hard link (never replaces; fails with `AlreadyExists`), fsync
/// of the directory).
fn write_atomic(path: &Path, bytes: &[u8], replace: bool) -> io::Result<()> {
    let existing = if replace {
        store::durable::Existing::Replace
    } else {
        store::durable::Existing::Keep
    };
    store::durable::write_atomic(path, bytes, existing)
}

/// Serde for key material: base64 text, decoded straight into zeroized memory.
mod secret_base64 {
    use super::BASE64;
    use base64::Engine as _;
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use zeroize::Zeroizing;

    pub(super) fn serialize<S: Serializer>(
        bytes: &Zeroizing<Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut text = Zeroizing::new(String::with_capacity(bytes.len().div_ceil(3) * 4));
        BASE64.encode_string(bytes.as_slice(), &mut text);
        s.serialize_str(&text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Zeroizing<Vec<u8>>, D::Error> {
        struct Base64Visitor;
        impl Visitor<'_> for Base64Visitor {
            type Value = Zeroizing<Vec<u8>>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("base64 key material")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                let mut out = Zeroizing::new(vec![0u8; s.len().div_ceil(4) * 3]);
                // The decoder's error would quote a byte of the material: say nothing specific.
                let len = BASE64
                    .decode_slice(s, &mut out)
                    .map_err(|_| E::custom("key material is not valid base64"))?;
                out.truncate(len);
                Ok(out)
            }
        }
        d.deserialize_str(Base64Visitor)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    use proptest::prelude::*;

    use super::*;
    use crate::IdentityContext;

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct TestClock(Arc<Mutex<OffsetDateTime>>);

    impl TestClock {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(
                OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            )))
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }

        fn clock(&self) -> Clock {
            let now = self.0.clone();
            Arc::new(move || *now.lock().unwrap())
        }
    }

    fn options() -> LocalKmsOptions {
        LocalKmsOptions {
            create_if_missing: true,
            kdf: KdfParams::INSECURE_FAST,
            ..Default::default()
        }
    }

    fn sealed_options(passphrase: &str) -> LocalKmsOptions {
        LocalKmsOptions {
            passphrase: Some(Zeroizing::new(passphrase.as_bytes().to_vec())),
            ..options()
        }
    }

    fn new_kms() -> (tempfile::TempDir, LocalKms) {
        let tmp = tempfile::tempdir().unwrap();
        let kms = LocalKms::open(&tmp.path().join("ks"), options()).unwrap();
        (tmp, kms)
    }

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::from_pairs(pairs.iter().copied()).unwrap()
    }

    fn identity() -> EncryptionContext {
        IdentityContext::new(
            "S-1-5-21-277731876-1789304096-451871588-1107",
            "d-1234abcd01",
            "vol-0123456789abcdef0",
        )
        .unwrap()
        .to_context(&crate::ContextKeys::default(), &[])
        .unwrap()
    }

    fn kind<T: fmt::Debug>(r: Result<T, KmsError>) -> KmsErrorKind {
        r.unwrap_err().kind()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn generate_then_decrypt() {
        let (_tmp, kms) = new_kms();
        let key = kms.create_key(None, "test key").unwrap();
        assert_eq!(key.state, KeyState::Enabled);
        assert_eq!(key.versions, 1);
        assert_eq!(key.backend, "local");
        let c = identity();
        let g = kms.generate_data_key(&key.key_id, &c, 64).await.unwrap();
        assert_eq!(g.plaintext.len(), 64);
        assert_eq!(g.key_id, key.key_id);
        let d = kms.decrypt(&g.wrapped, &c, &key.key_id).await.unwrap();
        assert_eq!(d.expose(), g.plaintext.expose());
        // Two data keys differ, and so do their blobs.
        let g2 = kms.generate_data_key(&key.key_id, &c, 64).await.unwrap();
        assert_ne!(g.plaintext.expose(), g2.plaintext.expose());
        assert_eq!(kms.backend_name(), "local");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blob_layout_is_as_documented() {
        let (_tmp, kms) = new_kms();
        let key = kms.create_key(None, "").unwrap();
        let g = kms
            .generate_data_key(&key.key_id, &identity(), 64)
            .await
            .unwrap();
        let b = &g.wrapped;
        assert_eq!(&b[..4], b"CNKW");
        assert_eq!(b[4], 1);
        assert_eq!(usize::from(b[5]), 36);
        assert_eq!(&b[6..42], key.key_id.as_bytes());
        assert_eq!(&b[42..46], &1u32.to_be_bytes());
        assert_eq!(b.len(), 42 + 4 + 12 + 64 + 16);
        // The plaintext does not appear in the blob.
        assert!(!b.windows(16).any(|w| w == &g.plaintext.expose()[..16]));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn data_key_length_limits() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        assert_eq!(
            kind(kms.generate_data_key(&id, &c, 0).await),
            KmsErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(kms.generate_data_key(&id, &c, 1025).await),
            KmsErrorKind::InvalidRequest
        );
        for len in [1, 32, 1024] {
            let g = kms.generate_data_key(&id, &c, len).await.unwrap();
            assert_eq!(kms.decrypt(&g.wrapped, &c, &id).await.unwrap().len(), len);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn data_key_debug_hides_bytes() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let g = kms.generate_data_key(&id, &identity(), 64).await.unwrap();
        let shown = format!("{g:?}");
        assert!(shown.contains("64 bytes, redacted"), "{shown}");
        let bytes = g.plaintext.expose();
        // The whole key in each rendering: a few bytes' worth could occur by
        // chance in the wrapped blob, which Debug does show.
        let listed = format!("{bytes:?}");
        assert!(!shown.contains(&listed[1..listed.len() - 1]), "{shown}");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex), "{shown}");
        let debug_kms = format!("{kms:?}");
        assert!(
            debug_kms.contains("LocalKms") && debug_kms.contains("sealed: false"),
            "{debug_kms}"
        );
        let opts = format!("{:?}", sealed_options("hunter2"));
        assert!(
            !opts.contains("hunter2") && opts.contains("redacted"),
            "{opts}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn aliases_resolve() {
        let (_tmp, kms) = new_kms();
        let key = kms.create_key(Some("alias/workspaces"), "ws").unwrap();
        assert_eq!(key.aliases, vec!["alias/workspaces".to_owned()]);
        assert_eq!(kms.describe_key("alias/workspaces").await.unwrap(), key);
        let c = identity();
        let g = kms
            .generate_data_key("alias/workspaces", &c, 64)
            .await
            .unwrap();
        assert_eq!(
            g.key_id, key.key_id,
            "the alias resolves to the canonical id"
        );
        kms.decrypt(&g.wrapped, &c, "alias/workspaces")
            .await
            .unwrap();
        kms.decrypt(&g.wrapped, &c, &key.key_id).await.unwrap();

        assert_eq!(
            kind(kms.describe_key("alias/nope").await),
            KmsErrorKind::KeyNotFound
        );
        assert_eq!(
            kind(
                kms.describe_key(&format!(
                    "arn:aws:kms:us-east-1:111122223333:key/{}",
                    key.key_id
                ))
                .await
            ),
            KmsErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(kms.describe_key("").await),
            KmsErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(kms.create_key(Some("alias/workspaces"), "again")),
            KmsErrorKind::InvalidRequest
        );
        for bad in [
            "no spaces",
            "",
            "alias/",
            "aws/ebs",
            "alias/aws/ebs",
            "alias/has space",
            "alias/ü",
            &format!("alias/{}", "a".repeat(251)),
        ] {
            assert_eq!(
                kind(kms.create_key(Some(bad), "")),
                KmsErrorKind::InvalidRequest,
                "{bad}"
            );
        }
        kms.create_key(Some(&format!("alias/{}", "a".repeat(250))), "")
            .unwrap();
        kms.create_key(Some("alias/team_a/vol-1"), "").unwrap();
        // A bare NAME is stored as alias/NAME.
        let plain = kms.create_key(Some("plain"), "").unwrap();
        assert_eq!(plain.aliases, vec!["alias/plain".to_owned()]);
        assert_eq!(kms.describe("alias/plain").unwrap().key_id, plain.key_id);
        assert_eq!(kind(kms.describe("plain")), KmsErrorKind::KeyNotFound);
        assert_eq!(kms.list_keys().unwrap().len(), 4);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unknown_key_is_not_found() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        let g = kms.generate_data_key(&id, &c, 64).await.unwrap();
        let unknown = "0b7f6a47-9c3e-4c1a-8f1e-2f0d3c4b5a69";
        assert_eq!(
            kind(kms.generate_data_key(unknown, &c, 64).await),
            KmsErrorKind::KeyNotFound
        );
        assert_eq!(
            kind(kms.decrypt(&g.wrapped, &c, unknown).await),
            KmsErrorKind::KeyNotFound
        );
        assert_eq!(
            kind(kms.describe_key(unknown).await),
            KmsErrorKind::KeyNotFound
        );
        assert_eq!(kind(kms.enable_key(unknown)), KmsErrorKind::KeyNotFound);
        let err = kms.describe(unknown).unwrap_err();
        assert!(err.to_string().contains(unknown), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn key_ids_are_uuid_v4() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
        assert!(
            id.bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn context_must_match_exactly() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let c = ctx(&[("vol", "vol-1"), ("user", "alice")]);
        let g = kms.generate_data_key(&id, &c, 64).await.unwrap();
        // Same pairs in another order: fine.
        kms.decrypt(
            &g.wrapped,
            &ctx(&[("user", "alice"), ("vol", "vol-1")]),
            &id,
        )
        .await
        .unwrap();
        for other in [
            ctx(&[("vol", "vol-1"), ("user", "bob")]),
            ctx(&[("vol", "vol-1")]),
            ctx(&[("vol", "vol-1"), ("user", "alice"), ("extra", "x")]),
            ctx(&[("Vol", "vol-1"), ("user", "alice")]),
            EncryptionContext::default(),
        ] {
            let err = kms.decrypt(&g.wrapped, &other, &id).await.unwrap_err();
            assert_eq!(err.kind(), KmsErrorKind::InvalidCiphertext, "{other}");
            assert!(err.to_string().contains("context"), "{err}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn length_prefixed_context_is_unambiguous() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let ab_c = ctx(&[("ab", "c")]);
        let a_bc = ctx(&[("a", "bc")]);
        assert_ne!(ab_c.canonical_bytes(), a_bc.canonical_bytes());
        let g = kms.generate_data_key(&id, &ab_c, 64).await.unwrap();
        assert_eq!(
            kind(kms.decrypt(&g.wrapped, &a_bc, &id).await),
            KmsErrorKind::InvalidCiphertext
        );
        kms.decrypt(&g.wrapped, &ab_c, &id).await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blob_of_another_key_is_wrong_key() {
        let (_tmp, kms) = new_kms();
        let a = kms.create_key(Some("alias/a"), "").unwrap().key_id;
        let b = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        let g = kms.generate_data_key(&a, &c, 64).await.unwrap();
        let err = kms.decrypt(&g.wrapped, &c, &b).await.unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::WrongKey);
        assert!(
            err.to_string().contains(&a) && err.to_string().contains(&b),
            "{err}"
        );
        assert_eq!(
            kind(kms.re_encrypt(&g.wrapped, &c, &b, &a, &c).await),
            KmsErrorKind::WrongKey
        );
        kms.decrypt(&g.wrapped, &c, "alias/a").await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn disabled_key_refuses_then_enabled_works() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let other = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        let g = kms.generate_data_key(&id, &c, 64).await.unwrap();
        assert_eq!(kms.disable_key(&id).unwrap().state, KeyState::Disabled);
        assert_eq!(
            kind(kms.generate_data_key(&id, &c, 64).await),
            KmsErrorKind::KeyDisabled
        );
        let err = kms.decrypt(&g.wrapped, &c, &id).await.unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::KeyDisabled);
        assert!(err.to_string().contains("enable"), "{err}");
        assert_eq!(
            kind(kms.re_encrypt(&g.wrapped, &c, &id, &other, &c).await),
            KmsErrorKind::KeyDisabled
        );
        let g2 = kms.generate_data_key(&other, &c, 64).await.unwrap();
        assert_eq!(
            kind(kms.re_encrypt(&g2.wrapped, &c, &other, &id, &c).await),
            KmsErrorKind::KeyDisabled
        );
        assert_eq!(kind(kms.rotate_key(&id)), KmsErrorKind::KeyDisabled);
        assert_eq!(kms.describe(&id).unwrap().state, KeyState::Disabled);
        assert_eq!(kms.enable_key(&id).unwrap().state, KeyState::Enabled);
        kms.decrypt(&g.wrapped, &c, &id).await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rotation_keeps_old_versions() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        let old = kms.generate_data_key(&id, &c, 64).await.unwrap();
        assert_eq!(kms.rotate_key(&id).unwrap().versions, 2);
        let new = kms.generate_data_key(&id, &c, 64).await.unwrap();
        let version = |blob: &[u8]| Blob::parse(blob).unwrap().version;
        assert_eq!(version(&old.wrapped), 1);
        assert_eq!(version(&new.wrapped), 2);
        assert_eq!(
            kms.decrypt(&old.wrapped, &c, &id).await.unwrap().expose(),
            old.plaintext.expose()
        );
        assert_eq!(
            kms.decrypt(&new.wrapped, &c, &id).await.unwrap().expose(),
            new.plaintext.expose()
        );
        // A blob made by version 1 but claiming version 2 does not open.
        let mut relabelled = old.wrapped.clone();
        relabelled[42..46].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            kind(kms.decrypt(&relabelled, &c, &id).await),
            KmsErrorKind::InvalidCiphertext
        );
        // And a version that does not exist.
        relabelled[42..46].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            kind(kms.decrypt(&relabelled, &c, &id).await),
            KmsErrorKind::InvalidCiphertext
        );
        // re_encrypt moves an old blob onto the newest version.
        let moved = kms
            .re_encrypt(&old.wrapped, &c, &id, &id, &c)
            .await
            .unwrap();
        assert_eq!(version(&moved.wrapped), 2);
        assert_eq!(
            kms.decrypt(&moved.wrapped, &c, &id).await.unwrap().expose(),
            old.plaintext.expose()
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn re_encrypt_to_another_key_and_context() {
        let (_tmp, kms) = new_kms();
        let a = kms.create_key(None, "").unwrap().key_id;
        let b = kms.create_key(Some("alias/b"), "").unwrap().key_id;
        let c1 = ctx(&[("user", "alice")]);
        let c2 = ctx(&[("user", "bob")]);
        let g = kms.generate_data_key(&a, &c1, 64).await.unwrap();
        let moved = kms
            .re_encrypt(&g.wrapped, &c1, &a, "alias/b", &c2)
            .await
            .unwrap();
        assert_eq!(moved.key_id, b);
        assert_eq!(
            kms.decrypt(&moved.wrapped, &c2, &b).await.unwrap().expose(),
            g.plaintext.expose()
        );
        assert_eq!(
            kind(kms.decrypt(&moved.wrapped, &c1, &b).await),
            KmsErrorKind::InvalidCiphertext
        );
        assert_eq!(
            kind(kms.decrypt(&moved.wrapped, &c2, &a).await),
            KmsErrorKind::WrongKey
        );
        assert_eq!(
            kind(kms.re_encrypt(&g.wrapped, &c2, &a, &b, &c2).await),
            KmsErrorKind::InvalidCiphertext
        );
        assert_eq!(
            kind(kms.re_encrypt(&g.wrapped, &c1, &a, "alias/none", &c2).await),
            KmsErrorKind::KeyNotFound
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn deletion_window_then_purge() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let kms = LocalKms::open(
            &tmp.path().join("ks"),
            LocalKmsOptions {
                clock: clock.clock(),
                ..options()
            },
        )
        .unwrap();
        let id = kms.create_key(Some("alias/doomed"), "").unwrap().key_id;
        let keep = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        let g = kms.generate_data_key(&id, &c, 64).await.unwrap();

        for days in [0, 6, 31, 365] {
            assert_eq!(
                kind(kms.schedule_key_deletion(&id, days)),
                KmsErrorKind::InvalidRequest,
                "{days}"
            );
        }
        let meta = kms.schedule_key_deletion(&id, 7).unwrap();
        assert_eq!(meta.state, KeyState::PendingDeletion);
        assert_eq!(meta.deletion_date.as_deref(), Some("2023-11-21T22:13:20Z"));
        assert_eq!(
            kind(kms.schedule_key_deletion(&id, 30)),
            KmsErrorKind::KeyPendingDeletion
        );
        assert_eq!(
            kind(kms.decrypt(&g.wrapped, &c, &id).await),
            KmsErrorKind::KeyPendingDeletion
        );
        assert_eq!(
            kind(kms.generate_data_key("alias/doomed", &c, 64).await),
            KmsErrorKind::KeyPendingDeletion
        );
        assert_eq!(
            kind(kms.re_encrypt(&g.wrapped, &c, &id, &keep, &c).await),
            KmsErrorKind::KeyPendingDeletion
        );
        assert_eq!(kind(kms.enable_key(&id)), KmsErrorKind::KeyPendingDeletion);
        assert_eq!(kind(kms.disable_key(&id)), KmsErrorKind::KeyPendingDeletion);
        assert_eq!(kind(kms.rotate_key(&id)), KmsErrorKind::KeyPendingDeletion);

        // Still there one second before the date.
        clock.advance(Duration::days(7) - Duration::seconds(1));
        assert_eq!(kms.describe(&id).unwrap().state, KeyState::PendingDeletion);
        clock.advance(Duration::seconds(1));
        assert_eq!(kind(kms.describe(&id)), KmsErrorKind::KeyNotFound);
        assert_eq!(
            kind(kms.decrypt(&g.wrapped, &c, &id).await),
            KmsErrorKind::KeyNotFound
        );
        assert_eq!(
            kind(kms.describe("alias/doomed")),
            KmsErrorKind::KeyNotFound
        );
        let left: Vec<String> = kms
            .list_keys()
            .unwrap()
            .into_iter()
            .map(|k| k.key_id)
            .collect();
        assert_eq!(left, vec![keep.clone()]);
        // Gone from the file too, and the alias is free again.
        let text = fs::read_to_string(tmp.path().join("ks").join(KEYSTORE_FILE)).unwrap();
        assert!(!text.contains(&id) && text.contains(&keep));
        kms.create_key(Some("alias/doomed"), "").unwrap();
    }

    #[test]
    fn purge_happens_on_open_too() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = TestClock::new();
        let opts = LocalKmsOptions {
            clock: clock.clock(),
            ..options()
        };
        let kms = LocalKms::open(&tmp.path().join("ks"), opts.clone()).unwrap();
        let id = kms.create_key(None, "").unwrap().key_id;
        kms.schedule_key_deletion(&id, 30).unwrap();
        drop(kms);
        clock.advance(Duration::days(31));
        LocalKms::open(&tmp.path().join("ks"), opts).unwrap();
        let text = fs::read_to_string(tmp.path().join("ks").join(KEYSTORE_FILE)).unwrap();
        assert!(!text.contains(&id));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn cancel_deletion_returns_to_disabled() {
        let (_tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        let g = kms.generate_data_key(&id, &c, 64).await.unwrap();
        assert_eq!(
            kind(kms.cancel_key_deletion(&id)),
            KmsErrorKind::InvalidRequest
        );
        kms.schedule_key_deletion(&id, 30).unwrap();
        let meta = kms.cancel_key_deletion(&id).unwrap();
        assert_eq!(meta.state, KeyState::Disabled);
        assert_eq!(meta.deletion_date, None);
        assert_eq!(
            kind(kms.decrypt(&g.wrapped, &c, &id).await),
            KmsErrorKind::KeyDisabled
        );
        kms.enable_key(&id).unwrap();
        kms.decrypt(&g.wrapped, &c, &id).await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn state_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let kms = LocalKms::open(&tmp.path().join("ks"), options()).unwrap();
        let id = kms.create_key(Some("alias/x"), "persisted").unwrap().key_id;
        kms.rotate_key(&id).unwrap();
        kms.disable_key(&id).unwrap();
        let c = identity();
        drop(kms);
        let kms = LocalKms::open(
            &tmp.path().join("ks"),
            LocalKmsOptions {
                create_if_missing: false,
                ..options()
            },
        )
        .unwrap();
        let meta = kms.describe("alias/x").unwrap();
        assert_eq!(
            (meta.key_id.as_str(), meta.versions, meta.state),
            (id.as_str(), 2, KeyState::Disabled)
        );
        assert_eq!(meta.description, "persisted");
        kms.enable_key(&id).unwrap();
        let g = kms.generate_data_key(&id, &c, 64).await.unwrap();
        kms.decrypt(&g.wrapped, &c, &id).await.unwrap();
    }

    #[test]
    fn missing_keystore_without_create_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let no_create = LocalKmsOptions {
            create_if_missing: false,
            ..options()
        };
        let err = LocalKms::open(&tmp.path().join("nope"), no_create.clone()).unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::Keystore);
        // An existing private directory without a keystore file.
        let dir = tmp.path().join("empty");
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let err = LocalKms::open(&dir, no_create).unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::Keystore);
        assert!(err.to_string().contains("no keystore"), "{err}");
    }

    #[test]
    fn new_keystore_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let kms = LocalKms::open(&dir, options()).unwrap();
        kms.create_key(None, "").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEYSTORE_FILE)), 0o600);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn open_permissions_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ks");
        let kms = LocalKms::open(&dir, options()).unwrap();
        let chmod =
            |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();

        chmod(&dir, 0o755);
        let err = LocalKms::open(&dir, options()).unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::Keystore);
        assert!(
            err.to_string()
                .contains(&format!("chmod 700 {}", dir.display())),
            "{err}"
        );
        // A running instance notices too.
        assert_eq!(kind(kms.list_keys()), KmsErrorKind::Keystore);
        chmod(&dir, 0o700);

        let file = dir.join(KEYSTORE_FILE);
        chmod(&file, 0o644);
        let err = LocalKms::open(&dir, options()).unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::Keystore);
        assert!(
            err.to_string()
                .contains(&format!("chmod 600 {}", file.display())),
            "{err}"
        );
        chmod(&file, 0o600);

        let lock = dir.join(LOCK_FILE);
        chmod(&lock, 0o660);
        let err = kms.list_keys().unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("chmod 600 {}", lock.display())),
            "{err}"
        );
        chmod(&lock, 0o600);
        kms.list_keys().unwrap();
    }

    #[test]
    fn damaged_keystore_is_refused() {
        let (tmp, kms) = new_kms();
        kms.create_key(None, "").unwrap();
        let file = tmp.path().join("ks").join(KEYSTORE_FILE);
        let good = fs::read_to_string(&file).unwrap();
        for bad in [
            "".to_owned(),
            "{".to_owned(),
            r#"{"format":1}"#.to_owned(),
            r#"{"format":2,"keys":[]}"#.to_owned(),
            good.replace("\"version\": 1", "\"version\": 1, \"x\": 2"),
            good.replace("\"Enabled\"", "\"PendingDeletion\""),
        ] {
            fs::write(&file, &bad).unwrap();
            let err = kms.list_keys().unwrap_err();
            assert_eq!(err.kind(), KmsErrorKind::Keystore, "{bad}: {err}");
        }
        fs::write(&file, good).unwrap();
        kms.list_keys().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sealed_keystore_needs_its_passphrase() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ks");
        let kms = LocalKms::open(&dir, sealed_options("correct horse")).unwrap();
        assert!(kms.is_sealed());
        let id = kms.create_key(Some("alias/s"), "").unwrap().key_id;
        let c = identity();
        let g = kms.generate_data_key(&id, &c, 64).await.unwrap();
        drop(kms);

        let text = fs::read_to_string(dir.join(KEYSTORE_FILE)).unwrap();
        assert!(text.contains("\"sealed\"") && !text.contains("material") && !text.contains(&id));

        let no_create = |o: LocalKmsOptions| LocalKmsOptions {
            create_if_missing: false,
            ..o
        };
        let err = LocalKms::open(&dir, no_create(options())).unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::AccessDenied);
        assert!(
            err.to_string().contains("give the keystore passphrase"),
            "{err}"
        );
        let err = LocalKms::open(&dir, no_create(sealed_options("wrong horse"))).unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::AccessDenied);
        assert!(
            err.to_string().contains("give the keystore passphrase"),
            "{err}"
        );

        let kms = LocalKms::open(&dir, no_create(sealed_options("correct horse"))).unwrap();
        assert_eq!(
            kms.decrypt(&g.wrapped, &c, "alias/s")
                .await
                .unwrap()
                .expose(),
            g.plaintext.expose()
        );
        // Mutations keep it sealed.
        kms.rotate_key(&id).unwrap();
        assert!(
            fs::read_to_string(dir.join(KEYSTORE_FILE))
                .unwrap()
                .contains("\"sealed\"")
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn seal_an_existing_keystore_and_change_passphrase() {
        let (tmp, kms) = new_kms();
        let dir = tmp.path().join("ks");
        let id = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        let g = kms.generate_data_key(&id, &c, 64).await.unwrap();
        assert_eq!(kind(kms.seal(b"")), KmsErrorKind::InvalidRequest);
        kms.seal(b"first").unwrap();
        assert!(kms.is_sealed());
        kms.decrypt(&g.wrapped, &c, &id).await.unwrap();
        assert_eq!(
            kind(LocalKms::open(&dir, options())),
            KmsErrorKind::AccessDenied
        );

        kms.seal(b"second").unwrap();
        assert_eq!(
            kind(LocalKms::open(&dir, sealed_options("first"))),
            KmsErrorKind::AccessDenied
        );
        let reopened = LocalKms::open(&dir, sealed_options("second")).unwrap();
        reopened.decrypt(&g.wrapped, &c, &id).await.unwrap();
    }

    #[test]
    fn unsealed_keystore_with_a_passphrase_is_refused() {
        let (tmp, _kms) = new_kms();
        let err = LocalKms::open(&tmp.path().join("ks"), sealed_options("pw")).unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::Keystore);
        assert!(err.to_string().contains("not sealed"), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn backup_and_restore() {
        let (tmp, kms) = new_kms();
        let a = kms.create_key(Some("alias/a"), "first").unwrap();
        kms.rotate_key(&a.key_id).unwrap();
        let b = kms.create_key(None, "second").unwrap();
        kms.disable_key(&b.key_id).unwrap();
        let c = identity();
        let g = kms.generate_data_key("alias/a", &c, 64).await.unwrap();

        let backup = tmp.path().join("backup.cnkb");
        kms.backup(&backup, b"backup pass").unwrap();
        assert_eq!(fs::metadata(&backup).unwrap().mode() & 0o777, 0o600);
        let bytes = fs::read(&backup).unwrap();
        assert_eq!(&bytes[..4], b"CNKB");
        assert!(
            !bytes
                .windows(a.key_id.len())
                .any(|w| w == a.key_id.as_bytes())
        );
        // Never overwrites.
        assert_eq!(
            kind(kms.backup(&backup, b"backup pass")),
            KmsErrorKind::InvalidRequest
        );

        let restored_dir = tmp.path().join("restored");
        let wrong = LocalKms::restore(&restored_dir, &backup, b"wrong pass", options());
        assert_eq!(kind(wrong), KmsErrorKind::AccessDenied);
        let restored =
            LocalKms::restore(&restored_dir, &backup, b"backup pass", options()).unwrap();
        let mut before = kms.list_keys().unwrap();
        let mut after = restored.list_keys().unwrap();
        before.sort_by(|x, y| x.key_id.cmp(&y.key_id));
        after.sort_by(|x, y| x.key_id.cmp(&y.key_id));
        assert_eq!(before, after);
        assert_eq!(
            restored
                .decrypt(&g.wrapped, &c, "alias/a")
                .await
                .unwrap()
                .expose(),
            g.plaintext.expose()
        );

        // Never into a keystore that holds keys.
        let err = LocalKms::restore(&restored_dir, &backup, b"backup pass", options()).unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::InvalidRequest);
        assert!(err.to_string().contains("empty directory"), "{err}");
        assert_eq!(restored.list_keys().unwrap().len(), 2);

        // Into a new sealed keystore.
        let sealed_dir = tmp.path().join("sealed");
        let sealed = LocalKms::restore(
            &sealed_dir,
            &backup,
            b"backup pass",
            sealed_options("store pass"),
        )
        .unwrap();
        assert!(sealed.is_sealed());
        drop(sealed);
        let sealed = LocalKms::open(&sealed_dir, sealed_options("store pass")).unwrap();
        sealed.decrypt(&g.wrapped, &c, &a.key_id).await.unwrap();

        // Not a backup at all.
        let junk = tmp.path().join("junk");
        fs::write(&junk, b"CNKB not really").unwrap();
        assert_eq!(
            kind(LocalKms::restore(
                &tmp.path().join("r2"),
                &junk,
                b"backup pass",
                options()
            )),
            KmsErrorKind::InvalidRequest
        );
    }

    #[test]
    fn damaged_backup_is_refused() {
        let (tmp, kms) = new_kms();
        kms.create_key(None, "").unwrap();
        let backup = tmp.path().join("b");
        kms.backup(&backup, b"pw").unwrap();
        let good = fs::read(&backup).unwrap();
        for i in [0, 5, 20, 40, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 1;
            fs::write(&backup, &bad).unwrap();
            let r = LocalKms::restore(&tmp.path().join(format!("r{i}")), &backup, b"pw", options());
            assert!(
                matches!(
                    r.unwrap_err().kind(),
                    KmsErrorKind::AccessDenied | KmsErrorKind::InvalidRequest
                ),
                "byte {i}"
            );
        }
    }

    #[test]
    fn kdf_parameters_are_bounded() {
        assert!(KdfParams::STRONG.to_argon2().is_ok());
        assert!(KdfParams::INSECURE_FAST.to_argon2().is_ok());
        for bad in [
            KdfParams {
                m_cost_kib: 4,
                ..KdfParams::INSECURE_FAST
            },
            KdfParams {
                t_cost: 0,
                ..KdfParams::INSECURE_FAST
            },
            KdfParams {
                p_cost: 0,
                ..KdfParams::INSECURE_FAST
            },
            KdfParams {
                m_cost_kib: u32::MAX,
                ..KdfParams::INSECURE_FAST
            },
        ] {
            assert_eq!(
                kind(bad.to_argon2()),
                KmsErrorKind::InvalidRequest,
                "{bad:?}"
            );
        }
        let tmp = tempfile::tempdir().unwrap();
        let opts = LocalKmsOptions {
            kdf: KdfParams {
                t_cost: 0,
                ..KdfParams::INSECURE_FAST
            },
            ..options()
        };
        assert_eq!(
            kind(LocalKms::open(&tmp.path().join("ks"), opts)),
            KmsErrorKind::InvalidRequest
        );
    }

    #[test]
    fn two_instances_share_a_keystore() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ks");
        LocalKms::open(&dir, options()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    // One instance per thread, as separate processes would have.
                    let kms = LocalKms::open(&dir, options()).unwrap();
                    for i in 0..10 {
                        kms.create_key(Some(&format!("alias/t{t}-{i}")), "")
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let kms = LocalKms::open(&dir, options()).unwrap();
        assert_eq!(kms.list_keys().unwrap().len(), 40);
        // A key made by one instance is seen at once by another.
        let other = LocalKms::open(&dir, options()).unwrap();
        let id = kms.create_key(None, "").unwrap().key_id;
        other.disable_key(&id).unwrap();
        assert_eq!(kms.describe(&id).unwrap().state, KeyState::Disabled);
    }

    #[test]
    fn one_instance_from_many_threads() {
        let (_tmp, kms) = new_kms();
        let kms = Arc::new(kms);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let kms = kms.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        kms.create_key(None, "").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(kms.list_keys().unwrap().len(), 40);
    }

    /// A keystore with one key and one blob, for the property tests.
    fn fixture() -> (
        tempfile::TempDir,
        LocalKms,
        String,
        EncryptionContext,
        Vec<u8>,
        tokio::runtime::Runtime,
    ) {
        let (tmp, kms) = new_kms();
        let id = kms.create_key(None, "").unwrap().key_id;
        let c = identity();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let blob = rt
            .block_on(kms.generate_data_key(&id, &c, 64))
            .unwrap()
            .wrapped;
        (tmp, kms, id, c, blob, rt)
    }

    #[test]
    fn any_single_byte_flip_is_refused() {
        let (_tmp, kms, id, c, blob, rt) = fixture();
        proptest!(ProptestConfig::with_cases(512), |(index in 0..blob.len(), mask in 1u8..=255)| {
            let mut bad = blob.clone();
            bad[index] ^= mask;
            let err = rt.block_on(kms.decrypt(&bad, &c, &id)).unwrap_err();
            prop_assert!(
                matches!(err.kind(), KmsErrorKind::InvalidCiphertext | KmsErrorKind::WrongKey),
                "byte {} mask {:#x}: {:?}", index, mask, err.kind()
            );
        });
        // Truncated or extended blobs too.
        for len in 0..blob.len() {
            assert_eq!(
                kind(rt.block_on(kms.decrypt(&blob[..len], &c, &id))),
                KmsErrorKind::InvalidCiphertext
            );
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert_eq!(
            kind(rt.block_on(kms.decrypt(&longer, &c, &id))),
            KmsErrorKind::InvalidCiphertext
        );
        rt.block_on(kms.decrypt(&blob, &c, &id)).unwrap();
    }

    #[test]
    fn arbitrary_bytes_never_decrypt() {
        let (_tmp, kms, id, c, blob, rt) = fixture();
        let prefix = blob[..46].to_vec();
        proptest!(ProptestConfig::with_cases(256), |(tail in proptest::collection::vec(any::<u8>(), 0..200), raw in proptest::collection::vec(any::<u8>(), 0..200))| {
            // Random bytes, and random bytes after a valid header.
            for candidate in [raw.clone(), [prefix.as_slice(), &tail].concat()] {
                let err = rt.block_on(kms.decrypt(&candidate, &c, &id)).unwrap_err();
                prop_assert!(matches!(err.kind(), KmsErrorKind::InvalidCiphertext | KmsErrorKind::WrongKey));
            }
        });
    }
}
