//! A real kernel filesystem on an NBD export without the kernel's NBD client: nbdfuse makes
//! the export a file, a loop device makes the file a block device, and ext4 is made and
//! mounted on it. Needs root (losetup, mount), libnbd-bin (nbdfuse) and e2fsprogs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{TestDir, require_tool, run};

/// nbdfuse + a loop device + a mount, torn down in order when dropped.
pub struct Mounted {
    fuse_dir: PathBuf,
    loopdev: Option<String>,
    /// Where the filesystem is mounted.
    pub mnt: PathBuf,
    nbdfuse: Option<Child>,
    mounted: bool,
}

impl Mounted {
    /// Mounts the export (formatting it ext4 first with `mkfs`).
    pub fn new(dir: &TestDir, uri_socket: &Path, export: &str, mkfs: bool) -> Self {
        let nbdfuse = require_tool("nbdfuse", "libnbd-bin");
        let fuse_dir = dir.join("fuse");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&fuse_dir).expect("mkdir");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let pid_file = dir.join("fuse.pid");
        let _ = std::fs::remove_file(&pid_file);
        let child = Command::new(nbdfuse)
            .arg("-P")
            .arg(&pid_file)
            .arg(fuse_dir.join("disk"))
            .arg(format!(
                "nbd+unix:///{export}?socket={}",
                uri_socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdfuse");
        let mut m = Self {
            fuse_dir: fuse_dir.clone(),
            loopdev: None,
            mnt: mnt.clone(),
            nbdfuse: Some(child),
            mounted: false,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::metadata(&pid_file).map(|m| m.len()).unwrap_or(0) == 0 {
            if let Some(c) = m.nbdfuse.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("nbdfuse exited before mounting ({status})");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nbdfuse did not mount within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let disk = fuse_dir.join("disk");
        let out = run(Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(&disk));
        out.assert_success();
        let loopdev = out.stdout_text().trim().to_string();
        m.loopdev = Some(loopdev.clone());
        if mkfs {
            require_tool("mkfs.ext4", "e2fsprogs");
            run(Command::new("mkfs.ext4").args(["-q", "-F", &loopdev])).assert_success();
        }
        run(Command::new("mount").arg(&loopdev).arg(&mnt)).assert_success();
        m.mounted = true;
        m
    }

    /// Unmounts, checking each step.
    pub fn unmount(mut self) {
        self.teardown(true);
    }

    /// Unmounts the filesystem, checks it with `e2fsck -fn` (which must find it clean), then
    /// tears the rest down.
    pub fn fsck_and_unmount(mut self) {
        let loopdev = self.loopdev.clone().expect("loop");
        run(Command::new("umount").arg(&self.mnt)).assert_success();
        self.mounted = false;
        let fsck = run(Command::new("e2fsck").args(["-fn", &loopdev]));
        assert_eq!(
            fsck.code,
            Some(0),
            "e2fsck -fn is not clean:\n{}\n{}",
            fsck.stdout_text(),
            fsck.stderr
        );
        self.teardown(true);
    }

    fn teardown(&mut self, check: bool) {
        if self.mounted {
            let out = run(Command::new("umount").arg(&self.mnt));
            if check {
                out.assert_success();
            }
            self.mounted = false;
        }
        if let Some(l) = self.loopdev.take() {
            let out = run(Command::new("losetup").arg("-d").arg(&l));
            if check {
                out.assert_success();
            }
        }
        let _ = run(Command::new("umount").arg(&self.fuse_dir));
        if let Some(mut c) = self.nbdfuse.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.teardown(false);
    }
}
