//! A newc cpio writer, to pack an initramfs image from a directory tree as mkinitramfs and
//! dracut do (`find . | cpio -o -H newc`), for the tests of `cryptnbdctl initramfs check`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The newc archive of every entry under `root` (directories, files, symlinks), sorted.
pub fn pack(root: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut paths = Vec::new();
    walk(root, root, &mut paths);
    paths.sort();
    for rel in &paths {
        let path = root.join(rel);
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        let data = if meta.file_type().is_symlink() {
            std::fs::read_link(&path)
                .expect("readlink")
                .to_string_lossy()
                .into_owned()
                .into_bytes()
        } else if meta.is_file() {
            std::fs::read(&path).expect("read")
        } else {
            Vec::new()
        };
        let mode = meta.mode() & 0o170000 | meta.permissions().mode() & 0o7777;
        entry(&mut out, rel, mode, &data);
    }
    entry(&mut out, "TRAILER!!!", 0, b"");
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = e.path();
        let rel = path
            .strip_prefix(root)
            .expect("under the root")
            .to_string_lossy()
            .into_owned();
        out.push(rel);
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &path, out);
        }
    }
}

fn entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let pad = |out: &mut Vec<u8>| {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    out.extend_from_slice(b"070701");
    let fields = [
        0,
        mode as usize,
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0,
    ];
    for v in fields {
        out.extend_from_slice(format!("{v:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
    out.extend_from_slice(data);
    pad(out);
}
