//! Reading and writing the two LUKS2 header copies of a volume, on its backing store.
//!
//! Reading takes both copies; a copy that is damaged (bad magic, bad checksum, bad JSON) is
//! reported and the other is used, as LUKS2 does. When both are valid the one with the higher
//! `seqid` wins. Writing writes the primary copy, syncs, then the secondary, syncs: a crash
//! in between leaves one valid copy of the old or the new header, never none.

use store::BackingStore;

use crate::error::{VolumeError, VolumeErrorKind};
use crate::luks2::{self, ALLOWED_HDR_SIZES, BINARY_HEADER_LEN, HeaderCopy, HeaderError, Metadata};

/// Both header copies as found on disk, and the one in force.
#[derive(Debug, Clone)]
pub struct HeaderSet {
    /// The copy in force: the valid one, or of two valid ones the one with the higher seqid.
    pub active: HeaderCopy,
    /// What was wrong with the primary copy, if anything.
    pub primary_problem: Option<String>,
    /// What was wrong with the secondary copy, if anything (including "older seqid").
    pub secondary_problem: Option<String>,
}

impl HeaderSet {
    /// True when both copies are valid and agree.
    pub fn healthy(&self) -> bool {
        self.primary_problem.is_none() && self.secondary_problem.is_none()
    }
}

fn read_copy(
    store: &dyn BackingStore,
    offset: u64,
    file_len: u64,
) -> Result<HeaderCopy, HeaderError> {
    if file_len < offset + BINARY_HEADER_LEN as u64 {
        return Err(HeaderError::Truncated {
            needed: offset + BINARY_HEADER_LEN as u64,
            available: file_len,
        });
    }
    let mut bin = vec![0u8; BINARY_HEADER_LEN];
    store
        .read_at(&mut bin, offset)
        .map_err(|e| HeaderError::Invalid(format!("cannot read: {e}")))?;
    let b = luks2::decode_binary(&bin, offset)?;
    if file_len < offset + b.hdr_size {
        return Err(HeaderError::Truncated {
            needed: offset + b.hdr_size,
            available: file_len,
        });
    }
    let mut whole = vec![0u8; b.hdr_size as usize];
    store
        .read_at(&mut whole, offset)
        .map_err(|e| HeaderError::Invalid(format!("cannot read: {e}")))?;
    luks2::decode_copy(&whole, offset)
}

/// Reads both header copies of the volume in `store` and picks the one in force.
pub fn read_headers(store: &dyn BackingStore) -> Result<HeaderSet, VolumeError> {
    let path = store.location();
    let file_len = store
        .len()
        .map_err(|e| VolumeError::io(path, "reading the size", e))?;
    let primary = read_copy(store, 0, file_len);
    // The secondary copy sits right after the primary; when the primary is unreadable its
    // size is unknown, so probe every offset LUKS2 allows.
    let secondary = match &primary {
        Ok(p) => read_copy(store, p.binary.hdr_size, file_len),
        Err(_) => {
            let mut last = Err(HeaderError::BadMagic {
                offset: ALLOWED_HDR_SIZES[0],
            });
            for off in ALLOWED_HDR_SIZES {
                last = read_copy(store, off, file_len);
                if last.is_ok() {
                    break;
                }
            }
            last
        }
    };
    match (primary, secondary) {
        (Ok(p), Ok(s)) => {
            if s.binary.seqid > p.binary.seqid {
                Ok(HeaderSet {
                    primary_problem: Some(format!(
                        "older than the secondary copy (seqid {} < {})",
                        p.binary.seqid, s.binary.seqid
                    )),
                    active: s,
                    secondary_problem: None,
                })
            } else {
                let secondary_problem = (s.binary.seqid < p.binary.seqid).then(|| {
                    format!(
                        "older than the primary copy (seqid {} < {})",
                        s.binary.seqid, p.binary.seqid
                    )
                });
                Ok(HeaderSet {
                    active: p,
                    primary_problem: None,
                    secondary_problem,
                })
            }
        }
        (Ok(p), Err(e)) => Ok(HeaderSet {
            active: p,
            primary_problem: None,
            secondary_problem: Some(e.to_string()),
        }),
        (Err(e), Ok(s)) => Ok(HeaderSet {
            active: s,
            primary_problem: Some(e.to_string()),
            secondary_problem: None,
        }),
        (Err(pe), Err(se)) => {
            let (kind, what) = match (&pe, &se) {
                (HeaderError::BadMagic { .. }, HeaderError::BadMagic { .. }) => (
                    VolumeErrorKind::Corrupt,
                    "is not a LUKS2 volume (no header found)".to_string(),
                ),
                (HeaderError::UnsupportedVersion(v), _) => (
                    VolumeErrorKind::Unsupported,
                    format!(
                        "is a LUKS{v} volume; cryptnbd reads LUKS2 only (cryptsetup convert --type luks2 converts it)"
                    ),
                ),
                _ => (
                    VolumeErrorKind::Corrupt,
                    format!(
                        "has no usable LUKS2 header: primary copy: {pe}; secondary copy: {se}. \
                         Restore the header from a backup (cryptsetup luksHeaderRestore)"
                    ),
                ),
            };
            Err(VolumeError::new(kind, format!("{} {what}", path.display())))
        }
    }
}

/// Writes both copies of a header with `seqid`, fresh per-copy salts, primary first, syncing
/// after each so that a crash leaves at least one valid copy.
pub fn write_headers(
    store: &dyn BackingStore,
    template: &luks2::BinaryHeader,
    seqid: u64,
    metadata: &Metadata,
) -> Result<(), VolumeError> {
    let path = store.location();
    let corrupt = |e: HeaderError| {
        VolumeError::new(
            VolumeErrorKind::InvalidArgument,
            format!("{}: cannot encode the header", path.display()),
        )
        .with_source(e)
    };
    for primary in [true, false] {
        let mut b = luks2::new_binary(primary, template.hdr_size, seqid, &template.uuid)
            .map_err(corrupt)?;
        b.label.clone_from(&template.label);
        b.subsystem.clone_from(&template.subsystem);
        let bytes = luks2::encode_copy(&b, metadata).map_err(corrupt)?;
        store
            .write_at(&bytes, b.hdr_offset)
            .map_err(|e| VolumeError::io(path, "writing the header", e))?;
        store
            .flush()
            .map_err(|e| VolumeError::io(path, "syncing the header", e))?;
        if primary {
            crate::crash::crash_point("header-primary-written");
        }
    }
    Ok(())
}
