//! Loop devices over files, standing for partitions and disks (needs root and util-linux's
//! losetup).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Ctl, Outcome, TEST_DIRECTORY, TEST_SID, TestDir, require_tool, run};

/// A loop device over a file of `size` bytes in a test directory, detached when dropped.
pub struct Loop {
    /// `/dev/loopN`.
    pub dev: String,
    /// The backing file.
    pub file: PathBuf,
}

impl Loop {
    /// A new loop device over a new sparse file `name` of `size` bytes in `dir`.
    #[track_caller]
    pub fn new(dir: &TestDir, name: &str, size: u64) -> Self {
        require_tool("losetup", "mount");
        let file = dir.join(name);
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        let out = run(Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(&file));
        out.assert_success();
        Self {
            dev: out.stdout_text().trim().to_owned(),
            file,
        }
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        Path::new(&self.dev)
    }

    /// `cryptnbdctl --json create root --path DEVICE` with the test identity and the master
    /// key `alias/boot`, and `extra` arguments: the device formatted in place, offline.
    pub fn create_volume(&self, ctl: &Ctl, extra: &[&str]) -> Outcome {
        let mut args = vec![
            "--json",
            "create",
            "root",
            "--path",
            &self.dev,
            "--kms-key",
            "alias/boot",
            "--sid",
            TEST_SID,
            "--directory",
            TEST_DIRECTORY,
        ];
        args.extend_from_slice(extra);
        ctl.run(&args)
    }

    /// Every byte of the device (its backing file).
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.file).expect("read the backing file")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
