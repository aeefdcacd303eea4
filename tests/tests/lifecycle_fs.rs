//! Snapshots and deletion on real filesystems, each on its own loop device: XFS with
//! `reflink=1` (snapshots are reflinks) and ext4 (snapshots are copies). After a rebuild
//! and a delete with snapshots, the raw filesystem image is scanned: no wrapped key and no
//! token may remain in the blocks the files had. Needs root (losetup, mount), xfsprogs and
//! e2fsprogs.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e_tests::daemon::{Daemon, nbdcopy};
use e2e_tests::{TestDir, TestRng, cryptsetup, require_tool, run};

const MIB: u64 = 1 << 20;

/// A filesystem image on a loop device, mounted; unmounted and released on drop.
struct Mounted {
    loopdev: String,
    mountpoint: PathBuf,
}

impl Mounted {
    fn new(image: &Path, mountpoint: &Path, mkfs: &[&str]) -> Self {
        let f = std::fs::File::create(image).expect("image");
        f.set_len(512 * MIB).expect("size image");
        let loopdev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image))
        .assert_success()
        .stdout_text()
        .trim()
        .to_owned();
        let m = Self {
            loopdev,
            mountpoint: mountpoint.to_path_buf(),
        };
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&m.loopdev)).assert_success();
        std::fs::create_dir_all(mountpoint).expect("mountpoint");
        run(Command::new("mount").arg(&m.loopdev).arg(mountpoint)).assert_success();
        m
    }

    fn release(&mut self) {
        if self.loopdev.is_empty() {
            return;
        }
        let _ = Command::new("umount").arg(&self.mountpoint).status();
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loopdev)
            .status();
        self.loopdev.clear();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.release();
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn snapshot_and_delete_leave_no_key(label: &str, mkfs: &[&str], method: &str) {
    let dir = TestDir::new(label);
    let image = dir.join("fs.img");
    // The daemon's whole state (keystore, volumes, snapshots) lives on the filesystem.
    let mut fs = Mounted::new(&image, &dir.state_dir(), mkfs);
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("v", "32M", "alias/e2e", 4096, &[]);
    let vol = d.state_dir.join("volumes/v.luks");
    d.ctl.run(&["attach", "v"]).assert_success();
    let data = TestRng::new(21).bytes(32 * MIB as usize);
    let scratch = dir.join("scratch.bin");
    std::fs::write(&scratch, &data).expect("scratch");
    run(Command::new(nbdcopy()).arg(&scratch).arg(d.uri("v"))).assert_success();

    let snap = d
        .ctl
        .run(&["--json", "snapshot", "v", "s1"])
        .assert_success()
        .json();
    assert_eq!(snap["method"], method, "{snap}");
    run(Command::new(cryptsetup())
        .arg("luksDump")
        .arg(snap["path"].as_str().expect("path")))
    .assert_success();

    // Remember every wrapped key the files ever held: the volume's before and after a rebuild
    // from the snapshot (which re-wraps), and the snapshot's.
    let mut wrapped: Vec<String> = Vec::new();
    let token = |p: &Path| {
        e2e_tests::kms_token(&e2e_tests::read_primary_metadata(p))["wrapped_key"]
            .as_str()
            .expect("wrapped_key")
            .to_owned()
    };
    wrapped.push(token(&vol));
    let other = TestRng::new(22).bytes(32 * MIB as usize);
    std::fs::write(&scratch, &other).expect("scratch");
    run(Command::new(nbdcopy()).arg(&scratch).arg(d.uri("v"))).assert_success();
    d.ctl
        .run(&["rebuild", "v", "--from-snapshot", "s1", "--force"])
        .assert_success();
    wrapped.push(token(&vol));
    let _ = std::fs::remove_file(&scratch);
    run(Command::new(nbdcopy()).arg(d.uri("v")).arg(&scratch)).assert_success();
    assert!(
        std::fs::read(&scratch).expect("read") == data,
        "snapshot content not restored"
    );
    assert_ne!(
        wrapped[0], wrapped[1],
        "the rebuild did not re-wrap the key"
    );

    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl
        .run(&["delete", "v", "--yes", "--with-snapshots"])
        .assert_success();
    d.stop();
    fs.release();

    let raw = std::fs::read(&image).expect("read fs image");
    for w in &wrapped {
        assert!(
            !contains(&raw, w.as_bytes()),
            "a wrapped key is still in the filesystem's blocks after delete ({method})"
        );
    }
    assert!(
        !contains(&raw, b"\"cryptnbd-kms\""),
        "a cryptnbd-kms token is still in the filesystem's blocks after delete ({method})"
    );
}

#[test]
fn xfs_reflink_snapshots_and_delete_leave_no_key() {
    let mkfs = require_tool("mkfs.xfs", "xfsprogs");
    let mkfs = mkfs.to_string_lossy().into_owned();
    snapshot_and_delete_leave_no_key("fs-xfs", &[&mkfs, "-q", "-f", "-m", "reflink=1"], "reflink");
}

#[test]
fn ext4_copy_snapshots_and_delete_leave_no_key() {
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs");
    let mkfs = mkfs.to_string_lossy().into_owned();
    snapshot_and_delete_leave_no_key("fs-ext4", &[&mkfs, "-q", "-F"], "copy");
}
