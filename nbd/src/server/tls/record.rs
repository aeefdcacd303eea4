//! The TLS record layer once the handshake is over (RFC 8446 §5, RFC 5288, RFC 7905): sealing
//! and opening application records with the keys rustls negotiated, one [`Direction`] per way.
//!
//! rustls runs the handshake and derives the keys (and the new ones of a TLS 1.3 key update);
//! this module only protects records. It exists so that each way of a session has its own
//! state: the task that reads requests opens records without waiting for the threads that
//! seal replies, and a sealed record is built in one reusable buffer, not copied again.

use std::io::{self, IoSlice};
use std::ops::Range;

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

use super::gcm::{Gcm, TAG_LEN as TAG};

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
/// Most a sealed record adds to its plaintext: header, explicit nonce, content type, tag.
pub(crate) const MAX_OVERHEAD: usize = HEADER + 8 + 1 + TAG;
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// The protocol version of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    Tls12,
    Tls13,
}

/// Which way a [`Direction`] protects records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Way {
    Seal,
    Open,
}

enum Aead {
    /// AES-GCM, streamed: records are sealed and opened from one buffer into another.
    Gcm(Gcm),
    /// ChaCha20-Poly1305, in place (aws-lc streams only AES-GCM): pieces are copied first.
    InPlace(LessSafeKey),
}

/// The keys and the sequence number of one way of a session.
pub(crate) struct Direction {
    aead: Aead,
    /// TLS 1.3 and TLS 1.2 ChaCha20: the per-record nonce is this XOR the sequence number.
    /// TLS 1.2 AES-GCM: the first 4 bytes are the salt; the 8 after it, XOR the sequence
    /// number, are the explicit nonce a sealed record carries (RFC 5288 allows any unique
    /// value; this is rustls's choice too).
    iv: [u8; NONCE_LEN],
    seq: u64,
    version: Version,
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

fn bad_mac() -> io::Error {
    invalid("a TLS record from the client failed authentication (bad_record_mac)")
}

fn cipher_failed() -> io::Error {
    io::Error::other("the TLS record cipher failed")
}

/// A cursor over the pieces of plaintext that records are sealed from.
pub(crate) struct Pieces<'a> {
    bufs: &'a [IoSlice<'a>],
    at: usize,
    off: usize,
}

impl<'a> Pieces<'a> {
    pub(crate) fn new(bufs: &'a [IoSlice<'a>]) -> Self {
        Self {
            bufs,
            at: 0,
            off: 0,
        }
    }

    /// The next contiguous run of at most `max` bytes (empty when none is left).
    fn take(&mut self, max: usize) -> &'a [u8] {
        while let Some(b) = self.bufs.get(self.at) {
            let b: &'a [u8] = b;
            let rest = &b[self.off..];
            if rest.is_empty() {
                self.at += 1;
                self.off = 0;
                continue;
            }
            let n = max.min(rest.len());
            self.off += n;
            return &rest[..n];
        }
        &[]
    }
}

impl Direction {
    /// The state of one way, from the secrets rustls hands over and the next sequence number.
    pub(crate) fn new(
        version: Version,
        way: Way,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> io::Result<Self> {
        let (aead, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                let gcm = Gcm::new(key.as_ref(), way == Way::Seal)
                    .ok_or_else(|| io::Error::other("aws-lc could not key AES-GCM"))?;
                (Aead::Gcm(gcm), iv)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                let key = UnboundKey::new(&CHACHA20_POLY1305, key.as_ref())
                    .map_err(|_| io::Error::other("the negotiated key has the wrong length"))?;
                (Aead::InPlace(LessSafeKey::new(key)), iv)
            }
            _ => return Err(io::Error::other("the negotiated cipher is not supported")),
        };
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("the negotiated IV has the wrong length"))?;
        Ok(Self {
            aead,
            iv,
            seq,
            version,
        })
    }

    /// Records sealed or opened with these keys.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// TLS 1.2 AES-GCM records carry 8 bytes of explicit nonce after the header.
    fn explicit(&self) -> bool {
        self.version == Version::Tls12 && matches!(self.aead, Aead::Gcm(_))
    }

    fn prefix(&self) -> usize {
        HEADER + if self.explicit() { 8 } else { 0 }
    }

    /// The additional data of a record: TLS 1.3 authenticates its header; TLS 1.2 the
    /// sequence number, type, version and plaintext length (built in `scratch`).
    fn aad<'a>(
        &self,
        header: &'a [u8; HEADER],
        scratch: &'a mut [u8; 13],
        typ: u8,
        len: usize,
    ) -> &'a [u8] {
        match self.version {
            Version::Tls13 => header,
            Version::Tls12 => {
                *scratch = tls12_aad(self.seq, typ, len);
                scratch
            }
        }
    }

    /// The nonce of the record numbered `seq`: the IV with its last 8 bytes XOR `seq`.
    fn mixed_nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    /// Seals one record of type `typ` from the next `len` bytes of `src` (at most
    /// [`MAX_PLAINTEXT`]) into the start of `out`, which has room for `len +`
    /// [`MAX_OVERHEAD`] bytes. Returns the bytes written.
    pub(crate) fn seal_into(
        &mut self,
        typ: u8,
        src: &mut Pieces<'_>,
        len: usize,
        out: &mut [u8],
    ) -> io::Result<usize> {
        debug_assert!(len <= MAX_PLAINTEXT && out.len() >= len + MAX_OVERHEAD);
        let prefix = self.prefix();
        let (outer, inner) = match self.version {
            // TLSInnerPlaintext: the content, then its real type; the record says
            // application_data (RFC 8446 §5.2).
            Version::Tls13 => (content::APPLICATION_DATA, len + 1),
            Version::Tls12 => (typ, len),
        };
        let total = prefix + inner + TAG;
        let declared = u16::try_from(total - HEADER).map_err(|_| invalid("record too long"))?;
        let [hi, lo] = declared.to_be_bytes();
        let header = [outer, LEGACY_VERSION[0], LEGACY_VERSION[1], hi, lo];
        out[..HEADER].copy_from_slice(&header);
        let nonce = self.mixed_nonce();
        if self.explicit() {
            out[HEADER..prefix].copy_from_slice(&nonce[4..]);
        }
        let mut scratch = [0; 13];
        let aad = self.aad(&header, &mut scratch, typ, len);
        let tls13 = self.version == Version::Tls13;
        let (body, tag_out) = out[prefix..total].split_at_mut(inner);
        match &mut self.aead {
            Aead::Gcm(gcm) => {
                if !gcm.begin(&nonce, aad) {
                    return Err(cipher_failed());
                }
                fill(src, len, typ, tls13, body, |piece, out| {
                    gcm.update(piece, out)
                })?;
                tag_out.copy_from_slice(&gcm.seal_tag().ok_or_else(cipher_failed)?);
            }
            Aead::InPlace(key) => {
                fill(src, len, typ, tls13, body, |piece, out| {
                    out.copy_from_slice(piece);
                    true
                })?;
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        body,
                    )
                    .map_err(|_| cipher_failed())?;
                tag_out.copy_from_slice(tag.as_ref());
            }
        }
        self.seq += 1;
        Ok(total)
    }

    /// The length of what a received record of `record_len` bytes (header included) decrypts
    /// to: its content, and in TLS 1.3 its type and padding.
    pub(crate) fn inner_len(&self, record_len: usize) -> usize {
        record_len.saturating_sub(self.prefix() + TAG)
    }

    /// Opens the whole record `record` (header included): into `dest` when given (at least
    /// [`inner_len`](Self::inner_len) bytes; nothing in it may be used unless this returns
    /// `Ok`), else in place. Returns its content type and where its content now lies (in
    /// `dest`, or in `record`).
    pub(crate) fn open(
        &mut self,
        record: &mut [u8],
        dest: Option<&mut [u8]>,
    ) -> io::Result<(u8, Range<usize>)> {
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
        let inner = record.len() - prefix - TAG;
        let mut nonce = self.mixed_nonce();
        if self.explicit() {
            nonce[4..].copy_from_slice(&record[HEADER..prefix]);
        }
        let header: [u8; HEADER] = record[..HEADER].try_into().unwrap_or_default();
        let mut scratch = [0; 13];
        let aad = self.aad(&header, &mut scratch, outer, inner);
        let direct = dest.is_some();
        let body: &mut [u8] = match &mut self.aead {
            Aead::Gcm(gcm) => {
                let (sealed, tag) = record[prefix..].split_at_mut(inner);
                if !gcm.begin(&nonce, aad) {
                    return Err(cipher_failed());
                }
                let body = match dest {
                    Some(dest) => {
                        let dest = &mut dest[..inner];
                        if !gcm.update(sealed, dest) {
                            return Err(cipher_failed());
                        }
                        dest
                    }
                    None => {
                        if !gcm.update_in_place(sealed) {
                            return Err(cipher_failed());
                        }
                        sealed
                    }
                };
                if !gcm.open_check(tag) {
                    return Err(bad_mac());
                }
                body
            }
            Aead::InPlace(key) => {
                let plain = key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut record[prefix..],
                    )
                    .map_err(|_| bad_mac())?;
                match dest {
                    Some(dest) => {
                        let dest = &mut dest[..inner];
                        dest.copy_from_slice(plain);
                        dest
                    }
                    None => plain,
                }
            }
        };
        let mut len = inner;
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
        let start = if direct { 0 } else { prefix };
        Ok((typ, start..start + len))
    }
}

/// Passes the next `len` bytes of `src` to `step` piece by piece, each with where it goes in
/// `body`; then, in TLS 1.3, the content type (TLSInnerPlaintext, RFC 8446 §5.2).
fn fill(
    src: &mut Pieces<'_>,
    len: usize,
    typ: u8,
    tls13: bool,
    body: &mut [u8],
    mut step: impl FnMut(&[u8], &mut [u8]) -> bool,
) -> io::Result<()> {
    let mut at = 0;
    while at < len {
        let piece = src.take(len - at);
        if piece.is_empty() || !step(piece, &mut body[at..at + piece.len()]) {
            return Err(cipher_failed());
        }
        at += piece.len();
    }
    if tls13 && !step(&[typ], &mut body[len..len + 1]) {
        return Err(cipher_failed());
    }
    Ok(())
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
            Direction::new(version, Way::Seal, 7, secrets(kind, 9)).unwrap(),
            Direction::new(version, Way::Open, 7, secrets(kind, 9)).unwrap(),
        )
    }

    /// Seals `payload`, given in three pieces, as one record.
    fn seal(tx: &mut Direction, typ: u8, payload: &[u8]) -> Vec<u8> {
        let (a, rest) = payload.split_at(payload.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let slices = [
            IoSlice::new(a),
            IoSlice::new(&[]),
            IoSlice::new(b),
            IoSlice::new(c),
        ];
        let mut out = vec![0u8; payload.len() + MAX_OVERHEAD];
        let n = tx
            .seal_into(typ, &mut Pieces::new(&slices), payload.len(), &mut out)
            .unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn records_round_trip_in_place_and_into_a_buffer_and_tampering_is_caught() {
        for version in [Version::Tls12, Version::Tls13] {
            for kind in 0..2 {
                let (mut tx, mut rx) = pair(version, kind);
                for (i, len) in [0usize, 1, 100, 4097, MAX_PLAINTEXT]
                    .into_iter()
                    .enumerate()
                {
                    let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
                    let out = seal(&mut tx, content::APPLICATION_DATA, &payload);
                    let declared = usize::from(u16::from_be_bytes([out[3], out[4]]));
                    assert_eq!(declared + HEADER, out.len());
                    let mut tampered = out.clone();
                    *tampered.last_mut().unwrap() ^= 1;
                    let mut probe =
                        Direction::new(version, Way::Open, rx.seq(), secrets(kind, 9)).unwrap();
                    assert!(
                        probe.open(&mut tampered, None).is_err(),
                        "{version:?} {kind}"
                    );
                    // Odd records open in place, even ones into a buffer of their own.
                    let mut record = out.clone();
                    if i % 2 == 1 {
                        let (typ, range) = rx.open(&mut record, None).unwrap();
                        assert_eq!(typ, content::APPLICATION_DATA);
                        assert_eq!(&record[range], &payload[..]);
                    } else {
                        let mut dest = vec![0u8; rx.inner_len(record.len())];
                        let (typ, range) = rx.open(&mut record, Some(&mut dest)).unwrap();
                        assert_eq!(typ, content::APPLICATION_DATA);
                        assert_eq!(&dest[range], &payload[..]);
                    }
                }
                // A record replayed does not open: its sequence number is spent.
                let out = seal(&mut tx, content::ALERT, b"xy");
                let mut again = out.clone();
                let mut once = out;
                assert_eq!(rx.open(&mut once, None).unwrap().0, content::ALERT);
                assert!(rx.open(&mut again, None).is_err());
            }
        }
    }

    #[test]
    fn streamed_gcm_records_are_what_a_one_shot_aead_makes() {
        use aws_lc_rs::aead::AES_256_GCM;
        let (mut tx, _) = pair(Version::Tls13, 0);
        let payload: Vec<u8> = (0..10_000u32).map(|b| (b % 251) as u8).collect();
        let mut record = seal(&mut tx, content::APPLICATION_DATA, &payload);
        // The reference: aws-lc-rs's own AES-256-GCM, on the record as RFC 8446 builds it.
        let ConnectionTrafficSecrets::Aes256Gcm { key, iv } = secrets(0, 9) else {
            unreachable!()
        };
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.as_ref()).unwrap());
        let mut nonce: [u8; NONCE_LEN] = iv.as_ref().try_into().unwrap();
        for (n, s) in nonce[4..].iter_mut().zip(7u64.to_be_bytes()) {
            *n ^= s;
        }
        let header: [u8; HEADER] = record[..HEADER].try_into().unwrap();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut record[HEADER..],
            )
            .unwrap();
        assert_eq!(&plain[..payload.len()], &payload[..]);
        assert_eq!(plain[payload.len()..], [content::APPLICATION_DATA]);
    }

    #[test]
    fn a_record_under_other_keys_does_not_open() {
        let mut tx = Direction::new(Version::Tls13, Way::Seal, 0, secrets(0, 1)).unwrap();
        let mut rx = Direction::new(Version::Tls13, Way::Open, 0, secrets(0, 2)).unwrap();
        let mut out = seal(&mut tx, content::APPLICATION_DATA, b"hello");
        let e = rx.open(&mut out, None).unwrap_err();
        assert!(e.to_string().contains("bad_record_mac"), "{e}");
    }
}
