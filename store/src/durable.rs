//! Durable small files: the one helper every atomic replace in cryptnbd goes through.
//!
//! [`write_atomic`] writes a whole file so that a crash at any point leaves either the old
//! content or the new one, never a mix and never nothing: a temporary file in the same
//! directory (mode 0600, a unique hidden name), written and fsynced, then renamed over the
//! target (or hard-linked when the target must not exist), then the directory fsynced so
//! that the new name itself survives a power cut. [`rename_durable`] is the last two steps,
//! for a caller that wrote and synced its own temporary file (a volume rebuilt in place).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// What [`write_atomic`] does when the target exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (rename over it).
    Replace,
    /// Fail with [`io::ErrorKind::AlreadyExists`] and leave it as it is (hard link).
    Keep,
}

/// The directory `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A hidden, unique name next to `path` for a temporary file.
fn temp_next_to(path: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Ok(parent_of(path).join(format!(
        ".{}.tmp-{}-{}-{nanos:08x}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// fsyncs the directory `dir`, so the names in it (a rename, a new file) are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` as the whole content of `path` (mode 0600 when created), atomically and
/// durably: see the module documentation. On an error the target is as it was and the
/// temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8], existing: Existing) -> io::Result<()> {
    let tmp = temp_next_to(path)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        match existing {
            Existing::Replace => std::fs::rename(&tmp, path)?,
            Existing::Keep => {
                std::fs::hard_link(&tmp, path)?;
                std::fs::remove_file(&tmp)?;
            }
        }
        sync_dir(parent_of(path))
    })();
    if result.is_err() {
        // Best effort: the temporary file may not exist (or is already renamed).
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renames the complete, synced file `tmp` over `dst` and fsyncs the directory: a crash
/// leaves the old file or the new one. `tmp` must be in the same directory (filesystem).
pub fn rename_durable(tmp: &Path, dst: &Path) -> io::Result<()> {
    std::fs::rename(tmp, dst)?;
    sync_dir(parent_of(dst))
}

/// Creates the new file `path` (0600, refused if it exists) for reading and writing, under
/// an exclusive lock: a file to be built and then put in place with [`link_new`].
pub fn create_locked(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.try_lock().map_err(|_| {
        io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("{}: cannot lock the new file", path.display()),
        )
    })?;
    Ok(file)
}

/// Puts the complete, synced file `tmp` in place as the new file `target` (refused with
/// `AlreadyExists` if `target` exists: a hard link never replaces), removes the name `tmp`
/// and fsyncs the directory.
pub fn link_new(tmp: &Path, target: &Path) -> io::Result<()> {
    std::fs::hard_link(tmp, target)?;
    std::fs::remove_file(tmp)?;
    sync_dir(parent_of(target))
}

/// Creates `dir` and its missing parents with mode 0700 (owner only); an existing directory
/// is left as it is.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("attachments.json");
        write_atomic(&path, b"first", Existing::Replace).expect("create");
        assert_eq!(std::fs::read(&path).expect("read"), b"first");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        write_atomic(&path, b"second, longer", Existing::Replace).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second, longer");
        assert_eq!(names(dir.path()), ["attachments.json"]);
    }

    #[test]
    fn keep_never_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keystore");
        write_atomic(&path, b"old", Existing::Keep).expect("create");
        let err = write_atomic(&path, b"new", Existing::Keep).expect_err("must not replace");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        assert_eq!(names(dir.path()), ["keystore"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The target is a non-empty directory: the rename fails after the temporary is written.
        let path = dir.path().join("busy");
        std::fs::create_dir(&path).expect("mkdir");
        std::fs::write(path.join("inside"), b"x").expect("write");
        assert!(write_atomic(&path, b"new", Existing::Replace).is_err());
        assert_eq!(names(dir.path()), ["busy"]);
    }

    #[test]
    fn private_dirs_are_0700_and_rename_durable_moves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let private = dir.path().join("a/b");
        create_private_dir(&private).expect("mkdir");
        create_private_dir(&private).expect("again");
        let mode = std::fs::metadata(&private)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let tmp = private.join(".v.tmp");
        std::fs::write(&tmp, b"volume").expect("write");
        rename_durable(&tmp, &private.join("v.luks")).expect("rename");
        assert_eq!(names(&private), ["v.luks"]);
    }
}
