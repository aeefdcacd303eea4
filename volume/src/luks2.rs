//! The LUKS2 header subset cryptnbd reads and writes: a pure codec over byte buffers.
//!
//! A LUKS2 device starts with two copies of the header; each copy is a 4096-byte binary
//! header followed by a JSON area, `hdr_size` bytes in all (16 KiB by default). All integers
//! are big-endian. The binary header (offsets in bytes):
//!
//! ```text
//!   0  magic[6]          "LUKS\xba\xbe" (primary) or "SKUL\xba\xbe" (secondary)
//!   6  version  u16      2
//!   8  hdr_size u64      binary header + JSON area, a power of two 16 KiB..4 MiB
//!  16  seqid    u64      incremented on every update; both copies carry the same value
//!  24  label[48]         NUL-terminated, may be empty
//!  72  csum_alg[32]      "sha256" (we also read "sha1", "sha512")
//! 104  salt[64]          random, different in each copy
//! 168  uuid[40]          NUL-terminated text UUID
//! 208  subsystem[48]     NUL-terminated, may be empty
//! 256  hdr_offset u64    where this copy starts on the device (0, or hdr_size)
//! 264  padding[184]      zero
//! 448  csum[64]          hash of the whole hdr_size bytes with this field zeroed
//! 512  padding[3584]     zero
//! ```
//!
//! The JSON area holds one NUL-terminated JSON object with `keyslots`, `tokens`, `segments`,
//! `digests` and `config`; the rest of the area is zero. See docs/format.md for the objects
//! cryptnbd writes. This module keeps the whole JSON document (unknown objects and fields of
//! headers written by other tools are preserved on rewrite) and offers typed views of the
//! parts cryptnbd uses.
//!
//! Nothing here does I/O; [`crate::header`] reads and writes the copies on a file.

use aws_lc_rs::digest;
use serde_json::{Map, Value, json};

/// Magic of the primary header copy: "LUKS" 0xba 0xbe.
pub const MAGIC_PRIMARY: [u8; 6] = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
/// Magic of the secondary header copy: "SKUL" 0xba 0xbe.
pub const MAGIC_SECONDARY: [u8; 6] = [0x53, 0x4b, 0x55, 0x4c, 0xba, 0xbe];
/// Length of the binary part of a header copy.
pub const BINARY_HEADER_LEN: usize = 4096;
/// Header copy size cryptnbd writes (binary header + 12 KiB JSON area), as cryptsetup does.
pub const DEFAULT_HDR_SIZE: u64 = 0x4000;
/// Where the encrypted data starts on volumes cryptnbd creates: 16 MiB, as cryptsetup does.
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;
/// The header copy sizes LUKS2 allows; a secondary copy sits at one of these offsets.
pub const ALLOWED_HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];
/// The only cipher cryptnbd implements.
pub const CIPHER: &str = "aes-xts-plain64";

const OFF_VERSION: usize = 6;
const OFF_HDR_SIZE: usize = 8;
const OFF_SEQID: usize = 16;
const OFF_LABEL: usize = 24;
const OFF_CSUM_ALG: usize = 72;
const OFF_SALT: usize = 104;
const OFF_UUID: usize = 168;
const OFF_SUBSYSTEM: usize = 208;
const OFF_HDR_OFFSET: usize = 256;
const OFF_CSUM: usize = 448;
const LEN_LABEL: usize = 48;
const LEN_CSUM_ALG: usize = 32;
const LEN_SALT: usize = 64;
const LEN_UUID: usize = 40;
const LEN_SUBSYSTEM: usize = 48;
const LEN_CSUM: usize = 64;

/// Why a header copy or its JSON could not be used. Each message says what was wrong; the
/// caller adds which file and which copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    #[error("the header is truncated: {needed} bytes needed, {available} present")]
    Truncated {
        /// Bytes the header needs.
        needed: u64,
        /// Bytes that were there.
        available: u64,
    },
    /// Not a LUKS header at all.
    #[error("no LUKS2 magic at offset {offset}")]
    BadMagic {
        /// Where the copy was looked for.
        offset: u64,
    },
    /// A LUKS header of another version (LUKS1).
    #[error("LUKS version {0} is not supported (only LUKS2)")]
    UnsupportedVersion(u16),
    /// The header's fields are inconsistent.
    #[error("invalid header field: {0}")]
    Invalid(String),
    /// The checksum does not match: the copy is damaged.
    #[error("header checksum mismatch (the copy is damaged)")]
    ChecksumMismatch,
    /// The JSON area is not valid JSON or lacks what LUKS2 requires.
    #[error("invalid LUKS2 JSON metadata: {0}")]
    Json(String),
    /// A valid LUKS2 header that uses something cryptnbd does not implement.
    #[error("unsupported LUKS2 volume: {0}")]
    Unsupported(String),
}

/// The binary part of one header copy, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryHeader {
    /// True for the primary copy (magic "LUKS"), false for the secondary ("SKUL").
    pub primary: bool,
    /// Size of this copy including the JSON area.
    pub hdr_size: u64,
    /// Update counter; the valid copy with the higher one wins.
    pub seqid: u64,
    /// Label shown by `cryptsetup luksDump`.
    pub label: String,
    /// Checksum algorithm name (`sha256`).
    pub checksum_alg: String,
    /// Per-copy salt (mixed into nothing by LUKS2 itself; kept for round trips).
    pub salt: [u8; LEN_SALT],
    /// Volume UUID, as text.
    pub uuid: String,
    /// Subsystem label.
    pub subsystem: String,
    /// Offset of this copy on the device.
    pub hdr_offset: u64,
}

/// One decoded, checksum-verified header copy.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderCopy {
    /// The binary fields.
    pub binary: BinaryHeader,
    /// The JSON metadata.
    pub metadata: Metadata,
}

fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// A NUL-terminated text field of the binary header. One that fills its whole field is
/// refused: cryptsetup never writes one, and it could not be written back ([`put_c_string`]
/// keeps the terminator).
fn c_string(b: &[u8]) -> Result<String, HeaderError> {
    let end = b.iter().position(|&c| c == 0).ok_or_else(|| {
        HeaderError::Invalid(format!(
            "a text field of the binary header fills its {} bytes without a terminating NUL",
            b.len()
        ))
    })?;
    std::str::from_utf8(&b[..end])
        .map(str::to_owned)
        .map_err(|_| HeaderError::Invalid("a text field is not UTF-8".into()))
}

fn put_c_string(dst: &mut [u8], s: &str) -> Result<(), HeaderError> {
    // Leave room for the terminating NUL.
    if s.len() >= dst.len() || s.as_bytes().contains(&0) {
        return Err(HeaderError::Invalid(format!(
            "text field '{s}' is longer than {} bytes or contains NUL",
            dst.len() - 1
        )));
    }
    dst[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

fn checksum_algorithm(name: &str) -> Result<&'static digest::Algorithm, HeaderError> {
    match name {
        "sha256" => Ok(&digest::SHA256),
        "sha512" => Ok(&digest::SHA512),
        "sha1" => Ok(&digest::SHA1_FOR_LEGACY_USE_ONLY),
        other => Err(HeaderError::Unsupported(format!(
            "checksum algorithm '{other}'"
        ))),
    }
}

fn compute_checksum(alg: &'static digest::Algorithm, copy: &[u8]) -> digest::Digest {
    let mut ctx = digest::Context::new(alg);
    ctx.update(&copy[..OFF_CSUM]);
    ctx.update(&[0u8; LEN_CSUM]);
    ctx.update(&copy[OFF_CSUM + LEN_CSUM..]);
    ctx.finish()
}

/// Decodes the 4096-byte binary header at the start of `buf` without checking the checksum
/// (which needs the whole copy). `expected_offset` is where `buf` was read from.
pub fn decode_binary(buf: &[u8], expected_offset: u64) -> Result<BinaryHeader, HeaderError> {
    if buf.len() < BINARY_HEADER_LEN {
        return Err(HeaderError::Truncated {
            needed: BINARY_HEADER_LEN as u64,
            available: buf.len() as u64,
        });
    }
    let primary = match &buf[..6] {
        m if m == MAGIC_PRIMARY => true,
        m if m == MAGIC_SECONDARY => false,
        _ => {
            return Err(HeaderError::BadMagic {
                offset: expected_offset,
            });
        }
    };
    let version = u16::from_be_bytes([buf[OFF_VERSION], buf[OFF_VERSION + 1]]);
    if version != 2 {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let hdr_size = be_u64(buf, OFF_HDR_SIZE);
    if !ALLOWED_HDR_SIZES.contains(&hdr_size) {
        return Err(HeaderError::Invalid(format!(
            "header size {hdr_size} is not allowed"
        )));
    }
    let hdr_offset = be_u64(buf, OFF_HDR_OFFSET);
    if hdr_offset != expected_offset {
        return Err(HeaderError::Invalid(format!(
            "header copy found at offset {expected_offset} says it is at {hdr_offset}"
        )));
    }
    if primary != (hdr_offset == 0) {
        return Err(HeaderError::Invalid(format!(
            "a {} magic at offset {hdr_offset}",
            if primary { "primary" } else { "secondary" }
        )));
    }
    let mut salt = [0u8; LEN_SALT];
    salt.copy_from_slice(&buf[OFF_SALT..OFF_SALT + LEN_SALT]);
    Ok(BinaryHeader {
        primary,
        hdr_size,
        seqid: be_u64(buf, OFF_SEQID),
        label: c_string(&buf[OFF_LABEL..OFF_LABEL + LEN_LABEL])?,
        checksum_alg: c_string(&buf[OFF_CSUM_ALG..OFF_CSUM_ALG + LEN_CSUM_ALG])?,
        salt,
        uuid: c_string(&buf[OFF_UUID..OFF_UUID + LEN_UUID])?,
        subsystem: c_string(&buf[OFF_SUBSYSTEM..OFF_SUBSYSTEM + LEN_SUBSYSTEM])?,
        hdr_offset,
    })
}

/// Decodes and verifies one whole header copy (`hdr_size` bytes read from `offset`).
pub fn decode_copy(buf: &[u8], offset: u64) -> Result<HeaderCopy, HeaderError> {
    let binary = decode_binary(buf, offset)?;
    let size = binary.hdr_size as usize;
    if buf.len() < size {
        return Err(HeaderError::Truncated {
            needed: binary.hdr_size,
            available: buf.len() as u64,
        });
    }
    let copy = &buf[..size];
    let alg = checksum_algorithm(&binary.checksum_alg)?;
    let sum = compute_checksum(alg, copy);
    let stored = &copy[OFF_CSUM..OFF_CSUM + sum.as_ref().len()];
    if stored != sum.as_ref() {
        return Err(HeaderError::ChecksumMismatch);
    }
    let area = &copy[BINARY_HEADER_LEN..];
    let end = area
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| HeaderError::Json("the JSON area is not NUL-terminated".into()))?;
    let value: Value = serde_json::from_slice(&area[..end])
        .map_err(|e| HeaderError::Json(format!("not JSON: {e}")))?;
    let metadata = Metadata::from_value(value)?;
    if metadata.json_size()? != binary.hdr_size - BINARY_HEADER_LEN as u64 {
        return Err(HeaderError::Json(
            "config.json_size does not match the header size".into(),
        ));
    }
    Ok(HeaderCopy { binary, metadata })
}

/// Encodes one header copy (`binary.hdr_size` bytes) with a fresh checksum.
pub fn encode_copy(binary: &BinaryHeader, metadata: &Metadata) -> Result<Vec<u8>, HeaderError> {
    if !ALLOWED_HDR_SIZES.contains(&binary.hdr_size) {
        return Err(HeaderError::Invalid(format!(
            "header size {} is not allowed",
            binary.hdr_size
        )));
    }
    let size = binary.hdr_size as usize;
    let mut out = vec![0u8; size];
    out[..6].copy_from_slice(if binary.primary {
        &MAGIC_PRIMARY
    } else {
        &MAGIC_SECONDARY
    });
    out[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&2u16.to_be_bytes());
    out[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&binary.hdr_size.to_be_bytes());
    out[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&binary.seqid.to_be_bytes());
    put_c_string(&mut out[OFF_LABEL..OFF_LABEL + LEN_LABEL], &binary.label)?;
    put_c_string(
        &mut out[OFF_CSUM_ALG..OFF_CSUM_ALG + LEN_CSUM_ALG],
        &binary.checksum_alg,
    )?;
    out[OFF_SALT..OFF_SALT + LEN_SALT].copy_from_slice(&binary.salt);
    put_c_string(&mut out[OFF_UUID..OFF_UUID + LEN_UUID], &binary.uuid)?;
    put_c_string(
        &mut out[OFF_SUBSYSTEM..OFF_SUBSYSTEM + LEN_SUBSYSTEM],
        &binary.subsystem,
    )?;
    out[OFF_HDR_OFFSET..OFF_HDR_OFFSET + 8].copy_from_slice(&binary.hdr_offset.to_be_bytes());
    let json = serde_json::to_vec(&metadata.value)
        .map_err(|e| HeaderError::Json(format!("cannot encode: {e}")))?;
    let area = size - BINARY_HEADER_LEN;
    if metadata.json_size()? != area as u64 {
        return Err(HeaderError::Json(
            "config.json_size does not match the header size".into(),
        ));
    }
    // The JSON must be followed by at least one NUL inside the area.
    if json.len() >= area {
        return Err(HeaderError::Json(format!(
            "the metadata needs {} bytes but the JSON area holds {}",
            json.len() + 1,
            area
        )));
    }
    out[BINARY_HEADER_LEN..BINARY_HEADER_LEN + json.len()].copy_from_slice(&json);
    let alg = checksum_algorithm(&binary.checksum_alg)?;
    let sum = compute_checksum(alg, &out);
    out[OFF_CSUM..OFF_CSUM + sum.as_ref().len()].copy_from_slice(sum.as_ref());
    Ok(out)
}

/// The encryption segment: where the data is and how it is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptSegment {
    /// Byte offset of the data from the start of the device.
    pub offset: u64,
    /// Data size in bytes; `None` for `"dynamic"` (up to the end of the device).
    pub size: Option<u64>,
    /// Added to every plain64 IV (non-zero only after some reencryptions).
    pub iv_tweak: u64,
    /// Encryption sector size: 512, 1024, 2048 or 4096.
    pub sector_size: u32,
}

/// The LUKS2 `pbkdf2` digest that lets any tool check a volume key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pbkdf2Digest {
    /// Hash name (`sha256`).
    pub hash: String,
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// Salt bytes.
    pub salt: Vec<u8>,
    /// Expected PBKDF2 output.
    pub digest: Vec<u8>,
}

fn pbkdf2_algorithm(hash: &str) -> Result<aws_lc_rs::pbkdf2::Algorithm, HeaderError> {
    match hash {
        "sha1" => Ok(aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA1),
        "sha256" => Ok(aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256),
        "sha384" => Ok(aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA384),
        "sha512" => Ok(aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA512),
        other => Err(HeaderError::Unsupported(format!("digest hash '{other}'"))),
    }
}

impl Pbkdf2Digest {
    /// Iterations cryptnbd writes. The volume key is 512 random bits, so the count adds no
    /// strength; 1000 is the LUKS2 minimum that cryptsetup accepts.
    pub const ITERATIONS: u32 = 1000;

    /// Makes the digest of `key` with a random salt.
    pub fn compute(key: &[u8]) -> Result<Self, HeaderError> {
        let mut salt = vec![0u8; 32];
        aws_lc_rs::rand::fill(&mut salt)
            .map_err(|_| HeaderError::Invalid("the system random generator failed".into()))?;
        let mut digest = vec![0u8; 32];
        let iterations = std::num::NonZeroU32::new(Self::ITERATIONS)
            .ok_or_else(|| HeaderError::Invalid("zero iterations".into()))?;
        aws_lc_rs::pbkdf2::derive(
            aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            key,
            &mut digest,
        );
        Ok(Self {
            hash: "sha256".into(),
            iterations: Self::ITERATIONS,
            salt,
            digest,
        })
    }

    /// True when `key` matches (constant-time comparison).
    pub fn verify(&self, key: &[u8]) -> Result<bool, HeaderError> {
        let alg = pbkdf2_algorithm(&self.hash)?;
        let iterations = std::num::NonZeroU32::new(self.iterations)
            .ok_or_else(|| HeaderError::Json("digest iterations are zero".into()))?;
        Ok(aws_lc_rs::pbkdf2::verify(alg, iterations, &self.salt, key, &self.digest).is_ok())
    }
}

/// The JSON metadata of a LUKS2 header, kept whole so that unknown parts survive a rewrite.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    value: Value,
}

fn u64_string(v: &Value, what: &str) -> Result<u64, HeaderError> {
    v.as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| HeaderError::Json(format!("{what} must be a decimal string")))
}

fn b64(v: &Value, what: &str) -> Result<Vec<u8>, HeaderError> {
    use base64::Engine as _;
    let s = v
        .as_str()
        .ok_or_else(|| HeaderError::Json(format!("{what} must be a string")))?;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| HeaderError::Json(format!("{what} is not base64")))
}

impl Metadata {
    /// Checks the top-level shape LUKS2 requires and wraps the document.
    pub fn from_value(value: Value) -> Result<Self, HeaderError> {
        let obj = value
            .as_object()
            .ok_or_else(|| HeaderError::Json("the metadata is not a JSON object".into()))?;
        for section in ["keyslots", "tokens", "segments", "digests", "config"] {
            if !obj.get(section).is_some_and(Value::is_object) {
                return Err(HeaderError::Json(format!(
                    "the '{section}' object is missing"
                )));
            }
        }
        for section in ["keyslots", "tokens", "segments", "digests"] {
            for id in obj[section].as_object().into_iter().flat_map(Map::keys) {
                if id.parse::<u32>().is_err() {
                    return Err(HeaderError::Json(format!(
                        "{section} id '{id}' is not a number"
                    )));
                }
            }
        }
        let md = Self { value };
        md.json_size()?;
        md.keyslots_size()?;
        Ok(md)
    }

    /// The metadata of a new cryptnbd volume: one crypt segment, its digest, no keyslot.
    pub fn new_volume(
        hdr_size: u64,
        data_offset: u64,
        data_size: u64,
        sector_size: u32,
        digest: &Pbkdf2Digest,
    ) -> Result<Self, HeaderError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let keyslots_size = data_offset
            .checked_sub(2 * hdr_size)
            .ok_or_else(|| HeaderError::Invalid("the data offset is inside the headers".into()))?;
        let value = json!({
            "keyslots": {},
            "tokens": {},
            "segments": {
                "0": {
                    "type": "crypt",
                    "offset": data_offset.to_string(),
                    "size": data_size.to_string(),
                    "iv_tweak": "0",
                    "encryption": CIPHER,
                    "sector_size": sector_size,
                }
            },
            "digests": {
                "0": {
                    "type": "pbkdf2",
                    "keyslots": [],
                    "segments": ["0"],
                    "hash": digest.hash,
                    "iterations": digest.iterations,
                    "salt": b64.encode(&digest.salt),
                    "digest": b64.encode(&digest.digest),
                }
            },
            "config": {
                "json_size": (hdr_size - BINARY_HEADER_LEN as u64).to_string(),
                "keyslots_size": keyslots_size.to_string(),
            }
        });
        Self::from_value(value)
    }

    /// The whole JSON document.
    pub fn value(&self) -> &Value {
        &self.value
    }

    fn section(&self, name: &str) -> &Map<String, Value> {
        // from_value checked that every section is an object; an empty map is never used
        // because constructing a Metadata without that check is impossible.
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        self.value
            .get(name)
            .and_then(Value::as_object)
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }

    fn section_mut(&mut self, name: &str) -> Option<&mut Map<String, Value>> {
        self.value.get_mut(name).and_then(Value::as_object_mut)
    }

    /// `config.json_size`.
    pub fn json_size(&self) -> Result<u64, HeaderError> {
        let v = self
            .section("config")
            .get("json_size")
            .ok_or_else(|| HeaderError::Json("config.json_size is missing".into()))?;
        u64_string(v, "config.json_size")
    }

    /// `config.keyslots_size`: bytes reserved for keyslot areas after the two header copies.
    pub fn keyslots_size(&self) -> Result<u64, HeaderError> {
        let v = self
            .section("config")
            .get("keyslots_size")
            .ok_or_else(|| HeaderError::Json("config.keyslots_size is missing".into()))?;
        u64_string(v, "config.keyslots_size")
    }

    /// `config.requirements.mandatory`: flags a tool must understand before it opens the
    /// volume (for example an unfinished reencryption).
    pub fn mandatory_requirements(&self) -> Vec<String> {
        self.section("config")
            .get("requirements")
            .and_then(|r| r.get("mandatory"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The single crypt segment. cryptnbd supports exactly one `crypt` segment using
    /// `aes-xts-plain64`; anything else is refused with the reason.
    pub fn crypt_segment(&self) -> Result<CryptSegment, HeaderError> {
        let segments = self.section("segments");
        if segments.len() != 1 {
            return Err(HeaderError::Unsupported(format!(
                "{} segments (an unfinished reencryption?); cryptnbd reads volumes with one",
                segments.len()
            )));
        }
        let (_, seg) = segments
            .iter()
            .next()
            .ok_or_else(|| HeaderError::Json("no segment".into()))?;
        let field = |name: &str| {
            seg.get(name)
                .ok_or_else(|| HeaderError::Json(format!("segment field '{name}' is missing")))
        };
        if field("type")?.as_str() != Some("crypt") {
            return Err(HeaderError::Unsupported(
                "a segment that is not of type 'crypt'".into(),
            ));
        }
        let encryption = field("encryption")?.as_str().unwrap_or_default();
        if encryption != CIPHER {
            return Err(HeaderError::Unsupported(format!(
                "cipher '{encryption}' (cryptnbd implements {CIPHER})"
            )));
        }
        if seg.get("integrity").is_some() {
            return Err(HeaderError::Unsupported(
                "authenticated encryption (integrity)".into(),
            ));
        }
        let offset = u64_string(field("offset")?, "segment offset")?;
        let size = match field("size")?.as_str() {
            Some("dynamic") => None,
            _ => Some(u64_string(field("size")?, "segment size")?),
        };
        let iv_tweak = u64_string(field("iv_tweak")?, "segment iv_tweak")?;
        let sector_size = field("sector_size")?
            .as_u64()
            .filter(|s| [512, 1024, 2048, 4096].contains(s))
            .ok_or_else(|| HeaderError::Json("segment sector_size must be 512..4096".into()))?
            as u32;
        if offset % u64::from(sector_size) != 0 || offset % 512 != 0 {
            return Err(HeaderError::Json(
                "the segment offset is not sector-aligned".into(),
            ));
        }
        if size.is_some_and(|s| s % u64::from(sector_size) != 0) {
            return Err(HeaderError::Json(
                "the segment size is not a multiple of the sector size".into(),
            ));
        }
        Ok(CryptSegment {
            offset,
            size,
            iv_tweak,
            sector_size,
        })
    }

    /// The id and object of the (first) digest assigned to the (first) segment.
    fn segment_digest_entry(&self) -> Result<(&String, &Value), HeaderError> {
        let segment_id = self
            .section("segments")
            .keys()
            .next()
            .ok_or_else(|| HeaderError::Json("no segment".into()))?;
        self.section("digests")
            .iter()
            .find(|(_, d)| {
                d.get("segments")
                    .and_then(Value::as_array)
                    .is_some_and(|s| s.iter().any(|v| v.as_str() == Some(segment_id)))
            })
            .ok_or_else(|| HeaderError::Json("no digest is assigned to the segment".into()))
    }

    /// The pbkdf2 digest assigned to the crypt segment.
    pub fn segment_digest(&self) -> Result<Pbkdf2Digest, HeaderError> {
        let (_, digest) = self.segment_digest_entry()?;
        if digest.get("type").and_then(Value::as_str) != Some("pbkdf2") {
            return Err(HeaderError::Unsupported(
                "a digest that is not pbkdf2".into(),
            ));
        }
        let hash = digest
            .get("hash")
            .and_then(Value::as_str)
            .ok_or_else(|| HeaderError::Json("digest hash is missing".into()))?
            .to_owned();
        pbkdf2_algorithm(&hash)?;
        let iterations = digest
            .get("iterations")
            .and_then(Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .filter(|&i| i > 0)
            .ok_or_else(|| HeaderError::Json("digest iterations are missing or invalid".into()))?;
        let salt = b64(digest.get("salt").unwrap_or(&Value::Null), "digest salt")?;
        let digest_bytes = b64(digest.get("digest").unwrap_or(&Value::Null), "digest value")?;
        if digest_bytes.is_empty() {
            return Err(HeaderError::Json("the digest value is empty".into()));
        }
        Ok(Pbkdf2Digest {
            hash,
            iterations,
            salt,
            digest: digest_bytes,
        })
    }

    /// Key size in bytes recorded by the keyslots (cryptsetup-made volumes), if any.
    pub fn keyslot_key_size(&self) -> Option<u64> {
        self.section("keyslots")
            .values()
            .find_map(|k| k.get("key_size").and_then(Value::as_u64))
    }

    /// The first token of `token_type` with its id.
    pub fn token(&self, token_type: &str) -> Option<(u32, &Map<String, Value>)> {
        self.section("tokens").iter().find_map(|(id, t)| {
            let t = t.as_object()?;
            (t.get("type")?.as_str()? == token_type).then_some((id.parse().ok()?, t))
        })
    }

    /// The types of all tokens, for error messages.
    pub fn token_types(&self) -> Vec<String> {
        self.section("tokens")
            .values()
            .filter_map(|t| t.get("type").and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    /// Inserts or replaces token `id`. A token must have a string `type` and a `keyslots`
    /// array, as LUKS2 requires.
    pub fn set_token(&mut self, id: u32, token: Map<String, Value>) -> Result<(), HeaderError> {
        if !token.get("type").is_some_and(Value::is_string)
            || !token.get("keyslots").is_some_and(Value::is_array)
        {
            return Err(HeaderError::Json(
                "a token needs 'type' and 'keyslots'".into(),
            ));
        }
        self.section_mut("tokens")
            .ok_or_else(|| HeaderError::Json("the 'tokens' object is missing".into()))?
            .insert(id.to_string(), Value::Object(token));
        Ok(())
    }

    /// The `keyslots` object: keyslot id (decimal text) to keyslot object, as stored.
    pub fn keyslot_section(&self) -> &Map<String, Value> {
        self.section("keyslots")
    }

    /// The id (decimal text) of the digest assigned to the crypt segment: the digest a
    /// keyslot holding the volume key must be bound to.
    pub fn segment_digest_id(&self) -> Result<String, HeaderError> {
        self.segment_digest_entry().map(|(id, _)| id.clone())
    }

    /// The keyslot ids listed by digest `digest_id` (the keyslots that hold its key).
    pub fn digest_keyslots(&self, digest_id: &str) -> Vec<String> {
        self.section("digests")
            .get(digest_id)
            .and_then(|d| d.get("keyslots"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Size of one header copy, from `config.json_size` (binary header + JSON area).
    pub fn hdr_size(&self) -> Result<u64, HeaderError> {
        self.json_size()?
            .checked_add(BINARY_HEADER_LEN as u64)
            .ok_or_else(|| HeaderError::Json("config.json_size is too large".into()))
    }

    /// A copy of this metadata with keyslot `id` added and its id appended to the `keyslots`
    /// list of digest `digest_id` (so LUKS2 tools use it to unlock the segments of that
    /// digest). Fails if the keyslot exists, the digest does not, or the result is not
    /// valid LUKS2 metadata; `self` is never changed.
    pub fn with_keyslot(
        &self,
        id: u32,
        keyslot: Map<String, Value>,
        digest_id: &str,
    ) -> Result<Self, HeaderError> {
        let key = id.to_string();
        let mut value = self.value.clone();
        let keyslots = value
            .get_mut("keyslots")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| HeaderError::Json("the 'keyslots' object is missing".into()))?;
        if keyslots.contains_key(&key) {
            return Err(HeaderError::Invalid(format!("keyslot {id} already exists")));
        }
        keyslots.insert(key.clone(), Value::Object(keyslot));
        let list = value
            .get_mut("digests")
            .and_then(|d| d.get_mut(digest_id))
            .and_then(|d| d.get_mut("keyslots"))
            .and_then(Value::as_array_mut)
            .ok_or_else(|| {
                HeaderError::Json(format!(
                    "digest {digest_id} or its 'keyslots' list is missing"
                ))
            })?;
        if !list.iter().any(|v| v.as_str() == Some(key.as_str())) {
            list.push(Value::String(key));
        }
        Self::from_value(value)
    }

    /// A copy of this metadata without keyslot `id` and without every reference to it (in
    /// the `keyslots` lists of digests and tokens), as `cryptsetup luksKillSlot` leaves it.
    /// Fails if there is no such keyslot; `self` is never changed.
    pub fn without_keyslot(&self, id: u32) -> Result<Self, HeaderError> {
        let key = id.to_string();
        let mut value = self.value.clone();
        let removed = value
            .get_mut("keyslots")
            .and_then(Value::as_object_mut)
            .and_then(|k| k.remove(&key));
        if removed.is_none() {
            return Err(HeaderError::Invalid(format!("there is no keyslot {id}")));
        }
        for section in ["digests", "tokens"] {
            let entries = value
                .get_mut(section)
                .and_then(Value::as_object_mut)
                .into_iter()
                .flat_map(|m| m.values_mut());
            for entry in entries {
                if let Some(list) = entry.get_mut("keyslots").and_then(Value::as_array_mut) {
                    list.retain(|v| v.as_str() != Some(key.as_str()));
                }
            }
        }
        Self::from_value(value)
    }
}

/// Formats 16 random bytes as a version-4 UUID.
pub fn random_uuid() -> Result<String, HeaderError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| HeaderError::Invalid("the system random generator failed".into()))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// The binary header fields for a new volume's copy (primary or secondary).
pub fn new_binary(
    primary: bool,
    hdr_size: u64,
    seqid: u64,
    uuid: &str,
) -> Result<BinaryHeader, HeaderError> {
    let mut salt = [0u8; LEN_SALT];
    aws_lc_rs::rand::fill(&mut salt)
        .map_err(|_| HeaderError::Invalid("the system random generator failed".into()))?;
    Ok(BinaryHeader {
        primary,
        hdr_size,
        seqid,
        label: String::new(),
        checksum_alg: "sha256".into(),
        salt,
        uuid: uuid.to_owned(),
        subsystem: String::new(),
        hdr_offset: if primary { 0 } else { hdr_size },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> (BinaryHeader, Metadata) {
        let digest = Pbkdf2Digest::compute(&[7u8; 64]).expect("digest");
        let md = Metadata::new_volume(
            DEFAULT_HDR_SIZE,
            DEFAULT_DATA_OFFSET,
            1 << 30,
            4096,
            &digest,
        )
        .expect("metadata");
        let uuid = random_uuid().expect("uuid");
        (
            new_binary(true, DEFAULT_HDR_SIZE, 1, &uuid).expect("binary"),
            md,
        )
    }

    #[test]
    fn round_trip_both_copies() {
        let (bin, md) = sample();
        let enc = encode_copy(&bin, &md).expect("encode");
        assert_eq!(enc.len() as u64, DEFAULT_HDR_SIZE);
        assert_eq!(&enc[..6], b"LUKS\xba\xbe");
        let dec = decode_copy(&enc, 0).expect("decode");
        assert_eq!(dec.binary, bin);
        assert_eq!(dec.metadata, md);
        let mut bin2 = bin.clone();
        bin2.primary = false;
        bin2.hdr_offset = DEFAULT_HDR_SIZE;
        let enc2 = encode_copy(&bin2, &md).expect("encode");
        assert_eq!(&enc2[..6], b"SKUL\xba\xbe");
        assert_eq!(
            decode_copy(&enc2, DEFAULT_HDR_SIZE).expect("decode").binary,
            bin2
        );
        // A secondary copy is not accepted where the primary belongs.
        assert!(decode_copy(&enc2, 0).is_err());
    }

    #[test]
    fn typed_views() {
        let (_, md) = sample();
        let seg = md.crypt_segment().expect("segment");
        assert_eq!(
            seg,
            CryptSegment {
                offset: 16 << 20,
                size: Some(1 << 30),
                iv_tweak: 0,
                sector_size: 4096
            }
        );
        let d = md.segment_digest().expect("digest");
        assert!(d.verify(&[7u8; 64]).expect("verify"));
        assert!(!d.verify(&[8u8; 64]).expect("verify"));
        assert_eq!(md.keyslots_size().expect("ks"), (16 << 20) - 2 * 0x4000);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let (bin, md) = sample();
        let enc = encode_copy(&bin, &md).expect("encode");
        for pos in [
            0, 7, 9, 17, 30, 80, 110, 170, 300, 450, 600, 4096, 4100, 9000,
        ] {
            let mut bad = enc.clone();
            bad[pos] ^= 0x01;
            assert!(
                decode_copy(&bad, 0).is_err(),
                "flip at {pos} went unnoticed"
            );
        }
    }

    #[test]
    fn truncated_is_told_apart() {
        let (bin, md) = sample();
        let enc = encode_copy(&bin, &md).expect("encode");
        assert!(matches!(
            decode_copy(&enc[..100], 0),
            Err(HeaderError::Truncated { .. })
        ));
        assert!(matches!(
            decode_copy(&enc[..5000], 0),
            Err(HeaderError::Truncated { .. })
        ));
    }

    #[test]
    fn unknown_fields_survive() {
        let (bin, md) = sample();
        let mut v = md.value().clone();
        v["config"]["flags"] = json!(["allow-discards"]);
        v["future"] = json!({"x": 1});
        let md2 = Metadata::from_value(v).expect("md");
        let dec = decode_copy(&encode_copy(&bin, &md2).expect("enc"), 0).expect("dec");
        assert_eq!(dec.metadata.value()["future"]["x"], 1);
        assert_eq!(dec.metadata.value()["config"]["flags"][0], "allow-discards");
    }

    #[test]
    fn refuses_other_ciphers_and_missing_sections() {
        let (_, md) = sample();
        let mut v = md.value().clone();
        v["segments"]["0"]["encryption"] = json!("aes-cbc-essiv:sha256");
        let err = Metadata::from_value(v)
            .expect("md")
            .crypt_segment()
            .expect_err("cipher");
        assert!(err.to_string().contains("aes-cbc-essiv"));
        let mut v = md.value().clone();
        v.as_object_mut().expect("object").remove("digests");
        assert!(Metadata::from_value(v).is_err());
    }

    /// Found by the `luks2_header` fuzz target: a long number literal in the JSON (here an
    /// 89-digit `iterations`) was parsed to a float one unit in the last place off, so a
    /// rewritten header (a token or keyslot added) carried another number than it was given.
    #[test]
    fn a_long_number_survives_rewriting_the_header() {
        let (bin, md) = sample();
        let mut v = md.value().clone();
        let long = format!("1{}8{}", "0".repeat(16), "0".repeat(71));
        v["config"]["fuzzed"] = serde_json::from_str(&long).expect("a number");
        let md = Metadata::from_value(v).expect("metadata");
        let enc = encode_copy(&bin, &md).expect("encode");
        let dec = decode_copy(&enc, 0).expect("decode");
        let again =
            decode_copy(&encode_copy(&bin, &dec.metadata).expect("encode"), 0).expect("decode");
        assert_eq!(again.metadata, dec.metadata);
        assert_eq!(dec.metadata, md);
    }

    /// Found by the `luks2_header` fuzz target: a text field (the UUID) filling all its 40
    /// bytes was read, but a header carrying it could not be written back.
    #[test]
    fn a_text_field_without_its_nul_is_refused() {
        let (bin, md) = sample();
        let mut enc = encode_copy(&bin, &md).expect("encode");
        enc[OFF_UUID..OFF_UUID + LEN_UUID].fill(b'a');
        let enc = with_fixed_checksum(enc);
        let err = decode_copy(&enc, 0).expect_err("a UUID without its NUL");
        assert!(
            matches!(&err, HeaderError::Invalid(m) if m.contains("without a terminating NUL")),
            "{err}"
        );
    }

    #[test]
    fn metadata_too_large_is_refused() {
        let (bin, md) = sample();
        let mut v = md.value().clone();
        v["config"]["big"] = json!("x".repeat(13000));
        let md2 = Metadata::from_value(v).expect("md");
        assert!(matches!(encode_copy(&bin, &md2), Err(HeaderError::Json(_))));
    }

    /// Re-encodes a copy whose JSON text was mutated, with a valid checksum, so that the
    /// mutation reaches the JSON validation and the typed views.
    fn with_fixed_checksum(mut copy: Vec<u8>) -> Vec<u8> {
        let sum = compute_checksum(&digest::SHA256, &copy);
        copy[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(sum.as_ref());
        copy
    }

    fn exercise(copy: &[u8]) {
        if let Ok(c) = decode_copy(copy, 0) {
            let md = c.metadata;
            let _ = md.crypt_segment();
            let _ = md.segment_digest();
            let _ = md.keyslot_key_size();
            let _ = md.mandatory_requirements();
            let _ = md.token_types();
            if let Some((_, t)) = md.token("cryptnbd-kms") {
                let _ = crate::token::KmsToken::from_json(t);
            }
        }
    }

    proptest! {
        #[test]
        fn json_mutations_with_valid_checksum_never_panic(
            edits in proptest::collection::vec((0usize..1200, any::<u8>()), 1..6)
        ) {
            let (bin, md) = sample();
            let mut md = md;
            let token = crate::token::KmsToken::new(
                "local", "k", &[1, 2, 3],
                kms_client::EncryptionContext::default(),
                kms_client::ContextKeys::default(), "vol-0123456789abcdef0", "now".into(),
            );
            md.set_token(0, token.to_json()).expect("token");
            let enc = encode_copy(&bin, &md).expect("encode");
            let json_len = enc[BINARY_HEADER_LEN..].iter().position(|&b| b == 0).expect("nul");
            let mut bad = enc.clone();
            for (pos, val) in edits {
                bad[BINARY_HEADER_LEN + pos % json_len] = val;
            }
            exercise(&with_fixed_checksum(bad));
        }

        #[test]
        fn arbitrary_json_values_never_panic(
            seg_size in prop_oneof![Just(json!("dynamic")), any::<u64>().prop_map(|v| json!(v.to_string())), any::<i64>().prop_map(|v| json!(v))],
            offset in prop_oneof![any::<u64>().prop_map(|v| json!(v.to_string())), Just(json!(null)), Just(json!([]))],
            sector in prop_oneof![any::<u64>().prop_map(|v| json!(v)), Just(json!("4096"))],
            iterations in prop_oneof![any::<u64>().prop_map(|v| json!(v)), Just(json!(-1))],
            salt in prop_oneof![Just(json!("!!")), Just(json!("")), Just(json!(3))],
        ) {
            let (bin, md) = sample();
            let mut v = md.value().clone();
            v["segments"]["0"]["size"] = seg_size;
            v["segments"]["0"]["offset"] = offset;
            v["segments"]["0"]["sector_size"] = sector;
            v["digests"]["0"]["iterations"] = iterations;
            v["digests"]["0"]["salt"] = salt;
            if let Ok(md) = Metadata::from_value(v)
                && let Ok(enc) = encode_copy(&bin, &md)
            {
                exercise(&enc);
            }
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..20000), off in 0u64..3) {
            let _ = decode_copy(&data, off * DEFAULT_HDR_SIZE);
        }

        #[test]
        fn decode_never_panics_on_mutated_valid_headers(
            flips in proptest::collection::vec((0usize..16384, any::<u8>()), 1..8)
        ) {
            let (bin, md) = sample();
            let mut enc = encode_copy(&bin, &md).expect("encode");
            for (pos, val) in flips {
                enc[pos] = val;
            }
            let _ = decode_copy(&enc, 0);
        }
    }
}
