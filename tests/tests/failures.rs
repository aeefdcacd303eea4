//! Real failures, no mocks: a full filesystem while creating and while writing (tmpfs with a
//! size limit), and a failing fdatasync (ext4 on a loop device whose backing file lives on a
//! tmpfs too small for it, so writeback fails with EIO). Needs root (mount, losetup) and
//! e2fsprogs; a missing tool fails the test with its name.

use std::path::{Path, PathBuf};
use std::process::Command;

use kms_client::local::{LocalKms, LocalKmsOptions};
use kms_client::{ContextKeys, IdentityContext, KmsBackend};
use volume::{CreateOptions, Volume, VolumeErrorKind};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} ({e}): install it (see scripts/test-all.sh)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn require_root() {
    assert!(
        rustix_is_root(),
        "this test needs root (it mounts a tmpfs and uses a loop device); run the suite as root"
    );
}

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Unmounts / detaches in reverse order when dropped, even when the test fails.
struct Cleanup(Vec<(String, Vec<String>)>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (cmd, args) in self.0.iter().rev() {
            let _ = Command::new(cmd).args(args).status();
        }
    }
}

fn mount_tmpfs(dir: &Path, size: &str, cleanup: &mut Cleanup) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let d = dir.to_str().expect("utf-8 path");
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
            d,
        ],
    );
    cleanup
        .0
        .push(("umount".into(), vec!["-l".into(), d.into()]));
}

fn kms(dir: &Path) -> (KmsBackend, String) {
    let options = LocalKmsOptions {
        create_if_missing: true,
        ..Default::default()
    };
    let local = LocalKms::open(&dir.join("keystore"), options).expect("keystore");
    let key = local.create_key(Some("alias/failures"), "").expect("key");
    (KmsBackend::Local(local), key.key_id)
}

fn create_opts(key_id: &str, size: u64) -> CreateOptions {
    CreateOptions {
        size,
        sector_size: 4096,
        key_id: key_id.into(),
        identity: IdentityContext::new(
            "S-1-5-21-277731876-1789304096-451871588-1107",
            "d-1234abcd01",
            &IdentityContext::generate_volume_id(),
        )
        .expect("identity"),
        context_keys: ContextKeys::default(),
        extra_context: vec![],
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .collect()
}

#[test]
fn full_disk_while_creating_leaves_nothing_behind() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cleanup = Cleanup(vec![]);
    let mnt = tmp.path().join("small");
    // 16 KiB: room for less than the two 16 KiB header copies.
    mount_tmpfs(&mnt, "16k", &mut cleanup);
    let (kms, key) = kms(tmp.path());
    let path = mnt.join("vol.luks");
    let err = rt()
        .block_on(Volume::create(&path, &create_opts(&key, 1 << 30), &kms))
        .expect_err("full");
    assert_eq!(err.kind(), VolumeErrorKind::NoSpace, "{err}");
    assert!(
        err.to_string().contains("full"),
        "the message should say the disk is full: {err}"
    );
    assert!(entries(&mnt).is_empty(), "left behind: {:?}", entries(&mnt));
}

#[test]
fn full_disk_while_writing_is_reported_and_old_data_stays_readable() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cleanup = Cleanup(vec![]);
    let mnt = tmp.path().join("small");
    // Headers (32 KiB) plus 1 MiB of data fit; 8 MiB do not.
    mount_tmpfs(&mnt, "2m", &mut cleanup);
    let (kms, key) = kms(tmp.path());
    let path = mnt.join("vol.luks");
    let vol = rt()
        .block_on(Volume::create(&path, &create_opts(&key, 64 << 20), &kms))
        .expect("create");
    let first = vec![0x5au8; 1 << 20];
    vol.write_at(&first, 0).expect("first MiB fits");
    vol.flush().expect("flush");
    let big = vec![0xa5u8; 8 << 20];
    let err = vol.write_at(&big, 4 << 20).expect_err("no space");
    assert_eq!(err.kind(), VolumeErrorKind::NoSpace, "{err}");
    let mut back = vec![0u8; 1 << 20];
    vol.read_at(&mut back, 0).expect("read");
    assert!(
        back == first,
        "data written before the disk filled up changed"
    );
}

#[test]
fn failed_fdatasync_puts_the_volume_in_a_failed_state() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cleanup = Cleanup(vec![]);
    // A 12 MiB tmpfs holds a sparse 128 MiB image: ext4 on it believes it has room, but
    // writeback to the loop device fails once the tmpfs is full.
    let small = tmp.path().join("small");
    mount_tmpfs(&small, "12m", &mut cleanup);
    let image = small.join("fs.img");
    std::fs::File::create(&image)
        .expect("image")
        .set_len(128 << 20)
        .expect("size");
    let img = image.to_str().expect("utf-8");
    let loopdev = run("losetup", &["--find", "--show", img]);
    cleanup
        .0
        .push(("losetup".into(), vec!["-d".into(), loopdev.clone()]));
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            &loopdev,
        ],
    );
    let fs = tmp.path().join("fs");
    std::fs::create_dir_all(&fs).expect("mkdir");
    let fsd = fs.to_str().expect("utf-8");
    run("mount", &[&loopdev, fsd]);
    cleanup
        .0
        .push(("umount".into(), vec!["-l".into(), fsd.into()]));

    let (kms, key) = kms(tmp.path());
    let vol = rt()
        .block_on(Volume::create(
            &fs.join("vol.luks"),
            &create_opts(&key, 96 << 20),
            &kms,
        ))
        .expect("create");
    // 64 MiB of ciphertext does not fit in the tmpfs under the image.
    let chunk = vec![0x33u8; 4 << 20];
    for i in 0..16u64 {
        if let Err(e) = vol.write_at(&chunk, i * (4 << 20)) {
            panic!("writes into the page cache should succeed; got {e}");
        }
    }
    let err = vol
        .flush()
        .expect_err("fdatasync must fail when writeback fails");
    // The loop device passes the tmpfs's ENOSPC up; other devices say EIO.
    assert!(
        matches!(err.kind(), VolumeErrorKind::Io | VolumeErrorKind::NoSpace),
        "{err}"
    );
    assert!(err.to_string().contains("may be lost"), "{err}");
    assert!(
        !err.to_string().contains("retry"),
        "a failed flush must not be retried: {err}"
    );
    assert!(vol.is_failed());
    // From now on everything fails, including a flush that the kernel might now accept.
    let again = vol.flush().expect_err("still failed");
    assert_eq!(again.kind(), VolumeErrorKind::Failed);
    assert!(
        again.to_string().contains("detached and reattached"),
        "{again}"
    );
    let mut buf = [0u8; 16];
    assert_eq!(
        vol.read_at(&mut buf, 0).expect_err("read").kind(),
        VolumeErrorKind::Failed
    );
    assert_eq!(
        vol.write_at(&buf, 0).expect_err("write").kind(),
        VolumeErrorKind::Failed
    );
    drop(vol);
}
