//! Encryption contexts: the non-secret key/value pairs a data key is bound to.
//!
//! A KMS authenticates the context together with the wrapped key (AWS KMS uses it as AAD), so a
//! blob only unwraps under exactly the pairs it was made with. cryptnbd binds every volume key
//! to who may use it, in the shape Amazon EBS uses for encrypted WorkSpaces:
//! `"[SID]@[DIRECTORY-ID]"` under one key and the volume id under another ([`IdentityContext`]).
//!
//! Limits follow AWS KMS: keys and values are Unicode strings, compared exactly (case
//! sensitive), order does not matter. The AWS KMS documentation states no length limit for a
//! key or a value, so this crate sets its own: keys and values must be non-empty and the whole
//! context (all keys and values, in UTF-8 bytes) at most [`MAX_CONTEXT_BYTES`] (8 KiB, the size
//! other KMSs document for a whole context).
//!
//! Pure code: no I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{KmsError, KmsErrorKind};

/// Upper bound on the sum of the UTF-8 lengths of every key and value of a context.
pub const MAX_CONTEXT_BYTES: usize = 8192;

/// Maximum number of sub-authorities in a Windows SID (`SID_MAX_SUB_AUTHORITIES`).
const MAX_SUB_AUTHORITIES: usize = 15;

/// Largest identifier-authority value a SID can carry (48 bits).
const MAX_SID_AUTHORITY: u64 = (1 << 48) - 1;

/// Number of hex digits after `d-` in an AWS Directory Service id.
const DIRECTORY_HEX_DIGITS: usize = 10;

/// Number of hex digits after `vol-` in a volume id (as EBS volume ids).
const VOLUME_HEX_DIGITS: usize = 17;

const SID_EXAMPLE: &str = "S-1-5-21-277731876-1789304096-451871588-1107";
const DIRECTORY_EXAMPLE: &str = "d-1234abcd01";
const VOLUME_EXAMPLE: &str = "vol-0123456789abcdef0";

/// Why a context, a pair or an identity was refused. Every message shows the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// A key of the context is the empty string.
    #[error(
        "encryption context keys must not be empty: give each pair as KEY=VALUE with a non-empty KEY"
    )]
    EmptyKey,
    /// A value of the context is the empty string.
    #[error(
        "encryption context key '{key}' has an empty value: give each pair as KEY=VALUE with a non-empty VALUE"
    )]
    EmptyValue {
        /// The key whose value is empty.
        key: String,
    },
    /// The context is larger than [`MAX_CONTEXT_BYTES`].
    #[error(
        "the encryption context has {bytes} bytes of keys and values; at most {MAX_CONTEXT_BYTES} are allowed, so use fewer or shorter pairs"
    )]
    TooLarge {
        /// Total UTF-8 bytes of all keys and values.
        bytes: usize,
    },
    /// A `--context` argument is not of the form `KEY=VALUE`.
    #[error("invalid encryption context pair '{0}': expected KEY=VALUE such as department=finance")]
    BadPair(String),
    /// The same key was given twice (or an extra pair collides with an identity key).
    #[error(
        "encryption context key '{0}' is given more than once: each key may appear once (the identity keys are set by cryptnbd)"
    )]
    DuplicateKey(String),
    /// A context lacks a key it must have.
    #[error(
        "the encryption context has no '{0}' pair: it was not made by cryptnbd with these context keys"
    )]
    MissingKey(String),
    /// Not a Windows security identifier.
    #[error(
        "invalid SID '{0}': expected S-1-<authority>-<subauthority>... (1 to 15 decimal sub-authorities) such as {SID_EXAMPLE}"
    )]
    BadSid(String),
    /// Not an AWS Directory Service directory id.
    #[error(
        "invalid directory id '{0}': expected d- followed by 10 lowercase hex digits such as {DIRECTORY_EXAMPLE}"
    )]
    BadDirectoryId(String),
    /// Not a cryptnbd volume id.
    #[error(
        "invalid volume id '{0}': expected vol- followed by 17 lowercase hex digits such as {VOLUME_EXAMPLE}"
    )]
    BadVolumeId(String),
    /// The SID/directory value is not of the form `[SID]@[DIRECTORY-ID]`.
    #[error(
        "invalid SID/directory value '{0}': expected [SID]@[DIRECTORY-ID] such as [{SID_EXAMPLE}]@[{DIRECTORY_EXAMPLE}]"
    )]
    BadSidDirectory(String),
}

impl From<ContextError> for KmsError {
    fn from(e: ContextError) -> Self {
        KmsError::new(KmsErrorKind::InvalidRequest, e.to_string())
    }
}

/// A validated encryption context: a map of non-empty strings, ordered by key bytes.
///
/// Serializes as a JSON object of strings; deserializing validates it again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Validates `pairs`: non-empty keys and values, at most [`MAX_CONTEXT_BYTES`] in total.
    /// An empty map is allowed (as in AWS KMS, where the context is optional).
    pub fn new(pairs: BTreeMap<String, String>) -> Result<Self, ContextError> {
        let mut bytes = 0usize;
        for (k, v) in &pairs {
            if k.is_empty() {
                return Err(ContextError::EmptyKey);
            }
            if v.is_empty() {
                return Err(ContextError::EmptyValue { key: k.clone() });
            }
            bytes = bytes.saturating_add(k.len()).saturating_add(v.len());
        }
        if bytes > MAX_CONTEXT_BYTES {
            return Err(ContextError::TooLarge { bytes });
        }
        Ok(Self(pairs))
    }

    /// Builds a context from `KEY=VALUE`-style pairs; a repeated key is an error.
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<Self, ContextError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            let k = k.into();
            if map.contains_key(&k) {
                return Err(ContextError::DuplicateKey(k));
            }
            map.insert(k, v.into());
        }
        Self::new(map)
    }

    /// The value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every pair, ordered by key bytes.
    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the context has no pair.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// An unambiguous byte encoding, used as authenticated data:
    /// `u32 BE count`, then for each pair in key-byte order `u32 BE key length`, key bytes,
    /// `u32 BE value length`, value bytes. Length prefixes keep `{"ab":"c"}` and `{"a":"bc"}`
    /// apart.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let total: usize = self.0.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(4 + total);
        // Lengths fit in u32: `new` bounds the whole context to MAX_CONTEXT_BYTES.
        push_len(&mut out, self.0.len());
        for (k, v) in &self.0 {
            push_len(&mut out, k.len());
            out.extend_from_slice(k.as_bytes());
            push_len(&mut out, v.len());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}

impl TryFrom<BTreeMap<String, String>> for EncryptionContext {
    type Error = ContextError;

    fn try_from(pairs: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        Self::new(pairs)
    }
}

impl From<EncryptionContext> for BTreeMap<String, String> {
    fn from(ctx: EncryptionContext) -> Self {
        ctx.0
    }
}

impl fmt::Display for EncryptionContext {
    /// Prints `k1=v1,k2=v2` (for messages and logs; contexts are not secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Parses one `--context KEY=VALUE` argument (split at the first `=`; the value may contain
/// `=`). Both sides must be non-empty.
pub fn parse_pair(s: &str) -> Result<(String, String), ContextError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(ContextError::BadPair(s.to_owned())),
    }
}

/// The context keys under which cryptnbd stores the identity pairs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContextKeys {
    /// Key of the `[SID]@[DIRECTORY-ID]` pair (who may attach the volume).
    pub sid_directory: String,
    /// Key of the volume-id pair (which volume the data key belongs to).
    pub volume_id: String,
}

impl Default for ContextKeys {
    fn default() -> Self {
        Self {
            sid_directory: "cryptnbd:sid-directoryid".to_owned(),
            volume_id: "cryptnbd:volume-id".to_owned(),
        }
    }
}

/// Who a volume key belongs to: a Windows user (SID) of a directory, and the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityContext {
    /// Windows security identifier of the user, e.g. `S-1-5-21-...-1107`.
    pub sid: String,
    /// AWS Directory Service id of the user's directory, e.g. `d-1234abcd01`.
    pub directory: String,
    /// The volume id, `vol-` + 17 hex digits.
    pub volume_id: String,
}

impl IdentityContext {
    /// Validates each part and builds the identity.
    pub fn new(sid: &str, directory: &str, volume_id: &str) -> Result<Self, ContextError> {
        validate_sid(sid)?;
        validate_directory_id(directory)?;
        validate_volume_id(volume_id)?;
        Ok(Self {
            sid: sid.to_owned(),
            directory: directory.to_owned(),
            volume_id: volume_id.to_owned(),
        })
    }

    /// A fresh random volume id: `vol-` + 17 lowercase hex digits.
    pub fn generate_volume_id() -> String {
        let mut bytes = [0u8; 9];
        // aws-lc's system RNG only fails if the kernel refuses getrandom, in which case no key
        // could be generated either; there is nothing sensible to return.
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random number generator failed");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("vol-{}", &hex[..VOLUME_HEX_DIGITS])
    }

    /// The value stored under [`ContextKeys::sid_directory`]: `[SID]@[DIRECTORY-ID]`.
    pub fn sid_directory_value(&self) -> String {
        format!("[{}]@[{}]", self.sid, self.directory)
    }

    /// The encryption context for this identity plus `extra` pairs. Extra pairs must not use
    /// the identity keys nor repeat a key.
    pub fn to_context(
        &self,
        keys: &ContextKeys,
        extra: &[(String, String)],
    ) -> Result<EncryptionContext, ContextError> {
        let identity = [
            (keys.sid_directory.clone(), self.sid_directory_value()),
            (keys.volume_id.clone(), self.volume_id.clone()),
        ];
        EncryptionContext::from_pairs(identity.into_iter().chain(extra.iter().cloned()))
    }

    /// Reads the identity back from a context made by [`IdentityContext::to_context`].
    pub fn from_context(ctx: &EncryptionContext, keys: &ContextKeys) -> Result<Self, ContextError> {
        let get = |k: &str| {
            ctx.get(k)
                .ok_or_else(|| ContextError::MissingKey(k.to_owned()))
        };
        let sid_dir = get(&keys.sid_directory)?;
        let volume_id = get(&keys.volume_id)?;
        let bad = || ContextError::BadSidDirectory(sid_dir.to_owned());
        let (sid, dir) = sid_dir
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.split_once("]@["))
            .ok_or_else(bad)?;
        Self::new(sid, dir, volume_id)
    }
}

/// Checks a Windows SID: `S-1-<authority>-<sub-authority>...`, the authority a 48-bit decimal,
/// 1 to 15 sub-authorities each a decimal `u32`.
pub fn validate_sid(s: &str) -> Result<(), ContextError> {
    let bad = || ContextError::BadSid(s.to_owned());
    let rest = s.strip_prefix("S-1-").ok_or_else(bad)?;
    let mut parts = rest.split('-');
    let authority = parts.next().ok_or_else(bad)?;
    if !is_decimal(authority)
        || authority
            .parse::<u64>()
            .map_or(true, |a| a > MAX_SID_AUTHORITY)
    {
        return Err(bad());
    }
    let mut count = 0usize;
    for sub in parts {
        if !is_decimal(sub) || sub.parse::<u32>().is_err() {
            return Err(bad());
        }
        count += 1;
    }
    if !(1..=MAX_SUB_AUTHORITIES).contains(&count) {
        return Err(bad());
    }
    Ok(())
}

/// Checks an AWS Directory Service id: `d-` + 10 lowercase hex digits.
pub fn validate_directory_id(s: &str) -> Result<(), ContextError> {
    check_prefixed_hex(s, "d-", DIRECTORY_HEX_DIGITS)
        .ok_or_else(|| ContextError::BadDirectoryId(s.to_owned()))
}

/// Checks a volume id: `vol-` + 17 lowercase hex digits.
pub fn validate_volume_id(s: &str) -> Result<(), ContextError> {
    check_prefixed_hex(s, "vol-", VOLUME_HEX_DIGITS)
        .ok_or_else(|| ContextError::BadVolumeId(s.to_owned()))
}

/// Digits only, no sign, no leading zero (except "0" itself), as Windows prints SIDs.
fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

fn check_prefixed_hex(s: &str, prefix: &str, digits: usize) -> Option<()> {
    let hex = s.strip_prefix(prefix)?;
    (hex.len() == digits && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::from_pairs(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn canonical_bytes_are_unambiguous() {
        let a = ctx(&[("ab", "c")]);
        let b = ctx(&[("a", "bc")]);
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(
            a.canonical_bytes(),
            [&[0, 0, 0, 1][..], &[0, 0, 0, 2], b"ab", &[0, 0, 0, 1], b"c"].concat()
        );
        // Two pairs against one pair whose value spells the rest.
        let c = ctx(&[("a", "b"), ("c", "d")]);
        let d = ctx(&[("a", "b\0\0\0\x01c\0\0\0\x01d")]);
        assert_ne!(c.canonical_bytes(), d.canonical_bytes());
        assert_eq!(
            EncryptionContext::default().canonical_bytes(),
            vec![0, 0, 0, 0]
        );
    }

    #[test]
    fn canonical_bytes_ignore_insertion_order() {
        let a = ctx(&[("x", "1"), ("y", "2")]);
        let b = ctx(&[("y", "2"), ("x", "1")]);
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
    }

    #[test]
    fn new_validates() {
        assert_eq!(
            EncryptionContext::from_pairs([("", "v")]),
            Err(ContextError::EmptyKey)
        );
        assert!(matches!(
            EncryptionContext::from_pairs([("k", "")]),
            Err(ContextError::EmptyValue { .. })
        ));
        assert!(matches!(
            EncryptionContext::from_pairs([("k", "v".repeat(MAX_CONTEXT_BYTES))]),
            Err(ContextError::TooLarge { .. })
        ));
        assert!(EncryptionContext::from_pairs([("k", "v".repeat(MAX_CONTEXT_BYTES - 1))]).is_ok());
        assert_eq!(
            EncryptionContext::from_pairs([("k", "1"), ("k", "2")]),
            Err(ContextError::DuplicateKey("k".into()))
        );
        assert!(ctx(&[("ключ", "値")]).get("ключ").is_some());
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let c = ctx(&[("b", "2"), ("a", "1")]);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"a":"1","b":"2"}"#);
        assert_eq!(serde_json::from_str::<EncryptionContext>(&json).unwrap(), c);
        assert!(serde_json::from_str::<EncryptionContext>(r#"{"a":""}"#).is_err());
        assert!(serde_json::from_str::<EncryptionContext>(r#"{"a":1}"#).is_err());
        assert!(serde_json::from_str::<EncryptionContext>(r#"["a"]"#).is_err());
    }

    #[test]
    fn parse_pair_forms() {
        assert_eq!(parse_pair("k=v").unwrap(), ("k".into(), "v".into()));
        assert_eq!(parse_pair("k=a=b").unwrap(), ("k".into(), "a=b".into()));
        for bad in ["", "k", "=v", "k=", "="] {
            let err = parse_pair(bad).unwrap_err();
            assert!(err.to_string().contains("KEY=VALUE"), "{err}");
        }
    }

    #[test]
    fn sids() {
        for good in [
            SID_EXAMPLE,
            "S-1-5-18",
            "S-1-0-0",
            "S-1-5-21-4294967295",
            "S-1-281474976710655-1",
            "S-1-5-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15",
        ] {
            validate_sid(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "S-1",
            "S-1-5",
            "S-1-5-",
            "s-1-5-18",
            "S-2-5-18",
            "S-1-5-21-4294967296",
            "S-1-281474976710656-1",
            "S-1-5-18-",
            "S-1-5--18",
            "S-1-5-+18",
            "S-1-5-018",
            "S-1-5- 18",
            "S-1-5-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16",
            "S-1-5-18]@[x",
        ] {
            let err = validate_sid(bad).unwrap_err();
            assert!(err.to_string().contains("expected S-1-"), "{err}");
            assert!(err.to_string().contains(SID_EXAMPLE), "{err}");
        }
    }

    #[test]
    fn directory_ids() {
        validate_directory_id("d-1234abcd01").unwrap();
        validate_directory_id("d-0000000000").unwrap();
        for bad in [
            "",
            "d-",
            "d-1234abcd0",
            "d-1234abcd012",
            "d-1234ABCD01",
            "D-1234abcd01",
            "d-1234abcg01",
        ] {
            let err = validate_directory_id(bad).unwrap_err();
            assert!(err.to_string().contains("d-1234abcd01"), "{err}");
        }
    }

    #[test]
    fn volume_ids() {
        validate_volume_id(VOLUME_EXAMPLE).unwrap();
        for bad in [
            "",
            "vol-",
            "vol-0123456789abcdef",
            "vol-0123456789abcdef01",
            "vol-0123456789ABCDEF0",
            "v-0123456789abcdef0",
        ] {
            let err = validate_volume_id(bad).unwrap_err();
            assert!(err.to_string().contains("17 lowercase hex"), "{err}");
        }
        for _ in 0..32 {
            let id = IdentityContext::generate_volume_id();
            validate_volume_id(&id).unwrap();
        }
        assert_ne!(
            IdentityContext::generate_volume_id(),
            IdentityContext::generate_volume_id()
        );
    }

    #[test]
    fn identity_round_trip() {
        let keys = ContextKeys::default();
        let id = IdentityContext::new(SID_EXAMPLE, DIRECTORY_EXAMPLE, VOLUME_EXAMPLE).unwrap();
        assert_eq!(
            id.sid_directory_value(),
            format!("[{SID_EXAMPLE}]@[{DIRECTORY_EXAMPLE}]")
        );
        let extra = vec![("tenant".to_owned(), "acme".to_owned())];
        let c = id.to_context(&keys, &extra).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("cryptnbd:volume-id"), Some(VOLUME_EXAMPLE));
        assert_eq!(c.get("tenant"), Some("acme"));
        assert_eq!(IdentityContext::from_context(&c, &keys).unwrap(), id);

        let custom = ContextKeys {
            sid_directory: "aws:workspaces:sid".into(),
            volume_id: "aws:ebs:id".into(),
        };
        let c = id.to_context(&custom, &[]).unwrap();
        assert_eq!(IdentityContext::from_context(&c, &custom).unwrap(), id);
        assert_eq!(
            IdentityContext::from_context(&c, &keys),
            Err(ContextError::MissingKey(keys.sid_directory))
        );
    }

    #[test]
    fn identity_rejects_collisions_and_bad_parts() {
        let keys = ContextKeys::default();
        let id = IdentityContext::new(SID_EXAMPLE, DIRECTORY_EXAMPLE, VOLUME_EXAMPLE).unwrap();
        let collide = vec![(keys.volume_id.clone(), "vol-00000000000000000".to_owned())];
        assert_eq!(
            id.to_context(&keys, &collide),
            Err(ContextError::DuplicateKey(keys.volume_id.clone()))
        );
        let twice = vec![
            ("a".to_owned(), "1".to_owned()),
            ("a".to_owned(), "2".to_owned()),
        ];
        assert_eq!(
            id.to_context(&keys, &twice),
            Err(ContextError::DuplicateKey("a".into()))
        );

        assert!(matches!(
            IdentityContext::new("S-1-5", DIRECTORY_EXAMPLE, VOLUME_EXAMPLE),
            Err(ContextError::BadSid(_))
        ));
        assert!(matches!(
            IdentityContext::new(SID_EXAMPLE, "d-1", VOLUME_EXAMPLE),
            Err(ContextError::BadDirectoryId(_))
        ));
        assert!(matches!(
            IdentityContext::new(SID_EXAMPLE, DIRECTORY_EXAMPLE, "vol-1"),
            Err(ContextError::BadVolumeId(_))
        ));

        for bad in [
            "S-1-5-18@d-1234abcd01",
            "[S-1-5-18]@d-1234abcd01",
            "[S-1-5-18][d-1234abcd01]",
            "[S-1-5-18]@[d-1234abcd01",
        ] {
            let c = ctx(&[
                (&keys.sid_directory, bad),
                (&keys.volume_id, VOLUME_EXAMPLE),
            ]);
            let err = IdentityContext::from_context(&c, &keys).unwrap_err();
            assert!(
                matches!(err, ContextError::BadSidDirectory(_)),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("[SID]@[DIRECTORY-ID]"));
        }
        let c = ctx(&[
            (&keys.sid_directory, "[S-1-5]@[d-1234abcd01]"),
            (&keys.volume_id, VOLUME_EXAMPLE),
        ]);
        assert!(matches!(
            IdentityContext::from_context(&c, &keys),
            Err(ContextError::BadSid(_))
        ));
    }

    #[test]
    fn context_error_becomes_invalid_request() {
        let e: KmsError = ContextError::EmptyKey.into();
        assert_eq!(e.kind(), KmsErrorKind::InvalidRequest);
    }

    #[test]
    fn display_lists_pairs() {
        assert_eq!(ctx(&[("b", "2"), ("a", "1")]).to_string(), "a=1,b=2");
    }
}
