//! LUKS2 `luks2` keyslots: the volume key protected by a passphrase, for break-glass recovery
//! without the KMS. cryptsetup opens the keyslots this module writes, and this module opens the
//! `luks2` keyslots cryptsetup writes (argon2id, argon2i and pbkdf2 key derivation).
//!
//! # The format (as cryptsetup 2.x writes and reads it)
//!
//! A keyslot is a JSON object in the header's `keyslots` section plus an *area*: a run of
//! bytes between the second header copy and the data segment. The object cryptnbd writes:
//!
//! ```text
//! "keyslots": { "0": {
//!     "type": "luks2",
//!     "key_size": 64,                         volume key bytes
//!     "af":   { "type": "luks1", "stripes": 4000, "hash": "sha256" },
//!     "area": { "type": "raw", "offset": "32768", "size": "258048",
//!               "encryption": "aes-xts-plain64", "key_size": 64 },
//!     "kdf":  { "type": "argon2id", "time": 4, "memory": 1048576, "cpus": 4,
//!               "salt": "<32 random bytes, base64>" } } }
//! ```
//!
//! and the keyslot's id is appended to the `keyslots` list of the digest bound to the
//! segment (digest `"0"`): tools only use a keyslot for a segment through that list.
//! Offsets and sizes are decimal strings, the other numbers JSON integers. A pbkdf2 `kdf` is
//! `{ "type": "pbkdf2", "hash": "sha256", "iterations": N, "salt": ... }`. cryptsetup refuses
//! a `kdf` object with any other member (exactly 4 members for pbkdf2, 5 for argon2), a salt
//! that is not 32 bytes, and areas that overlap, start before `2 × hdr_size` or end after
//! `2 × hdr_size + config.keyslots_size`.
//!
//! The area holds, from its first byte:
//!
//! ```text
//!   key_size × 4000 bytes   the AF-split key (256000 bytes for a 64-byte key), encrypted with
//!                           aes-xts-plain64 in 512-byte sectors; the plain64 IV of a sector is
//!                           its index from the start of the area (0, 1, 2, ...), not its
//!                           position in the file. The XTS key (the KEK) is the KDF of the
//!                           passphrase and the salt, area.key_size (64) bytes long.
//!   the rest                unused (the area size is rounded up to 4096 bytes).
//! ```
//!
//! cryptsetup reads exactly `ceil(key_size × 4000 / 512)` sectors and always merges 4000
//! stripes, whatever `af.stripes` says; this module only accepts `stripes: 4000`.
//!
//! # The anti-forensic splitter (LUKS1 AF, cryptsetup `lib/luks1/af.c`)
//!
//! `split(K)` with `n` stripes of `|K|` bytes: stripes `s_0 .. s_{n-2}` are random; with
//! `d_0 = 0` and `d_{i+1} = H(d_i XOR s_i)`, the last stripe is `s_{n-1} = d_{n-1} XOR K`.
//! `merge` recomputes `d_{n-1}` from the first `n-1` stripes and XORs it into the last.
//! `H` ("diffuse") hashes the block in digest-sized pieces: piece `j` becomes the first
//! `len(piece)` bytes of `hash(be32(j) || piece)`; a short last piece is hashed the same way
//! and truncated. Destroying any byte of the area makes the key unrecoverable.
//!
//! # Crash safety
//!
//! Adding writes and syncs the area first, then both header copies: a crash before the header
//! write leaves the old header, and the area bytes unreferenced. Removing writes the header
//! first, then overwrites the area with random bytes and syncs.
//!
//! Key material (the volume key, the KEK, the split material) lives only in [`Zeroizing`]
//! buffers; errors and `Debug` output never hold key bytes.

use std::path::Path;

use aws_lc_rs::digest;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value, json};
use store::BackingStore;
use zeroize::Zeroizing;

use crate::error::{VolumeError, VolumeErrorKind};
use crate::header::{self, HeaderSet};
use crate::luks2::{self, CIPHER, HeaderError, Metadata};
use crate::token::TOKEN_TYPE;
use crate::xts::{XTS_KEY_LEN, XtsCipher};

/// Stripes of the AF splitter. cryptsetup always uses 4000 (`LUKS_STRIPES`) for LUKS2 keyslots.
pub const AF_STRIPES: usize = 4000;
/// Hash of the AF splitter in keyslots cryptnbd writes.
const AF_HASH: AfHash = AfHash::Sha256;
/// Salt length of keyslot KDFs; cryptsetup refuses any other (`LUKS_SALTSIZE`).
pub const KDF_SALT_LEN: usize = 32;
/// Keyslot ids LUKS2 allows: `0 .. LUKS2_KEYSLOTS_MAX`.
pub const MAX_KEYSLOTS: u32 = 32;
/// Keyslot areas start and end on this boundary (cryptsetup's allocator assumes it).
const AREA_ALIGN: u64 = 4096;
/// The keyslot area is encrypted in sectors of this size whatever the data sector size.
const AREA_SECTOR: usize = 512;
/// Largest volume key a keyslot may claim to hold (a bound for hostile headers).
const MAX_KEY_SIZE: usize = 512;
/// Largest argon2 memory cost accepted, in KiB: cryptsetup's own limit (4 GiB).
const MAX_ARGON2_MEMORY_KIB: u32 = 4 * 1024 * 1024;
/// Largest argon2 lane count accepted when writing: cryptsetup's limit.
const MAX_ARGON2_PARALLEL: u32 = 4;
/// Smallest argon2 time cost cryptsetup accepts when it is given one (`--pbkdf-force-iterations`).
const MIN_ARGON2_TIME: u32 = 4;
/// Smallest argon2 memory cost cryptsetup accepts, in KiB.
const MIN_ARGON2_MEMORY_KIB: u32 = 32;

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// argon2id cost parameters of a new keyslot (the `kdf` object's `time`, `memory`, `cpus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Passes over the memory (`time`); cryptsetup accepts no fewer than 4.
    pub time: u32,
    /// Memory cost in KiB (`memory`), 32 KiB to 4 GiB as cryptsetup allows.
    pub memory_kib: u32,
    /// Lanes (`cpus`), 1 to 4 as cryptsetup allows. cryptsetup computes the lanes on
    /// parallel threads; this crate computes them one after another, so for it more lanes
    /// bring no speed.
    pub parallel: u32,
}

impl Default for Argon2Params {
    /// Strong parameters close to what cryptsetup picks for a new LUKS2 keyslot: 1 GiB of
    /// memory and 4 lanes (cryptsetup's `DEFAULT_LUKS2_MEMORY_KB` and
    /// `DEFAULT_LUKS2_PARALLEL_THREADS`), lanes capped by the CPUs present, and 4 passes
    /// (cryptsetup's minimum time cost, which its 2-second benchmark reaches at 1 GiB on a
    /// fast machine). The passphrase is the only secret between a stolen volume file and its
    /// data, so memory-hard guessing must be expensive.
    ///
    /// The memory is capped at a quarter of the physical memory (not below 64 MiB): the
    /// keyslot is opened during a recovery, possibly on a smaller machine, and cryptsetup
    /// itself never uses more than half. With these values one derivation (so adding a
    /// keyslot, or trying one) takes about 7 s in a release build on a 2-core test machine
    /// (1 GiB, 2 lanes, one after another), which a break-glass procedure can afford.
    fn default() -> Self {
        const GIB_KIB: u64 = 1024 * 1024;
        const FLOOR_KIB: u64 = 64 * 1024;
        let memory =
            physical_memory_kib().map_or(GIB_KIB, |phys| (phys / 4).clamp(FLOOR_KIB, GIB_KIB));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            time: MIN_ARGON2_TIME,
            // Lossless: memory <= 1 GiB in KiB, which fits in u32.
            memory_kib: memory as u32,
            // Lossless: at most 4.
            parallel: cpus.min(MAX_ARGON2_PARALLEL as usize) as u32,
        }
    }
}

impl Argon2Params {
    /// Cheap parameters (4 passes, `memory_kib`, 1 lane) for tests: they protect nothing.
    pub const fn for_tests(memory_kib: u32) -> Self {
        Self {
            time: MIN_ARGON2_TIME,
            memory_kib,
            parallel: 1,
        }
    }

    /// Checks the parameters against the limits cryptsetup enforces when it makes a keyslot.
    fn validate(&self) -> Result<(), String> {
        if self.time < MIN_ARGON2_TIME {
            return Err(format!(
                "argon2 time cost {} is below cryptsetup's minimum of {MIN_ARGON2_TIME}",
                self.time
            ));
        }
        if !(1..=MAX_ARGON2_PARALLEL).contains(&self.parallel) {
            return Err(format!(
                "argon2 parallelism {} is outside cryptsetup's 1..={MAX_ARGON2_PARALLEL}",
                self.parallel
            ));
        }
        let min_memory = MIN_ARGON2_MEMORY_KIB.max(8 * self.parallel);
        if !(min_memory..=MAX_ARGON2_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(format!(
                "argon2 memory cost {} KiB is outside {min_memory}..={MAX_ARGON2_MEMORY_KIB} KiB",
                self.memory_kib
            ));
        }
        Ok(())
    }
}

/// `MemTotal` of /proc/meminfo in KiB, if readable.
fn physical_memory_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// The AF splitter (pure)
// ---------------------------------------------------------------------------------------------

/// Hash of the AF splitter's diffusion (the keyslot's `af.hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfHash {
    /// `sha1` (keyslots converted from LUKS1).
    Sha1,
    /// `sha256`, cryptsetup's default and what cryptnbd writes.
    Sha256,
    /// `sha384`.
    Sha384,
    /// `sha512`.
    Sha512,
}

impl AfHash {
    /// The hash named `name` as LUKS2 headers spell it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha1" => Some(Self::Sha1),
            "sha256" => Some(Self::Sha256),
            "sha384" => Some(Self::Sha384),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    /// The name LUKS2 headers use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    fn algorithm(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Self::Sha256 => &digest::SHA256,
            Self::Sha384 => &digest::SHA384,
            Self::Sha512 => &digest::SHA512,
        }
    }
}

/// The AF "diffuse" step, in place: piece `j` of the block (digest-sized, the last one may be
/// shorter) becomes the first bytes of `hash(be32(j) || piece)`.
///
/// The digest values are copies of key-dependent material that aws-lc's `Digest` does not
/// wipe; they live on the stack for the duration of one call.
fn diffuse(block: &mut [u8], hash: AfHash) {
    let alg = hash.algorithm();
    for (j, piece) in block.chunks_mut(alg.output_len()).enumerate() {
        let mut ctx = digest::Context::new(alg);
        // Lossless: a block is at most MAX_KEY_SIZE bytes, so j < 2^32.
        ctx.update(&(j as u32).to_be_bytes());
        ctx.update(piece);
        let d = ctx.finish();
        let len = piece.len();
        piece.copy_from_slice(&d.as_ref()[..len]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// Splits `key` into `stripes` stripes of `key.len()` bytes (`key.len() × stripes` bytes in
/// all), taking the random stripes from `fill`. [`af_merge`] of the result gives `key` back.
///
/// Fails (`InvalidArgument`) unless `stripes >= 1` and `1 <= key.len() <= 512`, and with
/// whatever `fill` fails with.
pub fn af_split(
    key: &[u8],
    stripes: usize,
    hash: AfHash,
    fill: impl FnOnce(&mut [u8]) -> Result<(), VolumeError>,
) -> Result<Zeroizing<Vec<u8>>, VolumeError> {
    let bs = key.len();
    if stripes == 0 || bs == 0 || bs > MAX_KEY_SIZE {
        return Err(VolumeError::new(
            VolumeErrorKind::InvalidArgument,
            format!("cannot AF-split a {bs}-byte key into {stripes} stripes"),
        ));
    }
    let mut out = Zeroizing::new(vec![0u8; bs * stripes]);
    let (random, last) = out.split_at_mut(bs * (stripes - 1));
    fill(random)?;
    let mut acc = Zeroizing::new(vec![0u8; bs]);
    for stripe in random.chunks_exact(bs) {
        xor_into(&mut acc, stripe);
        diffuse(&mut acc, hash);
    }
    xor_into(&mut acc, key);
    last.copy_from_slice(&acc);
    Ok(out)
}

/// Merges `stripes` stripes of `key_size` bytes from the start of `material` back into the
/// key (cryptsetup's `AF_merge`). `None` when `material` is too short or the sizes are 0.
pub fn af_merge(
    material: &[u8],
    key_size: usize,
    stripes: usize,
    hash: AfHash,
) -> Option<Zeroizing<Vec<u8>>> {
    if key_size == 0 || stripes == 0 || material.len() < key_size.checked_mul(stripes)? {
        return None;
    }
    let mut acc = Zeroizing::new(vec![0u8; key_size]);
    let (head, tail) = material.split_at(key_size * (stripes - 1));
    for stripe in head.chunks_exact(key_size) {
        xor_into(&mut acc, stripe);
        diffuse(&mut acc, hash);
    }
    xor_into(&mut acc, &tail[..key_size]);
    Some(acc)
}

/// Bytes of the encrypted AF material of a `key_size`-byte key: whole 512-byte sectors
/// (cryptsetup's `AF_split_sectors × 512`).
fn af_material_len(key_size: usize) -> usize {
    (key_size * AF_STRIPES).div_ceil(AREA_SECTOR) * AREA_SECTOR
}

/// Size of the area cryptsetup allocates for a `key_size`-byte key: the AF material rounded
/// up to 4096 bytes (258048 for 64 bytes).
pub fn area_size_for(key_size: usize) -> u64 {
    ((key_size * AF_STRIPES) as u64).div_ceil(AREA_ALIGN) * AREA_ALIGN
}

// ---------------------------------------------------------------------------------------------
// The keyslot JSON (pure)
// ---------------------------------------------------------------------------------------------

/// How a keyslot turns the passphrase into the KEK.
#[derive(Clone, PartialEq, Eq)]
enum Kdf {
    Pbkdf2 {
        hash: aws_lc_rs::pbkdf2::Algorithm,
        iterations: std::num::NonZeroU32,
        salt: Vec<u8>,
    },
    Argon2 {
        algorithm: argon2::Algorithm,
        params: argon2::Params,
        salt: Vec<u8>,
    },
}

impl std::fmt::Debug for Kdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The salt is not secret, but nothing here needs it shown.
        match self {
            Self::Pbkdf2 { iterations, .. } => f
                .debug_struct("Pbkdf2")
                .field("iterations", iterations)
                .finish_non_exhaustive(),
            Self::Argon2 {
                algorithm, params, ..
            } => f
                .debug_struct("Argon2")
                .field("algorithm", algorithm)
                .field("time", &params.t_cost())
                .field("memory_kib", &params.m_cost())
                .field("parallel", &params.p_cost())
                .finish(),
        }
    }
}

impl Kdf {
    /// Derives `out.len()` bytes of KEK from `passphrase`.
    fn derive(&self, passphrase: &[u8], out: &mut [u8]) -> Result<(), String> {
        match self {
            Self::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => {
                aws_lc_rs::pbkdf2::derive(*hash, *iterations, salt, passphrase, out);
                Ok(())
            }
            Self::Argon2 {
                algorithm,
                params,
                salt,
            } => argon2::Argon2::new(*algorithm, argon2::Version::V0x13, params.clone())
                .hash_password_into(passphrase, salt, out)
                .map_err(|e| format!("argon2 failed: {e}")),
        }
    }
}

/// A `luks2` keyslot this module can open, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LuksKeyslot {
    /// Bytes of the key it holds.
    key_size: usize,
    af_hash: AfHash,
    area_offset: u64,
    area_size: u64,
    kdf: Kdf,
    /// cryptsetup's `priority`: 0 = ignore unless named, 1 = normal, 2 = try first.
    priority: u8,
}

fn field<'a>(obj: &'a Value, name: &str, what: &str) -> Result<&'a Value, HeaderError> {
    obj.get(name)
        .ok_or_else(|| HeaderError::Json(format!("{what}: '{name}' is missing")))
}

fn int_field(obj: &Value, name: &str, what: &str) -> Result<u64, HeaderError> {
    field(obj, name, what)?
        .as_u64()
        .ok_or_else(|| HeaderError::Json(format!("{what}: '{name}' is not a non-negative integer")))
}

fn str_field<'a>(obj: &'a Value, name: &str, what: &str) -> Result<&'a str, HeaderError> {
    field(obj, name, what)?
        .as_str()
        .ok_or_else(|| HeaderError::Json(format!("{what}: '{name}' is not a string")))
}

fn u64_text_field(obj: &Value, name: &str, what: &str) -> Result<u64, HeaderError> {
    str_field(obj, name, what)?
        .parse()
        .map_err(|_| HeaderError::Json(format!("{what}: '{name}' is not a decimal string")))
}

fn salt_field(obj: &Value, what: &str) -> Result<Vec<u8>, HeaderError> {
    let salt = base64::engine::general_purpose::STANDARD
        .decode(str_field(obj, "salt", what)?)
        .map_err(|_| HeaderError::Json(format!("{what}: the salt is not base64")))?;
    if salt.len() != KDF_SALT_LEN {
        return Err(HeaderError::Json(format!(
            "{what}: the salt has {} bytes instead of {KDF_SALT_LEN}",
            salt.len()
        )));
    }
    Ok(salt)
}

/// The area (`offset`, `size`) of any keyslot, whatever its type.
fn keyslot_area(keyslot: &Value) -> Result<(u64, u64), HeaderError> {
    let what = "keyslot area";
    let area = field(keyslot, "area", "keyslot")?;
    let offset = u64_text_field(area, "offset", what)?;
    let size = u64_text_field(area, "size", what)?;
    if size == 0 || offset.checked_add(size).is_none() {
        return Err(HeaderError::Json(format!(
            "{what}: offset {offset} and size {size} are invalid"
        )));
    }
    Ok((offset, size))
}

fn parse_kdf(kdf: &Value) -> Result<Kdf, HeaderError> {
    let what = "keyslot kdf";
    match str_field(kdf, "type", what)? {
        "pbkdf2" => {
            let hash = match str_field(kdf, "hash", what)? {
                "sha1" => aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA1,
                "sha256" => aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256,
                "sha384" => aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA384,
                "sha512" => aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA512,
                other => {
                    return Err(HeaderError::Unsupported(format!(
                        "pbkdf2 with hash '{other}'"
                    )));
                }
            };
            let iterations = u32::try_from(int_field(kdf, "iterations", what)?)
                .ok()
                .and_then(std::num::NonZeroU32::new)
                .ok_or_else(|| HeaderError::Json(format!("{what}: invalid pbkdf2 iterations")))?;
            Ok(Kdf::Pbkdf2 {
                hash,
                iterations,
                salt: salt_field(kdf, what)?,
            })
        }
        t @ ("argon2i" | "argon2id") => {
            let algorithm = if t == "argon2i" {
                argon2::Algorithm::Argon2i
            } else {
                argon2::Algorithm::Argon2id
            };
            let int = |name| {
                u32::try_from(int_field(kdf, name, what)?)
                    .map_err(|_| HeaderError::Json(format!("{what}: '{name}' is too large")))
            };
            let (time, memory, cpus) = (int("time")?, int("memory")?, int("cpus")?);
            // A bound for hostile headers: never allocate more than cryptsetup would.
            if memory > MAX_ARGON2_MEMORY_KIB {
                return Err(HeaderError::Unsupported(format!(
                    "an argon2 memory cost of {memory} KiB (more than cryptsetup's {MAX_ARGON2_MEMORY_KIB})"
                )));
            }
            let params =
                argon2::Params::new(memory, time, cpus, Some(XTS_KEY_LEN)).map_err(|e| {
                    HeaderError::Json(format!(
                        "{what}: argon2 parameters time {time}, memory {memory}, cpus {cpus}: {e}"
                    ))
                })?;
            Ok(Kdf::Argon2 {
                algorithm,
                params,
                salt: salt_field(kdf, what)?,
            })
        }
        other => Err(HeaderError::Unsupported(format!(
            "key derivation '{other}'"
        ))),
    }
}

/// Decodes and checks a keyslot object for opening. `Unsupported` for keyslots of other
/// kinds (reencryption keyslots, other ciphers), `Json` for damaged ones.
fn parse_keyslot(keyslot: &Value) -> Result<LuksKeyslot, HeaderError> {
    let what = "keyslot";
    if !keyslot.is_object() {
        return Err(HeaderError::Json("a keyslot is not a JSON object".into()));
    }
    let kind = str_field(keyslot, "type", what)?;
    if kind != "luks2" {
        return Err(HeaderError::Unsupported(format!("keyslot type '{kind}'")));
    }
    let key_size = usize::try_from(int_field(keyslot, "key_size", what)?)
        .ok()
        .filter(|k| (1..=MAX_KEY_SIZE).contains(k))
        .ok_or_else(|| HeaderError::Json(format!("{what}: invalid key_size")))?;

    let af = field(keyslot, "af", what)?;
    let af_type = str_field(af, "type", "keyslot af")?;
    if af_type != "luks1" {
        return Err(HeaderError::Unsupported(format!("AF type '{af_type}'")));
    }
    let stripes = int_field(af, "stripes", "keyslot af")?;
    if stripes != AF_STRIPES as u64 {
        return Err(HeaderError::Unsupported(format!(
            "{stripes} AF stripes (LUKS2 uses {AF_STRIPES})"
        )));
    }
    let hash_name = str_field(af, "hash", "keyslot af")?;
    let af_hash = AfHash::from_name(hash_name)
        .ok_or_else(|| HeaderError::Unsupported(format!("AF hash '{hash_name}'")))?;

    let area = field(keyslot, "area", what)?;
    let area_type = str_field(area, "type", "keyslot area")?;
    if area_type != "raw" {
        return Err(HeaderError::Unsupported(format!("area type '{area_type}'")));
    }
    let encryption = str_field(area, "encryption", "keyslot area")?;
    let area_key_size = int_field(area, "key_size", "keyslot area")?;
    if encryption != CIPHER || area_key_size != XTS_KEY_LEN as u64 {
        return Err(HeaderError::Unsupported(format!(
            "keyslot encryption {encryption} with a {area_key_size}-byte key (cryptnbd implements {CIPHER} with {XTS_KEY_LEN})"
        )));
    }
    let (area_offset, area_size) = keyslot_area(keyslot)?;
    if area_offset % AREA_SECTOR as u64 != 0 || area_size < af_material_len(key_size) as u64 {
        return Err(HeaderError::Json(format!(
            "{what}: the area at {area_offset} of {area_size} bytes is misaligned or too small"
        )));
    }
    let kdf = parse_kdf(field(keyslot, "kdf", what)?)?;
    let priority = match keyslot.get("priority") {
        None => 1,
        Some(p) => p
            .as_u64()
            .filter(|p| *p <= 2)
            .ok_or_else(|| HeaderError::Json(format!("{what}: invalid priority")))?
            as u8,
    };
    Ok(LuksKeyslot {
        key_size,
        af_hash,
        area_offset,
        area_size,
        kdf,
        priority,
    })
}

/// The keyslot object cryptnbd writes, in cryptsetup's member order.
fn keyslot_json(
    key_size: usize,
    area_offset: u64,
    area_size: u64,
    params: &Argon2Params,
    salt: &[u8],
) -> Map<String, Value> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut keyslot = Map::new();
    keyslot.insert("type".into(), json!("luks2"));
    keyslot.insert("key_size".into(), json!(key_size));
    keyslot.insert(
        "af".into(),
        json!({ "type": "luks1", "stripes": AF_STRIPES, "hash": AF_HASH.name() }),
    );
    keyslot.insert(
        "area".into(),
        json!({
            "type": "raw",
            "offset": area_offset.to_string(),
            "size": area_size.to_string(),
            "encryption": CIPHER,
            "key_size": XTS_KEY_LEN,
        }),
    );
    keyslot.insert(
        "kdf".into(),
        json!({
            "type": "argon2id",
            "time": params.time,
            "memory": params.memory_kib,
            "cpus": params.parallel,
            "salt": b64.encode(salt),
        }),
    );
    keyslot
}

/// Where keyslot areas may lie: `[2 × hdr_size, min(2 × hdr_size + keyslots_size, data))`.
fn area_bounds(md: &Metadata, data_offset: u64) -> Result<(u64, u64), HeaderError> {
    let start = md
        .hdr_size()?
        .checked_mul(2)
        .ok_or_else(|| HeaderError::Json("config.json_size is too large".into()))?;
    let end = start
        .checked_add(md.keyslots_size()?)
        .ok_or_else(|| HeaderError::Json("config.keyslots_size is too large".into()))?
        .min(data_offset);
    Ok((start, end))
}

/// The lowest 4096-aligned offset in `[start, end)` where `size` bytes overlap none of
/// `used` (offset, size) areas, as cryptsetup's allocator picks it; `None` if nothing fits.
fn find_area(used: &[(u64, u64)], start: u64, end: u64, size: u64) -> Option<u64> {
    let mut used: Vec<(u64, u64)> = used.to_vec();
    used.sort_unstable();
    let mut candidate = start.div_ceil(AREA_ALIGN).checked_mul(AREA_ALIGN)?;
    for &(off, len) in &used {
        let area_end = off.saturating_add(len);
        if area_end <= candidate {
            continue;
        }
        if candidate.checked_add(size)? <= off {
            break;
        }
        candidate = area_end.div_ceil(AREA_ALIGN).checked_mul(AREA_ALIGN)?;
    }
    (candidate.checked_add(size)? <= end).then_some(candidate)
}

// ---------------------------------------------------------------------------------------------
// What inspect shows
// ---------------------------------------------------------------------------------------------

/// One keyslot as `inspect` shows it (no salt, no key material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyslotInfo {
    /// Keyslot id.
    pub id: u32,
    /// Keyslot type (`luks2`, or `reencrypt` during a cryptsetup reencryption).
    pub keyslot_type: String,
    /// Key derivation (`argon2id`, `argon2i`, `pbkdf2`), if stated.
    pub kdf: Option<String>,
    /// Bytes of the key the keyslot holds, if stated.
    pub key_size: Option<u64>,
    /// Where the keyslot's area starts in the file, if stated.
    pub area_offset: Option<u64>,
    /// Bytes of the keyslot's area, if stated.
    pub area_size: Option<u64>,
    /// True when the segment's digest lists this keyslot, so it unlocks the data.
    pub unlocks_data: bool,
}

/// The keyslots of `meta`, by id. Damaged fields show as `None`; never fails.
pub fn keyslots(meta: &Metadata) -> Vec<KeyslotInfo> {
    let bound = meta
        .segment_digest_id()
        .map(|d| meta.digest_keyslots(&d))
        .unwrap_or_default();
    let mut out: Vec<KeyslotInfo> = meta
        .keyslot_section()
        .iter()
        .filter_map(|(id, ks)| {
            let area = keyslot_area(ks).ok();
            Some(KeyslotInfo {
                id: id.parse().ok()?,
                keyslot_type: ks
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned(),
                kdf: ks
                    .get("kdf")
                    .and_then(|k| k.get("type"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                key_size: ks.get("key_size").and_then(Value::as_u64),
                area_offset: area.map(|a| a.0),
                area_size: area.map(|a| a.1),
                unlocks_data: bound.iter().any(|b| b == id),
            })
        })
        .collect();
    out.sort_by_key(|k| k.id);
    out
}

// ---------------------------------------------------------------------------------------------
// Operations on a volume file
// ---------------------------------------------------------------------------------------------

fn err(kind: VolumeErrorKind, path: &Path, msg: impl std::fmt::Display) -> VolumeError {
    VolumeError::new(kind, format!("{}: {msg}", path.display()))
}

fn header_err(kind: VolumeErrorKind, path: &Path) -> impl Fn(HeaderError) -> VolumeError + '_ {
    move |e| err(kind, path, &e)
}

fn random(buf: &mut [u8]) -> Result<(), VolumeError> {
    aws_lc_rs::rand::fill(buf).map_err(|_| {
        VolumeError::new(
            VolumeErrorKind::Io,
            "the system random number generator failed",
        )
    })
}

fn refuse_requirements(md: &Metadata, path: &Path) -> Result<(), VolumeError> {
    let requirements = md.mandatory_requirements();
    if requirements.is_empty() {
        Ok(())
    } else {
        Err(err(
            VolumeErrorKind::Unsupported,
            path,
            format!(
                "has requirements cryptnbd does not implement ({}): finish or cancel the \
                 operation with the tool that started it",
                requirements.join(", ")
            ),
        ))
    }
}

/// Writes both header copies with `md` and the next seqid.
fn commit(store: &dyn BackingStore, headers: &HeaderSet, md: &Metadata) -> Result<(), VolumeError> {
    let path = store.location();
    let seqid = headers.active.binary.seqid.checked_add(1).ok_or_else(|| {
        err(
            VolumeErrorKind::Corrupt,
            path,
            "the header seqid cannot grow any more",
        )
    })?;
    header::write_headers(store, &headers.active.binary, seqid, md)
}

/// Adds a `luks2` keyslot (argon2id, AF sha256 × 4000, aes-xts-plain64 area) holding
/// `volume_key` under `passphrase`, and returns its id: the lowest free one.
///
/// `file` must be open for reading and writing; this takes its exclusive lock (refusing a
/// volume attached elsewhere with `InUse`), which stays until the file is closed.
/// `volume_key` is first checked against the segment's digest (`WrongKey` otherwise). The
/// area goes in the lowest 4096-aligned gap of the keyslot area; it is written and synced
/// before both header copies are rewritten (seqid + 1) with the keyslot bound to the digest,
/// so a crash leaves either the old header or the new one, never a keyslot without its area.
/// Takes as long as the argon2 derivation (seconds with the default parameters).
pub fn add_recovery_keyslot(
    store: &dyn BackingStore,
    volume_key: &[u8],
    passphrase: &[u8],
    params: &Argon2Params,
) -> Result<u32, VolumeError> {
    let path = store.location();
    params
        .validate()
        .map_err(|m| err(VolumeErrorKind::InvalidArgument, path, m))?;
    let headers = header::read_headers(store)?;
    let md = &headers.active.metadata;
    refuse_requirements(md, path)?;
    let unsupported = header_err(VolumeErrorKind::Unsupported, path);
    let segment = md.crypt_segment().map_err(&unsupported)?;
    let digest = md.segment_digest().map_err(&unsupported)?;
    let digest_id = md.segment_digest_id().map_err(&unsupported)?;
    if volume_key.len() != XTS_KEY_LEN || !digest.verify(volume_key).map_err(&unsupported)? {
        return Err(err(
            VolumeErrorKind::WrongKey,
            path,
            "the volume key does not match the header's digest; no keyslot was added",
        ));
    }

    let id = (0..MAX_KEYSLOTS)
        .find(|id| !md.keyslot_section().contains_key(&id.to_string()))
        .ok_or_else(|| {
            err(
                VolumeErrorKind::NoSpace,
                path,
                format!("has all {MAX_KEYSLOTS} keyslots in use: remove one first"),
            )
        })?;
    let corrupt = header_err(VolumeErrorKind::Corrupt, path);
    let used = md
        .keyslot_section()
        .values()
        .map(keyslot_area)
        .collect::<Result<Vec<_>, _>>()
        .map_err(&corrupt)?;
    let (start, end) = area_bounds(md, segment.offset).map_err(&corrupt)?;
    let area_size = area_size_for(volume_key.len());
    let area_offset = find_area(&used, start, end, area_size).ok_or_else(|| {
        err(
            VolumeErrorKind::NoSpace,
            path,
            format!(
                "has no free {area_size}-byte space left in its keyslot area \
                 ({start}..{end}): remove a keyslot first"
            ),
        )
    })?;

    let mut salt = [0u8; KDF_SALT_LEN];
    random(&mut salt)?;
    let keyslot = keyslot_json(volume_key.len(), area_offset, area_size, params, &salt);
    let new_md = md.with_keyslot(id, keyslot, &digest_id).map_err(&corrupt)?;
    // Encode once now so that a JSON area too small fails before anything is written.
    luks2::encode_copy(&headers.active.binary, &new_md).map_err(|e| {
        err(
            VolumeErrorKind::NoSpace,
            path,
            format!("the header has no room for another keyslot ({e})"),
        )
    })?;

    // The area: AF-split key material encrypted under the KEK, then random bytes to the end.
    let kdf = Kdf::Argon2 {
        algorithm: argon2::Algorithm::Argon2id,
        params: argon2::Params::new(
            params.memory_kib,
            params.time,
            params.parallel,
            Some(XTS_KEY_LEN),
        )
        .map_err(|e| {
            err(
                VolumeErrorKind::InvalidArgument,
                path,
                format!("argon2: {e}"),
            )
        })?,
        salt: salt.to_vec(),
    };
    let mut kek = Zeroizing::new([0u8; XTS_KEY_LEN]);
    kdf.derive(passphrase, kek.as_mut_slice())
        .map_err(|m| err(VolumeErrorKind::InvalidArgument, path, m))?;
    let cipher = XtsCipher::new(kek.as_slice()).map_err(|e| {
        err(
            VolumeErrorKind::Io,
            path,
            format!("unusable derived key ({e}); retry"),
        )
    })?;
    // Lossless: area_size_for(64) is 258048.
    let mut area = Zeroizing::new(vec![0u8; area_size as usize]);
    let material_len = af_material_len(volume_key.len());
    {
        let split = af_split(volume_key, AF_STRIPES, AF_HASH, random)?;
        area[..split.len()].copy_from_slice(&split);
    }
    cipher.encrypt_sectors(&mut area[..material_len], AREA_SECTOR, 0);
    random(&mut area[material_len..])?;
    store
        .write_at(&area, area_offset)
        .map_err(|e| VolumeError::io(path, "writing the keyslot area", e))?;
    store
        .flush()
        .map_err(|e| VolumeError::io(path, "syncing the keyslot area", e))?;

    commit(store, &headers, &new_md)?;
    tracing::info!(volume = %path.display(), keyslot = id, area_offset, "recovery keyslot added");
    Ok(id)
}

/// Removes keyslot `id`: its JSON object and every reference to it (digests, tokens) go
/// first (both header copies rewritten, seqid + 1), then its area is overwritten with random
/// bytes and synced, so the key it held cannot be recovered from the file. A crash between
/// the two leaves the old key material in an area no keyslot refers to, until the area is
/// reused. An area that lies outside the keyslot area or overlaps another keyslot's is not
/// overwritten (a warning is logged): a damaged header must never make this destroy data.
///
/// `NotFound` if there is no such keyslot. Refuses (`InvalidArgument`) to remove the last
/// keyslot of a volume without a `cryptnbd-kms` token: that would leave no way to open it.
/// Takes the exclusive lock like [`add_recovery_keyslot`].
pub fn remove_keyslot(store: &dyn BackingStore, id: u32) -> Result<(), VolumeError> {
    let path = store.location();
    let headers = header::read_headers(store)?;
    let md = &headers.active.metadata;
    refuse_requirements(md, path)?;
    let key = id.to_string();
    let Some(keyslot) = md.keyslot_section().get(&key) else {
        return Err(err(
            VolumeErrorKind::NotFound,
            path,
            format!("has no keyslot {id}"),
        ));
    };
    if md.keyslot_section().len() == 1 && md.token(TOKEN_TYPE).is_none() {
        return Err(err(
            VolumeErrorKind::InvalidArgument,
            path,
            format!(
                "keyslot {id} is the only way to open this volume (it has no {TOKEN_TYPE} \
                 token); it was not removed"
            ),
        ));
    }
    // Wipe only an area that lies inside the keyslot area and overlaps no other keyslot's:
    // a damaged offset must never make this overwrite data or another key.
    let wipe = keyslot_area(keyslot).ok().filter(|&(off, len)| {
        let bounds = md
            .crypt_segment()
            .ok()
            .and_then(|s| area_bounds(md, s.offset).ok());
        let inside = bounds.is_some_and(|(start, end)| off >= start && off + len <= end);
        let overlaps = md
            .keyslot_section()
            .iter()
            .filter(|(other, _)| **other != key)
            .filter_map(|(_, ks)| keyslot_area(ks).ok())
            .any(|(o, l)| off < o.saturating_add(l) && o < off + len);
        inside && !overlaps
    });
    let corrupt = header_err(VolumeErrorKind::Corrupt, path);
    let new_md = md.without_keyslot(id).map_err(&corrupt)?;
    commit(store, &headers, &new_md)?;

    match wipe {
        Some((off, len)) => {
            let len = usize::try_from(len).map_err(|_| {
                err(
                    VolumeErrorKind::Corrupt,
                    path,
                    "the keyslot area is too large",
                )
            })?;
            let mut noise = vec![0u8; len];
            random(&mut noise)?;
            store
                .write_at(&noise, off)
                .map_err(|e| VolumeError::io(path, "overwriting the keyslot area", e))?;
            store
                .flush()
                .map_err(|e| VolumeError::io(path, "syncing the keyslot area", e))?;
        }
        None => tracing::warn!(
            volume = %path.display(),
            keyslot = id,
            "the removed keyslot's area is invalid or shared; it was not overwritten"
        ),
    }
    tracing::info!(volume = %path.display(), keyslot = id, "keyslot removed");
    Ok(())
}

/// Opens keyslot `ks` with `passphrase`: the key it holds, whether or not it is the right one.
fn open_one(
    store: &dyn BackingStore,
    ks: &LuksKeyslot,
    passphrase: &[u8],
    file_len: u64,
    bounds: (u64, u64),
) -> Result<Zeroizing<Vec<u8>>, String> {
    let material_len = af_material_len(ks.key_size);
    let (start, end) = bounds;
    if ks.area_offset < start
        || ks.area_offset.saturating_add(ks.area_size) > end
        || ks.area_offset.saturating_add(material_len as u64) > file_len
    {
        return Err(format!(
            "its area ({} bytes at {}) lies outside the keyslot area or the file",
            ks.area_size, ks.area_offset
        ));
    }
    let mut kek = Zeroizing::new([0u8; XTS_KEY_LEN]);
    ks.kdf.derive(passphrase, kek.as_mut_slice())?;
    let cipher =
        XtsCipher::new(kek.as_slice()).map_err(|e| format!("unusable derived key ({e})"))?;
    let mut material = Zeroizing::new(vec![0u8; material_len]);
    store
        .read_at(&mut material, ks.area_offset)
        .map_err(|e| format!("cannot read its area: {e}"))?;
    cipher.decrypt_sectors(&mut material, AREA_SECTOR, 0);
    af_merge(&material, ks.key_size, AF_STRIPES, ks.af_hash)
        .ok_or_else(|| "its area is too small".to_owned())
}

/// The volume key, from the first keyslot that `passphrase` opens.
///
/// Tries the `luks2` keyslots bound to the segment's digest (argon2id, argon2i or pbkdf2;
/// priority 2 first, priority 0 never, as cryptsetup does) and returns the key that matches
/// the digest. `WrongKey` when none opens with this passphrase; `NotFound` when the volume
/// has no keyslot; `Unsupported` when it has only keyslots this crate cannot open. Reads only:
/// takes no lock. Each keyslot tried costs one key derivation (seconds with strong argon2
/// parameters).
pub fn unlock_keyslot(
    store: &dyn BackingStore,
    passphrase: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VolumeError> {
    let path = store.location();
    let headers = header::read_headers(store)?;
    let md = &headers.active.metadata;
    let unsupported = header_err(VolumeErrorKind::Unsupported, path);
    let segment = md.crypt_segment().map_err(&unsupported)?;
    let digest = md.segment_digest().map_err(&unsupported)?;
    let digest_id = md.segment_digest_id().map_err(&unsupported)?;
    let bounds =
        area_bounds(md, segment.offset).map_err(header_err(VolumeErrorKind::Corrupt, path))?;
    let file_len = store
        .len()
        .map_err(|e| VolumeError::io(path, "reading the size", e))?;

    let mut candidates = Vec::new();
    let mut skipped = Vec::new();
    for id in md.digest_keyslots(&digest_id) {
        let Some(value) = md.keyslot_section().get(&id) else {
            continue;
        };
        match parse_keyslot(value) {
            Ok(ks) if ks.priority == 0 => skipped.push(format!("keyslot {id}: priority 'ignore'")),
            Ok(ks) => candidates.push((id, ks)),
            Err(e) => skipped.push(format!("keyslot {id}: {e}")),
        }
    }
    if candidates.is_empty() {
        return Err(if skipped.is_empty() {
            err(
                VolumeErrorKind::NotFound,
                path,
                "has no passphrase keyslot for its data (add one with the volume key)",
            )
        } else {
            err(
                VolumeErrorKind::Unsupported,
                path,
                format!("has no keyslot cryptnbd can open ({})", skipped.join("; ")),
            )
        });
    }
    // Stable sort: priority 2 first, then by id order of the digest's list.
    candidates.sort_by_key(|(_, ks)| std::cmp::Reverse(ks.priority));
    let mut tried = Vec::new();
    for (id, ks) in &candidates {
        match open_one(store, ks, passphrase, file_len, bounds) {
            Ok(key) => {
                if digest.verify(&key).map_err(&unsupported)? {
                    tracing::info!(volume = %path.display(), keyslot = %id, "keyslot opened");
                    return Ok(key);
                }
                tried.push(id.clone());
            }
            Err(reason) => skipped.push(format!("keyslot {id}: {reason}")),
        }
    }
    let mut msg = if tried.is_empty() {
        "no keyslot could be tried".to_owned()
    } else {
        format!(
            "the passphrase opens none of its keyslots (tried {})",
            tried.join(", ")
        )
    };
    if !skipped.is_empty() {
        msg.push_str(&format!("; skipped {}", skipped.join("; ")));
    }
    Err(err(VolumeErrorKind::WrongKey, path, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::file::FileStore;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * 7 + 3) % 256) as u8).collect()
    }

    #[test]
    fn af_split_merge_round_trip() {
        for (key_size, hash) in [
            (64, AfHash::Sha256),
            (64, AfHash::Sha1),
            (32, AfHash::Sha512),
            (40, AfHash::Sha384),
        ] {
            let key: Vec<u8> = (0..key_size).map(|i| i as u8 ^ 0x5a).collect();
            let split = af_split(&key, AF_STRIPES, hash, random).expect("split");
            assert_eq!(split.len(), key_size * AF_STRIPES);
            let merged = af_merge(&split, key_size, AF_STRIPES, hash).expect("merge");
            assert_eq!(merged.as_slice(), key.as_slice(), "{hash:?}");
            // Any damaged byte anywhere makes the key unrecoverable.
            for pos in [0, 1000, split.len() - 1] {
                let mut bad = split.clone();
                bad[pos] ^= 1;
                let merged = af_merge(&bad, key_size, AF_STRIPES, hash).expect("merge");
                assert_ne!(merged.as_slice(), key.as_slice(), "{hash:?} byte {pos}");
            }
        }
        // One stripe is the key itself.
        let one = af_split(b"abc", 1, AfHash::Sha256, random).expect("split");
        assert_eq!(one.as_slice(), b"abc");
    }

    /// Known answers computed by an independent Python implementation (hashlib) of
    /// cryptsetup's AF_merge, which opened a keyslot made by cryptsetup 2.6.1 (pbkdf2 KEK,
    /// Python `cryptography` XTS): the merged key matched the volume key given to
    /// `luksFormat`. Input: byte i of the material is (7i + 3) mod 256.
    #[test]
    fn af_merge_known_answers() {
        let material = pattern(64 * AF_STRIPES);
        for (hash, expected) in [
            (
                AfHash::Sha256,
                "c5768dea55cc0cada0adaa193329476a886eeebc1911528eae334a6aed3bc8b2a315b8cd6e4c15b5922af4848fd79844ff3f12b44383e2ee377f8779b7c306ca",
            ),
            // 64 is not a multiple of 20: exercises the short last piece of diffuse.
            (
                AfHash::Sha1,
                "2bb39c5b7eb8df3155afbfec3f2c729e20b934638a6f4688ca22cead74bb1db5717c0470ac5f2bec69b49c872e80c8914cba83bd9a606bd58feb30d38a877e68",
            ),
            (
                AfHash::Sha512,
                "3bd006382df31846b940d9ec4923c02d46965ae3ee0b2fdfb10c3068c9f22f6348797d2bf305db193e499e5d0ad9dcbf95bdc3c7a766fb5d96a2c08df778dd59",
            ),
        ] {
            let key = af_merge(&material, 64, AF_STRIPES, hash).expect("merge");
            assert_eq!(key.as_slice(), unhex(expected).as_slice(), "{hash:?}");
        }
        let zeros = vec![0u8; 64 * AF_STRIPES];
        assert_eq!(
            af_merge(&zeros, 64, AF_STRIPES, AfHash::Sha256)
                .expect("merge")
                .as_slice(),
            unhex("82566fe92f942f7b30d94683c451103fb7d7dcfe788a7acb9e9a8efc414b67c8c2f9647e8ce65fbf27e165084b62f1cbc867a98b522c6125986ff1c165de96f5").as_slice()
        );
        // A 40-byte block over 3 stripes: one whole sha256 piece and a short one.
        let small: Vec<u8> = (0..120).collect();
        assert_eq!(
            af_merge(&small, 40, 3, AfHash::Sha256)
                .expect("merge")
                .as_slice(),
            unhex(
                "512bb18e314d508ff96bf0476fe763960d7fee88a203f1a8f60786529f022801fa236647e64a8536"
            )
            .as_slice()
        );
        // Too little material, or zero sizes, are refused rather than panicking.
        assert!(af_merge(&small, 40, 4, AfHash::Sha256).is_none());
        assert!(af_merge(&small, 0, 3, AfHash::Sha256).is_none());
        assert!(af_merge(&small, 40, 0, AfHash::Sha256).is_none());
    }

    #[test]
    fn area_sizes_match_cryptsetup() {
        assert_eq!(area_size_for(64), 258_048);
        assert_eq!(af_material_len(64), 256_000);
        assert_eq!(area_size_for(32), 131_072);
        assert_eq!(af_material_len(32), 128_000);
    }

    #[test]
    fn area_allocation_avoids_existing_areas() {
        let (start, end) = (32_768, 16 << 20);
        let size = area_size_for(64);
        // Empty: the first area right after the headers, as cryptsetup puts keyslot 0.
        assert_eq!(find_area(&[], start, end, size), Some(32_768));
        // After cryptsetup's keyslot 0 comes keyslot 1.
        let ks0 = (32_768, size);
        assert_eq!(find_area(&[ks0], start, end, size), Some(32_768 + size));
        // Holes too small are skipped (4096 bytes after ks0, 8192 after the next one), a
        // hole big enough is used; unsorted input is fine.
        let second = (32_768 + size + 4096, size);
        let ks_far = (second.0 + size + 8192, size);
        assert_eq!(
            find_area(&[ks_far, ks0, second], start, end, size),
            Some(ks_far.0 + size)
        );
        let after0 = 32_768 + size;
        assert_eq!(find_area(&[ks_far, ks0], start, end, size), Some(after0));
        // A misaligned foreign area pushes the next one to a 4096 boundary.
        assert_eq!(
            find_area(&[(32_768, 1000)], start, end, size),
            Some(32_768 + 4096)
        );
        // An area overlapping the start of the range.
        assert_eq!(find_area(&[(0, 40_000)], start, end, size), Some(40_960));
        // Nothing fits.
        assert_eq!(find_area(&[], start, start + size - 1, size), None);
        assert_eq!(find_area(&[(start, end - start)], start, end, size), None);
        assert_eq!(
            find_area(&[(u64::MAX - 5, 5)], start, end, size),
            Some(32_768)
        );
        // Every result overlaps nothing and stays inside the bounds.
        let mut used = vec![];
        while let Some(off) = find_area(&used, start, end, size) {
            assert_eq!(off % AREA_ALIGN, 0);
            assert!(off + size <= end);
            assert!(used.iter().all(|&(o, l)| off + size <= o || o + l <= off));
            used.push((off, size));
        }
        assert_eq!(used.len() as u64, (end - start) / size);
    }

    fn sample_keyslot() -> Value {
        Value::Object(keyslot_json(
            64,
            32_768,
            area_size_for(64),
            &Argon2Params::for_tests(64),
            &[9u8; KDF_SALT_LEN],
        ))
    }

    #[test]
    fn our_keyslot_json_parses_back() {
        let v = sample_keyslot();
        assert_eq!(v["kdf"].as_object().map(Map::len), Some(5), "{v}");
        assert_eq!(v["area"]["offset"], "32768");
        assert_eq!(v["area"]["size"], "258048");
        let ks = parse_keyslot(&v).expect("parse");
        assert_eq!(ks.key_size, 64);
        assert_eq!(ks.af_hash, AfHash::Sha256);
        assert_eq!((ks.area_offset, ks.area_size), (32_768, 258_048));
        assert_eq!(ks.priority, 1);
        assert!(matches!(
            ks.kdf,
            Kdf::Argon2 {
                algorithm: argon2::Algorithm::Argon2id,
                ..
            }
        ));
        // A cryptsetup pbkdf2 keyslot (as luksDump printed one).
        let mut p = v.clone();
        p["kdf"] = json!({"type": "pbkdf2", "hash": "sha256", "iterations": 1000,
                          "salt": "ZgE2nLvAs+4paO/1BiRM4TPqat6fLTyLH6Bjw4Ph4lE="});
        assert!(matches!(
            parse_keyslot(&p).expect("pbkdf2").kdf,
            Kdf::Pbkdf2 { .. }
        ));
    }

    #[test]
    fn corrupt_keyslots_are_refused_without_panics() {
        let good = sample_keyslot();
        let edits: Vec<(&[&str], Value)> = vec![
            (&["type"], json!("reencrypt")),
            (&["type"], json!(7)),
            (&["key_size"], json!(0)),
            (&["key_size"], json!(-64)),
            (&["key_size"], json!(1_000_000)),
            (&["key_size"], json!("64")),
            (&["af", "type"], json!("luks2")),
            (&["af", "stripes"], json!(2)),
            (&["af", "hash"], json!("whirlpool")),
            (&["af"], json!(null)),
            (&["area", "type"], json!("datashift")),
            (&["area", "offset"], json!(32_768)),
            (&["area", "offset"], json!("32769")),
            (&["area", "offset"], json!("18446744073709551615")),
            (&["area", "size"], json!("4096")),
            (&["area", "size"], json!("0")),
            (&["area", "encryption"], json!("aes-cbc-essiv:sha256")),
            (&["area", "key_size"], json!(32)),
            (&["kdf", "type"], json!("scrypt")),
            (&["kdf", "salt"], json!("!!")),
            (&["kdf", "salt"], json!("AAAA")),
            (&["kdf", "memory"], json!(u64::from(u32::MAX) + 1)),
            (&["kdf", "memory"], json!(8 * 1024 * 1024)),
            (&["kdf", "memory"], json!(1)),
            (&["kdf", "cpus"], json!(0)),
            (&["kdf", "time"], json!(0)),
            (&["kdf", "time"], json!(-1)),
            (&["kdf"], json!([])),
            (&["priority"], json!(7)),
        ];
        for (at, value) in edits {
            let mut v = good.clone();
            let mut slot = &mut v;
            for name in at {
                slot = &mut slot[*name];
            }
            *slot = value.clone();
            assert!(parse_keyslot(&v).is_err(), "{at:?} = {value} was accepted");
        }
        for missing in ["type", "key_size", "af", "area", "kdf"] {
            let mut v = good.clone();
            v.as_object_mut().expect("object").remove(missing);
            assert!(parse_keyslot(&v).is_err(), "without {missing}");
        }
        assert!(parse_keyslot(&json!(null)).is_err());
        assert!(parse_keyslot(&json!("luks2")).is_err());
    }

    proptest::proptest! {
        /// Byte edits of a keyslot's JSON text: whatever still parses as JSON is either
        /// accepted or refused, never a panic, by the parser and by `keyslots`.
        #[test]
        fn mutated_keyslot_json_never_panics(
            edits in proptest::collection::vec((0usize..2000, proptest::prelude::any::<u8>()), 1..6)
        ) {
            let mut text = serde_json::to_vec(&sample_keyslot()).expect("encode");
            let len = text.len();
            for (pos, byte) in edits {
                text[pos % len] = byte;
            }
            if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                let _ = parse_keyslot(&v);
                let _ = keyslot_area(&v);
                let digest = luks2::Pbkdf2Digest::compute(&[7u8; 64]).expect("digest");
                let md = Metadata::new_volume(0x4000, 16 << 20, 1 << 30, 4096, &digest)
                    .expect("md");
                let mut doc = md.value().clone();
                doc["keyslots"]["0"] = v;
                doc["digests"]["0"]["keyslots"] = json!(["0"]);
                if let Ok(md) = Metadata::from_value(doc) {
                    let _ = keyslots(&md);
                }
            }
        }
    }

    #[test]
    fn corrupt_keyslot_sections_do_not_panic_in_keyslots() {
        let digest = luks2::Pbkdf2Digest::compute(&[7u8; 64]).expect("digest");
        let md = Metadata::new_volume(0x4000, 16 << 20, 1 << 30, 4096, &digest).expect("md");
        let md = md
            .with_keyslot(
                0,
                keyslot_json(64, 32_768, 258_048, &Argon2Params::for_tests(64), &[1; 32]),
                "0",
            )
            .expect("with keyslot");
        let info = keyslots(&md);
        assert_eq!(
            info,
            vec![KeyslotInfo {
                id: 0,
                keyslot_type: "luks2".into(),
                kdf: Some("argon2id".into()),
                key_size: Some(64),
                area_offset: Some(32_768),
                area_size: Some(258_048),
                unlocks_data: true,
            }]
        );
        let mut v = md.value().clone();
        v["keyslots"]["3"] = json!({"type": 5, "area": "x"});
        v["keyslots"]["4"] = json!([]);
        let md = Metadata::from_value(v).expect("md");
        let info = keyslots(&md);
        assert_eq!(info.len(), 3);
        assert_eq!(info[1].keyslot_type, "unknown");
        assert_eq!(info[1].area_offset, None);
        assert!(!info[2].unlocks_data);
    }

    #[test]
    fn keyslot_edits_keep_references_consistent() {
        let digest = luks2::Pbkdf2Digest::compute(&[7u8; 64]).expect("digest");
        let md = Metadata::new_volume(0x4000, 16 << 20, 1 << 30, 4096, &digest).expect("md");
        let ks = keyslot_json(64, 32_768, 258_048, &Argon2Params::for_tests(64), &[1; 32]);
        let mut with = md.with_keyslot(1, ks.clone(), "0").expect("add");
        assert_eq!(with.digest_keyslots("0"), vec!["1".to_string()]);
        assert!(md.keyslot_section().is_empty(), "the original is unchanged");
        assert!(
            with.with_keyslot(1, ks.clone(), "0").is_err(),
            "duplicate id"
        );
        assert!(md.with_keyslot(2, ks, "9").is_err(), "missing digest");
        let token = json!({"type": "other", "keyslots": ["1"]});
        with.set_token(3, token.as_object().cloned().expect("object"))
            .expect("token");
        let without = with.without_keyslot(1).expect("remove");
        assert!(without.digest_keyslots("0").is_empty());
        assert!(without.keyslot_section().is_empty());
        assert_eq!(without.value()["tokens"]["3"]["keyslots"], json!([]));
        assert!(without.without_keyslot(1).is_err());
    }

    /// A volume file with our header and no keyslot, the way `Volume::create` lays it out.
    fn volume_file(key: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, FileStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.luks");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create");
        let digest = luks2::Pbkdf2Digest::compute(key).expect("digest");
        let md = Metadata::new_volume(0x4000, 16 << 20, 1 << 20, 4096, &digest).expect("md");
        let uuid = luks2::random_uuid().expect("uuid");
        let bin = luks2::new_binary(true, 0x4000, 1, &uuid).expect("binary");
        let file = FileStore::from_file(file, &path).expect("store");
        header::write_headers(&file, &bin, 1, &md).expect("headers");
        file.set_len((16 << 20) + (1 << 20)).expect("size");
        (dir, path, file)
    }

    #[test]
    fn add_unlock_remove_on_a_file() {
        let key: Vec<u8> = (0..64u8).collect();
        let (_dir, _path, file) = volume_file(&key);
        let params = Argon2Params::for_tests(64);

        // A wrong volume key is refused before anything is written.
        let mut wrong = key.clone();
        wrong[3] ^= 1;
        let e = add_recovery_keyslot(&file, &wrong, b"pass", &params).expect_err("wrong");
        assert_eq!(e.kind(), VolumeErrorKind::WrongKey, "{e}");
        let e = unlock_keyslot(&file, b"pass").expect_err("no keyslot yet");
        assert_eq!(e.kind(), VolumeErrorKind::NotFound, "{e}");

        assert_eq!(
            add_recovery_keyslot(&file, &key, b"pass", &params).expect("add"),
            0
        );
        assert_eq!(
            add_recovery_keyslot(&file, &key, b"other", &params).expect("add"),
            1
        );
        let headers = header::read_headers(&file).expect("headers");
        assert!(headers.healthy());
        assert_eq!(headers.active.binary.seqid, 3);
        let info = keyslots(&headers.active.metadata);
        assert_eq!(info.len(), 2);
        assert_eq!(info[0].area_offset, Some(32_768));
        assert_eq!(info[1].area_offset, Some(32_768 + 258_048));
        assert!(info.iter().all(|k| k.unlocks_data));

        assert_eq!(
            unlock_keyslot(&file, b"pass").expect("unlock").as_slice(),
            key.as_slice()
        );
        assert_eq!(
            unlock_keyslot(&file, b"other").expect("unlock").as_slice(),
            key.as_slice()
        );
        let e = unlock_keyslot(&file, b"nope").expect_err("wrong passphrase");
        assert_eq!(e.kind(), VolumeErrorKind::WrongKey, "{e}");
        assert!(e.to_string().contains("tried 0, 1"), "{e}");

        // Removing keyslot 0 wipes its area and frees its id and space for the next add.
        let mut before = vec![0u8; 258_048];
        file.read_at(&mut before, 32_768).expect("read");
        remove_keyslot(&file, 0).expect("remove");
        let mut after = vec![0u8; 258_048];
        file.read_at(&mut after, 32_768).expect("read");
        assert_ne!(before, after);
        assert_eq!(
            unlock_keyslot(&file, b"pass").expect_err("removed").kind(),
            VolumeErrorKind::WrongKey
        );
        assert_eq!(
            remove_keyslot(&file, 0).expect_err("gone").kind(),
            VolumeErrorKind::NotFound
        );
        assert_eq!(
            add_recovery_keyslot(&file, &key, b"again", &params).expect("add"),
            0
        );
        let md = header::read_headers(&file)
            .expect("headers")
            .active
            .metadata;
        assert_eq!(keyslots(&md)[0].area_offset, Some(32_768));
        // Without a cryptnbd-kms token, the last keyslot stays.
        remove_keyslot(&file, 1).expect("remove 1");
        let e = remove_keyslot(&file, 0).expect_err("last one");
        assert_eq!(e.kind(), VolumeErrorKind::InvalidArgument, "{e}");
        assert_eq!(
            unlock_keyslot(&file, b"again").expect("unlock").as_slice(),
            key.as_slice()
        );
    }

    #[test]
    fn a_damaged_area_or_header_field_is_wrong_key_not_a_panic() {
        let key: Vec<u8> = (100..164u8).collect();
        let (_dir, _path, file) = volume_file(&key);
        add_recovery_keyslot(&file, &key, b"pass", &Argon2Params::for_tests(64)).expect("add");
        let mut byte = [0u8];
        file.read_at(&mut byte, 32_768 + 100_000).expect("read");
        file.write_at(&[byte[0] ^ 0x01], 32_768 + 100_000)
            .expect("damage");
        let e = unlock_keyslot(&file, b"pass").expect_err("damaged area");
        assert_eq!(e.kind(), VolumeErrorKind::WrongKey, "{e}");
        // An area moved outside the keyslot area is skipped with the reason.
        let headers = header::read_headers(&file).expect("headers");
        let mut v = headers.active.metadata.value().clone();
        v["keyslots"]["0"]["area"]["offset"] = json!((16u64 << 20).to_string());
        let md = Metadata::from_value(v).expect("md");
        header::write_headers(&file, &headers.active.binary, 9, &md).expect("write");
        let e = unlock_keyslot(&file, b"pass").expect_err("outside");
        assert_eq!(e.kind(), VolumeErrorKind::WrongKey, "{e}");
        assert!(e.to_string().contains("outside"), "{e}");
        // Removing it does not overwrite the data segment (a second keyslot first, so that
        // the first is not the last).
        file.write_at(&[0xab; 16], 16 << 20).expect("data");
        let second =
            add_recovery_keyslot(&file, &key, b"two", &Argon2Params::for_tests(64)).expect("add");
        assert_eq!(second, 1);
        remove_keyslot(&file, 0).expect("remove");
        let mut data = [0u8; 16];
        file.read_at(&mut data, 16 << 20).expect("read");
        assert_eq!(data, [0xab; 16], "the data segment was overwritten");
        assert_eq!(
            unlock_keyslot(&file, b"two").expect("unlock").as_slice(),
            key.as_slice()
        );
    }

    #[test]
    fn default_params_are_strong_and_valid() {
        let p = Argon2Params::default();
        p.validate().expect("default parameters are valid");
        assert_eq!(p.time, 4);
        assert!(
            p.memory_kib >= 64 * 1024 && p.memory_kib <= 1024 * 1024,
            "{p:?}"
        );
        assert!((1..=4).contains(&p.parallel));
        assert!(Argon2Params::for_tests(64).validate().is_ok());
        assert!(Argon2Params { time: 3, ..p }.validate().is_err());
        assert!(Argon2Params { parallel: 5, ..p }.validate().is_err());
        assert!(
            Argon2Params {
                memory_kib: 16,
                ..p
            }
            .validate()
            .is_err()
        );
        assert!(
            Argon2Params {
                memory_kib: MAX_ARGON2_MEMORY_KIB + 1,
                ..p
            }
            .validate()
            .is_err()
        );
    }
}
