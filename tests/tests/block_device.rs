//! Volumes on block devices (issue 16: where an encrypted root lives): a loop device stands
//! for a partition. `create --path DEVICE` formats it in place, all of it by default, and
//! cryptsetup reads the header; a device that holds something, is in use, or is too small is
//! refused with every byte left as it was. Needs root (losetup).

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e_tests::{Ctl, TEST_DIRECTORY, TEST_SID, TestDir, cryptsetup, require_tool, run};

/// A loop device over a file of `size` bytes in `dir`, detached when dropped.
struct Loop {
    dev: String,
    file: PathBuf,
}

impl Loop {
    fn new(dir: &TestDir, name: &str, size: u64) -> Self {
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

    fn path(&self) -> &Path {
        Path::new(&self.dev)
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.file).expect("read the backing file")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn create_on(ctl: &Ctl, dev: &str, extra: &[&str]) -> e2e_tests::Outcome {
    let mut args = vec![
        "--json",
        "create",
        "root",
        "--path",
        dev,
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

#[test]
fn a_volume_is_made_on_a_block_device_in_place_and_cryptsetup_reads_it() {
    let dir = TestDir::new("blockdev");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("boot");
    let disk = Loop::new(&dir, "disk", 96 << 20);
    let out = create_on(&ctl, &disk.dev, &[]);
    out.assert_success();
    let created = out.json();
    assert_eq!(created["store"], "device", "{created}");
    assert_eq!(
        created["size"],
        80u64 << 20,
        "all of the device after the header: {created}"
    );
    // Nothing was made in the state directory, and the device still has its size.
    assert!(!dir.state_dir().join("volumes/root.luks").exists());
    assert_eq!(std::fs::metadata(&disk.file).expect("file").len(), 96 << 20);

    let inspected = ctl.inspect_json(disk.path());
    let dump = run(Command::new(cryptsetup()).arg("luksDump").arg(&disk.dev));
    dump.assert_success();
    let uuid = inspected["uuid"].as_str().expect("uuid");
    assert!(dump.stdout_text().contains(uuid), "{}", dump.stdout_text());
    run(Command::new(cryptsetup()).arg("isLuks").arg(&disk.dev)).assert_success();
    assert_eq!(
        inspected["token"]["volume_id"], created["volume_id"],
        "{inspected}"
    );

    // A second create finds the header and leaves the device alone.
    let before = disk.bytes();
    // `conflict`: exit 4, as for any name already taken.
    create_on(&ctl, &disk.dev, &[])
        .assert_code(4)
        .assert_stderr_contains("holds a LUKS header")
        .assert_stderr_contains("wipefs -a");
    assert!(
        disk.bytes() == before,
        "a refused create changed the device"
    );
}

#[test]
fn a_device_that_holds_something_is_in_use_or_is_too_small_is_refused_untouched() {
    let dir = TestDir::new("blockdev-refused");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("boot");

    // A filesystem.
    let fs = Loop::new(&dir, "fs", 64 << 20);
    require_tool("mkfs.ext4", "e2fsprogs");
    run(Command::new("mkfs.ext4").args(["-q", "-F", &fs.dev])).assert_success();
    let before = fs.bytes();
    create_on(&ctl, &fs.dev, &[])
        .assert_code(4)
        .assert_stderr_contains("holds an ext2/3/4 filesystem");
    assert!(fs.bytes() == before, "the filesystem was written over");

    // Too small for the size asked, and too small for any volume.
    let small = Loop::new(&dir, "small", 32 << 20);
    let before = small.bytes();
    create_on(&ctl, &small.dev, &["--size", "20M"])
        .assert_code(2)
        .assert_stderr_contains("does not fit");
    assert!(small.bytes() == before);
    let tiny = Loop::new(&dir, "tiny", 8 << 20);
    create_on(&ctl, &tiny.dev, &[]).assert_code(2);

    // In use: another program holds it open exclusively (as a mount or a mapping does).
    let busy = Loop::new(&dir, "busy", 64 << 20);
    let before = busy.bytes();
    let holder = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&busy.dev)
            .expect("hold the device")
    };
    create_on(&ctl, &busy.dev, &[])
        .assert_stderr_contains("is in use")
        .assert_stderr_contains("unmount or close it first");
    drop(holder);
    assert!(busy.bytes() == before);
    create_on(&ctl, &busy.dev, &[]).assert_success();
}
