//! Block devices as volume stores (a partition or a whole disk holding a cryptnbd volume, the
//! usual place of an encrypted root): opened exclusively to be formatted, and checked for
//! what they already hold before anything is written over it.
//!
//! A device has a fixed size: the volume's data size comes from the device (less the header
//! area) rather than the other way round, and [`BackingStore::set_len`](crate::BackingStore)
//! on a [`FileStore`] over a device only checks that the length fits.
//!
//! [`DeviceCatalog`] names such volumes: each entry maps a volume name to a device, by path
//! or by the LUKS2 header's UUID ([`find_by_luks_uuid`], read from the devices themselves as
//! blkid does, so no udev link is needed). A device is not the catalog's to replace, copy
//! beside or erase: the verbs that build a second copy of a volume (rebuild, reencrypt,
//! snapshot, move) and delete are refused with a sentence naming the device, and the verbs
//! that change a volume in place (attach, open, rekey, recovery keyslots) work as on a file.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::BackingStore;
use crate::catalog::{Catalog, Staged};
use crate::durable::Existing;
use crate::file::{Access, FileStore, OpenError};

/// Bytes at the start of a device that [`signature`] looks at.
pub const SIGNATURE_SPAN: usize = 68 << 10;

/// Whether `path` is a block device.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Opens the block device at `path` read-write and exclusively (`O_EXCL`: the kernel refuses
/// while it is mounted, mapped by device-mapper, or opened exclusively by anyone else), for
/// formatting.
pub fn open_exclusive(path: &Path) -> io::Result<FileStore> {
    FileStore::from_file(open_device(path, true)?, path)
}

/// Opens the block device at `path`, read-write and exclusively (`O_EXCL`) when `exclusive`,
/// else read-only.
fn open_device(path: &Path, exclusive: bool) -> io::Result<std::fs::File> {
    if !is_block_device(path) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a block device", path.display()),
        ));
    }
    let flags = if exclusive {
        rustix::fs::OFlags::EXCL.bits() as i32
    } else {
        0
    };
    OpenOptions::new()
        .read(true)
        .write(exclusive)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{} is in use (mounted, mapped or held by another program): unmount or \
                         close it first",
                        path.display()
                    ),
                )
            } else {
                io::Error::new(e.kind(), format!("{}: {e}", path.display()))
            }
        })
}

/// The first [`SIGNATURE_SPAN`] bytes of `file` (fewer if it is shorter).
pub fn head(file: &std::fs::File) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; SIGNATURE_SPAN];
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// What the start of a device says it holds, if it is something known: a LUKS header, a
/// filesystem, a partition table, LVM, swap. None for anything else (all zeros, say).
pub fn signature(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| {
        head.get(offset..offset + magic.len())
            .is_some_and(|b| b == magic)
    };
    // (offset, magic, what): the offsets blkid's probes use.
    const KNOWN: &[(usize, &[u8], &str)] = &[
        (0, b"LUKS\xba\xbe", "a LUKS header"),
        (0x4000, b"SKUL\xba\xbe", "a LUKS2 header (second copy)"),
        (0, b"XFSB", "an XFS filesystem"),
        (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
        (65600, b"_BHRfS_M", "a btrfs filesystem"),
        (512, b"EFI PART", "a GPT partition table"),
        (536, b"LVM2 001", "an LVM physical volume"),
        (24, b"LVM2 001", "an LVM physical volume"),
        (4086, b"SWAPSPACE2", "swap space"),
        (4086, b"SWAP-SPACE", "swap space"),
        (32769, b"CD001", "an ISO 9660 filesystem"),
        (3, b"NTFS    ", "an NTFS filesystem"),
        (82, b"FAT32   ", "a FAT filesystem"),
        (54, b"FAT1", "a FAT filesystem"),
    ];
    if let Some((_, _, what)) = KNOWN.iter().find(|(o, m, _)| at(*o, m)) {
        return Some(what);
    }
    // A DOS partition table: the boot signature, and a partition entry with a type.
    if at(510, b"\x55\xaa") && (0..4).any(|i| head.get(446 + 16 * i + 4).is_some_and(|&t| t != 0)) {
        return Some("a DOS partition table");
    }
    None
}

/// Where LUKS2 puts the second header copy, as cryptsetup and blkid look for it: right
/// after a first copy's area of 16 KiB (cryptnbd's), or of any other size LUKS2 allows.
const LUKS2_SECOND_COPY: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];

/// The UUID a LUKS2 binary header (its first 512 bytes, either copy) records, if `header`
/// is one.
pub fn luks2_uuid(header: &[u8]) -> Option<String> {
    let magic = header.get(..6)?;
    if magic != b"LUKS\xba\xbe" && magic != b"SKUL\xba\xbe" {
        return None;
    }
    if header.get(6..8)? != [0, 2] {
        return None;
    }
    // The UUID field: 40 bytes at offset 168, NUL-terminated text.
    let field = header.get(168..208)?;
    let text = &field[..field.iter().position(|&b| b == 0).unwrap_or(field.len())];
    let uuid = std::str::from_utf8(text).ok()?;
    (!uuid.is_empty()).then(|| uuid.to_owned())
}

/// The UUID of the LUKS2 header on the device (or file) `file`, from its first copy or, when
/// that one is damaged, its second.
fn device_luks2_uuid(file: &std::fs::File) -> Option<String> {
    let mut buf = [0u8; 512];
    for offset in std::iter::once(0).chain(LUKS2_SECOND_COPY) {
        if file.read_exact_at(&mut buf, offset).is_err() {
            return None;
        }
        if let Some(uuid) = luks2_uuid(&buf) {
            return Some(uuid);
        }
    }
    None
}

/// Where the kernel lists every block device, partitions included.
pub const SYS_CLASS_BLOCK: &str = "/sys/class/block";

/// The block device whose LUKS2 header has UUID `uuid` (any case), found by reading the start
/// of every device that `sys_class_block` (normally [`SYS_CLASS_BLOCK`]) lists and `/dev`
/// holds: what blkid does, without udev's `/dev/disk/by-uuid` links (which an early boot
/// may not have yet). None when no device has it; an error naming them when several do (a
/// copy of the disk is attached too).
pub fn find_by_luks2_uuid(sys_class_block: &Path, uuid: &str) -> io::Result<Option<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(sys_class_block)?.flatten() {
        let name = entry.file_name();
        let size = std::fs::read_to_string(entry.path().join("size")).unwrap_or_default();
        if size.trim().parse::<u64>().unwrap_or(0) == 0 {
            continue;
        }
        let dev = Path::new("/dev").join(&name);
        let Ok(file) = std::fs::File::open(&dev) else {
            continue;
        };
        if device_luks2_uuid(&file).is_some_and(|u| u.eq_ignore_ascii_case(uuid)) {
            found.push(dev);
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the LUKS2 UUID {uuid} is on {} devices ({}): detach the copies, or name the \
                 device by path",
                found.len(),
                found
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// How a [`DeviceCatalog`] entry finds its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// A device node (`/dev/vdb`, `/dev/disk/by-partuuid/…`).
    Path(PathBuf),
    /// The UUID of the LUKS2 header on it (`UUID=…`, as `cryptsetup luksUUID` prints it).
    Uuid(String),
}

impl Locator {
    /// Parses `UUID=<uuid>` or an absolute path; `Err` says what is expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(uuid) = text.strip_prefix("UUID=") {
            let hex: Vec<char> = uuid.chars().filter(|&c| c != '-').collect();
            if hex.len() == 32 && hex.iter().all(char::is_ascii_hexdigit) && uuid.len() == 36 {
                return Ok(Locator::Uuid(uuid.to_ascii_lowercase()));
            }
            return Err(format!(
                "{text:?}: a UUID is 36 characters such as 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 \
                 (cryptsetup luksUUID DEVICE prints it)"
            ));
        }
        if text.starts_with('/') {
            return Ok(Locator::Path(PathBuf::from(text)));
        }
        Err(format!(
            "{text:?}: name a device by its path (/dev/…) or by its LUKS2 header's UUID \
             (UUID=…)"
        ))
    }

    /// The device, found now (`sys_class_block` for a UUID: see [`find_by_luks2_uuid`]).
    /// `NotFound` says what was looked for.
    pub fn find(&self, sys_class_block: &Path) -> io::Result<PathBuf> {
        match self {
            Locator::Path(p) => {
                if is_block_device(p) {
                    Ok(p.clone())
                } else if p.exists() {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is not a block device", p.display()),
                    ))
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} does not exist: is the disk attached?", p.display()),
                    ))
                }
            }
            Locator::Uuid(u) => find_by_luks2_uuid(sys_class_block, u)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no block device holds a LUKS2 header with UUID {u}: is the disk attached?"
                    ),
                )
            }),
        }
    }
}

impl std::fmt::Display for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Locator::Path(p) => write!(f, "{}", p.display()),
            Locator::Uuid(u) => write!(f, "UUID={u}"),
        }
    }
}

/// Volumes on block devices, by name (the daemon's `[store.devices]`).
#[derive(Debug, Clone)]
pub struct DeviceCatalog {
    entries: BTreeMap<String, Locator>,
    sys_class_block: PathBuf,
    /// How the devices it opens for I/O move data.
    io: crate::file::FileIo,
}

impl DeviceCatalog {
    /// The catalog of `entries` (volume name and device), finding devices by UUID through
    /// [`SYS_CLASS_BLOCK`].
    pub fn new(entries: BTreeMap<String, Locator>) -> Self {
        Self {
            entries,
            sys_class_block: PathBuf::from(SYS_CLASS_BLOCK),
            io: crate::file::FileIo::Buffered,
        }
    }

    /// This catalog, opening devices for reading and writing with `io`.
    pub fn with_io(mut self, io: crate::file::FileIo) -> Self {
        self.io = io;
        self
    }

    /// The device of volume `name`, found now.
    pub fn device(&self, name: &str) -> io::Result<PathBuf> {
        self.entry(name)?.find(&self.sys_class_block)
    }

    fn entry(&self, name: &str) -> io::Result<&Locator> {
        self.entries.get(name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no device is named {name} in [store.devices]"),
            )
        })
    }

    /// What a verb that needs room beside volume `name` is told.
    fn no_room(&self, name: &str, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "volume {name} is on the block device {} ([store.devices]): {what}",
                self.location(name).display()
            ),
        )
    }
}

impl Catalog for DeviceCatalog {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.entries.keys().cloned().collect())
    }

    /// The device when it is found, else how the entry names it.
    fn location(&self, name: &str) -> PathBuf {
        match self.entries.get(name) {
            Some(l) => l
                .find(&self.sys_class_block)
                .unwrap_or_else(|_| PathBuf::from(l.to_string())),
            None => PathBuf::from(format!("[store.devices] {name}")),
        }
    }

    fn exists(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Read-write is exclusive twice over: `O_EXCL` (no mount, mapping or other exclusive
    /// opener meanwhile) and the file engine's `flock`; read-only takes the shared `flock`.
    fn open(&self, name: &str, access: Access) -> Result<Box<dyn BackingStore>, OpenError> {
        let path = self.device(name)?;
        let file = open_device(&path, access == Access::ReadWrite)?;
        crate::file::lock(&file, access)?;
        let store = FileStore::from_file(file, &path)?;
        Ok(Box::new(crate::catalog::with_io(store, access, self.io)?))
    }

    fn stage(&self, name: &str, operation: &str) -> io::Result<Staged> {
        Err(self.no_room(
            name,
            &format!(
                "{operation} it would build a new copy of the volume beside the old one, and a \
                 device holds one volume only"
            ),
        ))
    }

    fn publish(
        &self,
        staged: Staged,
        _existing: Existing,
    ) -> io::Result<Option<Box<dyn BackingStore>>> {
        Err(self.no_room(&staged.name, "nothing is ever staged on a device"))
    }

    fn open_staged(&self, staged: &Staged) -> io::Result<Box<dyn BackingStore>> {
        Err(self.no_room(&staged.name, "nothing is ever staged on a device"))
    }

    /// Nothing is ever staged here.
    fn discard(&self, _staged: Staged) -> io::Result<()> {
        Ok(())
    }

    fn check_remove(&self, name: &str) -> io::Result<()> {
        Err(self.no_room(
            name,
            "cryptnbd does not erase a device it was given; to destroy the volume, run \
             `cryptsetup erase DEVICE` (the keyslots go, the data can never be read again), \
             then remove its entry",
        ))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.check_remove(name)
    }

    fn leftovers(&self) -> io::Result<Vec<Staged>> {
        Ok(Vec::new())
    }

    fn modified(&self, name: &str) -> io::Result<SystemTime> {
        std::fs::metadata(self.device(name)?)?.modified()
    }

    fn snapshots(&self, name: &str) -> io::Result<Arc<dyn Catalog>> {
        Err(self.no_room(
            name,
            "snapshots are copies kept beside a volume, and a device holds one volume only; \
             `cryptnbdctl export` makes a copy elsewhere",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; SIGNATURE_SPAN];
        h[offset..offset + magic.len()].copy_from_slice(magic);
        h
    }

    #[test]
    fn known_contents_are_named_and_zeros_are_not() {
        assert_eq!(signature(&vec![0u8; SIGNATURE_SPAN]), None);
        assert_eq!(signature(&[]), None);
        assert_eq!(signature(&with(0, b"LUKS\xba\xbe")), Some("a LUKS header"));
        assert_eq!(
            signature(&with(1080, b"\x53\xef")),
            Some("an ext2/3/4 filesystem")
        );
        assert_eq!(
            signature(&with(65600, b"_BHRfS_M")),
            Some("a btrfs filesystem")
        );
        assert_eq!(
            signature(&with(512, b"EFI PART")),
            Some("a GPT partition table")
        );
        let mut dos = with(510, b"\x55\xaa");
        assert_eq!(signature(&dos), None, "a boot signature alone is no table");
        dos[446 + 4] = 0x83;
        assert_eq!(signature(&dos), Some("a DOS partition table"));
        // Cut short: nothing read past the end.
        assert_eq!(signature(&with(1080, b"\x53\xef")[..1081]), None);
    }

    #[test]
    fn a_regular_file_is_not_opened_as_a_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").expect("write");
        assert!(!is_block_device(&p));
        let e = open_exclusive(&p).expect_err("a file opened as a device");
        assert!(e.to_string().contains("not a block device"), "{e}");
    }

    #[test]
    fn luks2_headers_give_their_uuid_and_locators_parse() {
        let mut h = with(0, b"LUKS\xba\xbe\x00\x02");
        h[168..168 + 36].copy_from_slice(b"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        assert_eq!(
            luks2_uuid(&h).as_deref(),
            Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
        );
        h[..4].copy_from_slice(b"SKUL");
        assert!(luks2_uuid(&h).is_some(), "the second copy");
        h[7] = 1;
        assert_eq!(luks2_uuid(&h), None, "LUKS1");
        assert_eq!(luks2_uuid(&[0u8; 512]), None);
        assert_eq!(luks2_uuid(&h[..100]), None, "cut short");

        assert_eq!(
            Locator::parse("UUID=0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0"),
            Ok(Locator::Uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into()))
        );
        assert_eq!(
            Locator::parse("/dev/vdb").map(|l| l.to_string()),
            Ok("/dev/vdb".into())
        );
        for bad in [
            "vdb",
            "UUID=1234",
            "UUID=0f1e2d3c4b5a69788796a5b4c3d2e1f0xxxx",
            "",
        ] {
            assert!(Locator::parse(bad).is_err(), "{bad:?}");
        }
        let e = Locator::Path("/nonexistent/vdz".into())
            .find(Path::new(SYS_CLASS_BLOCK))
            .expect_err("no such device");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("is the disk attached?"), "{e}");
    }
}
