//! The TLS record layer once the handshake is over (RFC 8446 §5, RFC 5288, RFC 7905): sealing
//! and opening application records with the keys rustls negotiated, one [`Direction`] per way.
//!
//! rustls runs the handshake and derives the keys (and the new ones of a TLS 1.3 key update);
//! this module only protects records. It exists so that each way of a session has its own
//! state: the task that reads requests opens records without waiting for the threads that
//! seal replies, and a sealed record is built in one reusable buffer, not copied again.

use std::io;

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey,
};
use rustls::ConnectionTrafficSecrets;

/// Record content types (RFC 8446 §5.1).
pub(crate) mod content {
    pub(crate) const CHANGE_CIPHER_SPEC: u8 = 20;
    pub(crate) const ALERT: u8 = 21;
    pub(crate) const HANDSHAKE: u8 = 22;
    pub(crate) const APPLICATION_DATA: u8 = 23;
}

/// Most plaintext one record carries.
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// The record header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// Most a received record may take, header included (TLS 1.2 allows 2048 bytes of expansion).
pub(crate) const MAX_RECORD: usize = HEADER + MAX_PLAINTEXT + 2048;
const TAG: usize = 16;
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// The protocol version of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    Tls12,
    Tls13,
}

/// The keys and the sequence number of one way of a session.
pub(crate) struct Direction {
    key: LessSafeKey,
    /// TLS 1.3 and TLS 1.2 ChaCha20: the per-record nonce is this XOR the sequence number.
    /// TLS 1.2 AES-GCM: the first 4 bytes are the salt; the 8 after it, XOR the sequence
    /// number, are the explicit nonce a sealed record carries (RFC 5288 allows any unique
    /// value; this is rustls's choice too).
    iv: [u8; NONCE_LEN],
    seq: u64,
    version: Version,
    /// TLS 1.2 AES-GCM: 8 bytes of explicit nonce after the header.
    explicit: bool,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction")
            .field("version", &self.version)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl Direction {
    /// The state of one way, from the secrets rustls hands over and the next sequence number.
    pub(crate) fn new(
        version: Version,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> io::Result<Self> {
        let (algorithm, key, iv, gcm) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&CHACHA20_POLY1305, key, iv, false)
            }
            _ => return Err(io::Error::other("the negotiated cipher is not supported")),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| io::Error::other("the negotiated key has the wrong length"))?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("the negotiated IV has the wrong length"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
            version,
            explicit: version == Version::Tls12 && gcm,
        })
    }

    /// Records sealed or opened with these keys.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    fn prefix(&self) -> usize {
        HEADER + if self.explicit { 8 } else { 0 }
    }

    /// The nonce of the record numbered `seq`: the IV with its last 8 bytes XOR `seq`.
    fn mixed_nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    /// Starts a record at the end of `out`: room for its header (and explicit nonce). The
    /// caller appends the plaintext, at most [`MAX_PLAINTEXT`] bytes, then calls
    /// [`seal`](Self::seal) with the returned start.
    pub(crate) fn begin(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.resize(start + self.prefix(), 0);
        start
    }

    /// Encrypts the record begun at `start` in place and appends its tag.
    pub(crate) fn seal(&mut self, typ: u8, out: &mut Vec<u8>, start: usize) -> io::Result<()> {
        let body = start + self.prefix();
        let plain_len = out.len() - body;
        debug_assert!(plain_len <= MAX_PLAINTEXT);
        let nonce = self.mixed_nonce();
        let outer = match self.version {
            Version::Tls13 => {
                // TLSInnerPlaintext: the content, then its real type; the record says
                // application_data (RFC 8446 §5.2).
                out.push(typ);
                content::APPLICATION_DATA
            }
            Version::Tls12 => typ,
        };
        let record_len = out.len() - start - HEADER + TAG;
        let len = u16::try_from(record_len).map_err(|_| invalid("record too long"))?;
        let [hi, lo] = len.to_be_bytes();
        let header = [outer, LEGACY_VERSION[0], LEGACY_VERSION[1], hi, lo];
        out[start..start + HEADER].copy_from_slice(&header);
        let tag = match self.version {
            Version::Tls13 => self.key.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut out[body..],
            ),
            Version::Tls12 => {
                if self.explicit {
                    out[start + HEADER..body].copy_from_slice(&nonce[4..]);
                }
                let aad = tls12_aad(self.seq, typ, plain_len);
                self.key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut out[body..],
                )
            }
        }
        .map_err(|_| io::Error::other("TLS record encryption failed"))?;
        out.extend_from_slice(tag.as_ref());
        self.seq += 1;
        Ok(())
    }

    /// Decrypts the whole record `record` (header included) in place: its content type and
    /// where its plaintext now lies within `record`.
    pub(crate) fn open(&mut self, record: &mut [u8]) -> io::Result<(u8, std::ops::Range<usize>)> {
        let outer = record[0];
        match (self.version, outer) {
            (Version::Tls13, content::APPLICATION_DATA) => {}
            (Version::Tls12, content::ALERT | content::HANDSHAKE | content::APPLICATION_DATA) => {}
            (_, content::CHANGE_CIPHER_SPEC) => {
                return Err(invalid(
                    "the client sent change_cipher_spec after the TLS handshake",
                ));
            }
            (_, t) => {
                return Err(invalid(format!(
                    "the client sent a TLS record of type {t}, which is not allowed after the handshake"
                )));
            }
        }
        let prefix = self.prefix();
        if record.len() < prefix + TAG {
            return Err(invalid(
                "the client sent a TLS record too short to be sealed",
            ));
        }
        let mut nonce = self.mixed_nonce();
        let body = match self.version {
            Version::Tls13 => {
                let header: [u8; HEADER] = record[..HEADER].try_into().unwrap_or_default();
                self.key.open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(header),
                    &mut record[HEADER..],
                )
            }
            Version::Tls12 => {
                if self.explicit {
                    nonce[4..].copy_from_slice(&record[HEADER..prefix]);
                }
                let aad = tls12_aad(self.seq, outer, record.len() - prefix - TAG);
                self.key.open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut record[prefix..],
                )
            }
        }
        .map_err(|_| {
            invalid("a TLS record from the client failed authentication (bad_record_mac)")
        })?;
        let mut len = body.len();
        let typ = match self.version {
            Version::Tls12 => outer,
            Version::Tls13 => {
                // The real type is the last non-zero byte; zeros after it are padding.
                let Some(last) = body.iter().rposition(|&b| b != 0) else {
                    return Err(invalid(
                        "the client sent a TLS record without a content type",
                    ));
                };
                len = last;
                body[last]
            }
        };
        if len > MAX_PLAINTEXT {
            return Err(invalid(
                "the client sent a TLS record over 16 KiB (record_overflow)",
            ));
        }
        self.seq += 1;
        Ok((typ, prefix..prefix + len))
    }
}

/// TLS 1.2's additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&LEGACY_VERSION);
    // A record's plaintext is under 2^16 bytes.
    aad[11..].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    aad
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(kind: u8, byte: u8) -> ConnectionTrafficSecrets {
        let iv = Iv::new([byte.wrapping_add(1); NONCE_LEN]);
        let mut key = [byte; 32];
        key[0] = kind;
        // (An AES-128 key cannot be made outside rustls; the TLS tests negotiate one.)
        match kind {
            0 => ConnectionTrafficSecrets::Aes256Gcm {
                key: AeadKey::from(key),
                iv,
            },
            _ => ConnectionTrafficSecrets::Chacha20Poly1305 {
                key: AeadKey::from(key),
                iv,
            },
        }
    }

    fn pair(version: Version, kind: u8) -> (Direction, Direction) {
        (
            Direction::new(version, 7, secrets(kind, 9)).unwrap(),
            Direction::new(version, 7, secrets(kind, 9)).unwrap(),
        )
    }

    #[test]
    fn records_round_trip_and_tampering_is_caught() {
        for version in [Version::Tls12, Version::Tls13] {
            for kind in 0..2 {
                let (mut tx, mut rx) = pair(version, kind);
                let mut out = Vec::new();
                for (i, len) in [0usize, 1, 100, MAX_PLAINTEXT].into_iter().enumerate() {
                    let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
                    out.clear();
                    let start = tx.begin(&mut out);
                    out.extend_from_slice(&payload);
                    tx.seal(content::APPLICATION_DATA, &mut out, start).unwrap();
                    let declared = usize::from(u16::from_be_bytes([out[3], out[4]]));
                    assert_eq!(declared + HEADER, out.len());
                    let mut tampered = out.clone();
                    *tampered.last_mut().unwrap() ^= 1;
                    let mut probe = Direction::new(version, rx.seq(), secrets(kind, 9)).unwrap();
                    assert!(probe.open(&mut tampered).is_err(), "{version:?} {kind}");
                    let (typ, range) = rx.open(&mut out).unwrap();
                    assert_eq!(typ, content::APPLICATION_DATA);
                    assert_eq!(&out[range], &payload[..]);
                }
                // A record replayed out of order does not open.
                out.clear();
                let start = tx.begin(&mut out);
                out.extend_from_slice(b"x");
                tx.seal(content::ALERT, &mut out, start).unwrap();
                let mut again = out.clone();
                assert_eq!(rx.open(&mut out).unwrap().0, content::ALERT);
                assert!(rx.open(&mut again).is_err());
            }
        }
    }

    #[test]
    fn a_record_under_other_keys_does_not_open() {
        let mut tx = Direction::new(Version::Tls13, 0, secrets(0, 1)).unwrap();
        let mut rx = Direction::new(Version::Tls13, 0, secrets(0, 2)).unwrap();
        let mut out = Vec::new();
        let start = tx.begin(&mut out);
        out.extend_from_slice(b"hello");
        tx.seal(content::APPLICATION_DATA, &mut out, start).unwrap();
        let e = rx.open(&mut out).unwrap_err();
        assert!(e.to_string().contains("bad_record_mac"), "{e}");
    }
}
