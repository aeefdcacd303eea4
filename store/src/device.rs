//! Block devices as volume stores (a partition or a whole disk holding a cryptnbd volume, the
//! usual place of an encrypted root): opened exclusively to be formatted, and checked for
//! what they already hold before anything is written over it.
//!
//! A device has a fixed size: the volume's data size comes from the device (less the header
//! area) rather than the other way round, and [`BackingStore::set_len`](crate::BackingStore)
//! on a [`FileStore`] over a device only checks that the length fits.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::file::FileStore;

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
    if !is_block_device(path) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a block device", path.display()),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
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
        })?;
    FileStore::from_file(file, path)
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
}
