//! The `cryptnbd-kms` LUKS2 token: which KMS wrapped the volume key, and under what context.
//!
//! Stored in the header's `tokens` object as JSON (see docs/format.md):
//!
//! ```json
//! { "type": "cryptnbd-kms", "keyslots": [], "version": 1,
//!   "backend": "local", "key_id": "…", "wrapped_key": "<base64>",
//!   "context": { "cryptnbd:sid-directoryid": "[S-1-…]@[d-…]", "cryptnbd:volume-id": "vol-…" },
//!   "context_keys": { "sid_directory": "cryptnbd:sid-directoryid", "volume_id": "cryptnbd:volume-id" },
//!   "volume_id": "vol-…", "created": "2026-11-22T10:00:00Z" }
//! ```
//!
//! Fields this version does not know (added by a later version: a grant id, a base image)
//! are kept in [`KmsToken::extra`] and written back unchanged.

use base64::Engine as _;
use kms_client::{ContextKeys, EncryptionContext, IdentityContext};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The LUKS2 token type cryptnbd writes.
pub const TOKEN_TYPE: &str = "cryptnbd-kms";
/// The token format version this code writes; it reads this one and refuses newer majors.
pub const TOKEN_VERSION: u32 = 1;

/// The decoded `cryptnbd-kms` token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KmsToken {
    /// Always [`TOKEN_TYPE`].
    #[serde(rename = "type")]
    pub token_type: String,
    /// Keyslots the token unlocks: none, the KMS replaces them.
    pub keyslots: Vec<String>,
    /// Token format version.
    pub version: u32,
    /// KMS backend that wrapped the key (`local`, `aws`).
    pub backend: String,
    /// Canonical id of the master key that wrapped the volume key.
    pub key_id: String,
    /// The wrapped volume key, base64.
    pub wrapped_key: String,
    /// The full encryption context the key was wrapped under.
    pub context: EncryptionContext,
    /// Which context keys hold the identity (they are configurable).
    pub context_keys: ContextKeys,
    /// The volume id (also in the context).
    pub volume_id: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Fields written by newer versions, preserved as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A grant on the master key made for one volume (AWS KMS CreateGrant): retired when the
/// volume is deleted or rekeyed to another key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRef {
    /// The grant id.
    pub grant_id: String,
    /// The key the grant is on.
    pub key_id: String,
}

fn corrupt(path: &std::path::Path, e: TokenError) -> crate::VolumeError {
    crate::VolumeError::new(
        crate::VolumeErrorKind::Corrupt,
        format!("{}: {e}", path.display()),
    )
}

/// Why a token could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Fields missing or of the wrong type.
    #[error("the cryptnbd-kms token is malformed: {0}")]
    Malformed(String),
    /// Written by a newer cryptnbd.
    #[error(
        "the cryptnbd-kms token has version {0}; this cryptnbd reads version {TOKEN_VERSION}: upgrade cryptnbd"
    )]
    TooNew(u32),
}

impl KmsToken {
    /// A token for a newly wrapped key.
    pub fn new(
        backend: &str,
        key_id: &str,
        wrapped: &[u8],
        context: EncryptionContext,
        context_keys: ContextKeys,
        volume_id: &str,
        created: String,
    ) -> Self {
        Self {
            token_type: TOKEN_TYPE.into(),
            keyslots: Vec::new(),
            version: TOKEN_VERSION,
            backend: backend.into(),
            key_id: key_id.into(),
            wrapped_key: base64::engine::general_purpose::STANDARD.encode(wrapped),
            context,
            context_keys,
            volume_id: volume_id.into(),
            created,
            extra: Map::new(),
        }
    }

    /// Decodes a token object taken from the header.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Self, TokenError> {
        let version = obj.get("version").and_then(Value::as_u64).unwrap_or(0);
        if version > u64::from(TOKEN_VERSION) {
            return Err(TokenError::TooNew(
                u32::try_from(version).unwrap_or(u32::MAX),
            ));
        }
        let token: Self = serde_json::from_value(Value::Object(obj.clone()))
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        token.wrapped()?;
        Ok(token)
    }

    /// Encodes the token for the header.
    pub fn to_json(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            // A struct of strings, maps and numbers always serializes to an object.
            _ => unreachable!("KmsToken serializes to a JSON object"),
        }
    }

    /// Records a new wrapping of the same volume key: the master key that made it, the
    /// blob, and the context it is bound to.
    pub fn rewrap(&mut self, key_id: &str, wrapped: &[u8], context: EncryptionContext) {
        self.key_id = key_id.into();
        self.wrapped_key = base64::engine::general_purpose::STANDARD.encode(wrapped);
        self.context = context;
    }

    /// The KMS grant made for this volume (AWS), if any: kept in the token's `grant` field.
    pub fn grant(&self) -> Option<GrantRef> {
        self.extra
            .get("grant")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Records (or, with None, forgets) the volume's grant.
    pub fn set_grant(&mut self, grant: Option<GrantRef>) {
        match grant.and_then(|g| serde_json::to_value(g).ok()) {
            Some(v) => {
                self.extra.insert("grant".into(), v);
            }
            None => {
                self.extra.remove("grant");
            }
        }
    }

    /// The wrapped key bytes.
    pub fn wrapped(&self) -> Result<Vec<u8>, TokenError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.wrapped_key)
            .map_err(|_| TokenError::Malformed("wrapped_key is not base64".into()))
    }

    /// [`KmsToken::wrapped`] as a volume error naming the file the token is in.
    pub fn wrapped_in(&self, path: &std::path::Path) -> Result<Vec<u8>, crate::VolumeError> {
        self.wrapped().map_err(|e| corrupt(path, e))
    }

    /// [`KmsToken::identity`] as a volume error naming the file the token is in.
    pub fn identity_in(
        &self,
        path: &std::path::Path,
    ) -> Result<IdentityContext, crate::VolumeError> {
        self.identity().map_err(|e| corrupt(path, e))
    }

    /// The identity (SID, directory, volume id) in the stored context.
    pub fn identity(&self) -> Result<IdentityContext, TokenError> {
        IdentityContext::from_context(&self.context, &self.context_keys)
            .map_err(|e| TokenError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KmsToken {
        let id = IdentityContext::new(
            "S-1-5-21-277731876-1789304096-451871588-1107",
            "d-1234abcd01",
            "vol-0123456789abcdef0",
        )
        .expect("identity");
        let keys = ContextKeys::default();
        let ctx = id
            .to_context(&keys, &[("class".into(), "secret".into())])
            .expect("ctx");
        KmsToken::new(
            "local",
            "k1",
            &[1, 2, 3],
            ctx,
            keys,
            &id.volume_id,
            "2026-11-22T00:00:00Z".into(),
        )
    }

    #[test]
    fn round_trip_keeps_unknown_fields() {
        let mut json = sample().to_json();
        json.insert("grant_id".into(), Value::String("g-1".into()));
        let t = KmsToken::from_json(&json).expect("decode");
        assert_eq!(t.extra.get("grant_id").and_then(Value::as_str), Some("g-1"));
        assert_eq!(
            t.to_json().get("grant_id").and_then(Value::as_str),
            Some("g-1")
        );
        assert_eq!(t.wrapped().expect("wrapped"), vec![1, 2, 3]);
        assert_eq!(t.identity().expect("identity").directory, "d-1234abcd01");
    }

    #[test]
    fn refuses_newer_and_malformed() {
        let mut json = sample().to_json();
        json.insert("version".into(), Value::from(2));
        assert!(matches!(
            KmsToken::from_json(&json),
            Err(TokenError::TooNew(2))
        ));
        let mut json = sample().to_json();
        json.remove("key_id");
        assert!(matches!(
            KmsToken::from_json(&json),
            Err(TokenError::Malformed(_))
        ));
        let mut json = sample().to_json();
        json.insert("wrapped_key".into(), Value::String("!!".into()));
        assert!(matches!(
            KmsToken::from_json(&json),
            Err(TokenError::Malformed(_))
        ));
    }
}
