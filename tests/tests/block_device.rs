//! Volumes on block devices (issue 16: where an encrypted root lives): a loop device stands
//! for a partition. `create --path DEVICE` formats it in place, all of it by default, and
//! cryptsetup reads the header; a device that holds something, is in use, or is too small is
//! refused with every byte left as it was. Needs root (losetup).

use std::process::Command;

use e2e_tests::daemon::{Daemon, cryptnbd_bin};
use e2e_tests::loopdev::Loop;
use e2e_tests::{Ctl, TEST_DIRECTORY, TEST_SID, TestDir, cryptsetup, require_tool, run};

#[test]
fn a_volume_is_made_on_a_block_device_in_place_and_cryptsetup_reads_it() {
    let dir = TestDir::new("blockdev");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("boot");
    let disk = Loop::new(&dir, "disk", 96 << 20);
    let out = disk.create_volume(&ctl, &[]);
    out.assert_success();
    let created = out.json();
    assert_eq!(created["store"], "device", "{created}");
    let uuid = created["uuid"].as_str().expect("the header's UUID");
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
    assert_eq!(inspected["uuid"], uuid);
    assert!(dump.stdout_text().contains(uuid), "{}", dump.stdout_text());
    run(Command::new(cryptsetup()).arg("isLuks").arg(&disk.dev)).assert_success();
    assert_eq!(
        inspected["token"]["volume_id"], created["volume_id"],
        "{inspected}"
    );

    // A second create finds the header and leaves the device alone.
    let before = disk.bytes();
    // `conflict`: exit 4, as for any name already taken.
    disk.create_volume(&ctl, &[])
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
    fs.create_volume(&ctl, &[])
        .assert_code(4)
        .assert_stderr_contains("holds an ext2/3/4 filesystem");
    assert!(fs.bytes() == before, "the filesystem was written over");

    // Too small for the size asked, and too small for any volume.
    let small = Loop::new(&dir, "small", 32 << 20);
    let before = small.bytes();
    small
        .create_volume(&ctl, &["--size", "20M"])
        .assert_code(2)
        .assert_stderr_contains("does not fit");
    assert!(small.bytes() == before);
    let tiny = Loop::new(&dir, "tiny", 8 << 20);
    tiny.create_volume(&ctl, &[]).assert_code(2);

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
    busy.create_volume(&ctl, &[])
        .assert_stderr_contains("is in use")
        .assert_stderr_contains("unmount or close it first");
    drop(holder);
    assert!(busy.bytes() == before);
    busy.create_volume(&ctl, &[]).assert_success();
}

/// Attaches volume `root` of `d` with its identity.
fn attach_root(d: &Daemon) -> e2e_tests::Outcome {
    d.ctl.run(&[
        "attach",
        "root",
        "--sid",
        TEST_SID,
        "--directory",
        TEST_DIRECTORY,
    ])
}

/// The daemon's config with `[store.devices] root = VALUE`.
fn devices_config(value: &str) -> String {
    format!("[store.devices]\nroot = \"{value}\"\n")
}

#[test]
fn a_device_named_in_the_config_is_attached_and_rekeyed_and_the_copying_verbs_are_refused() {
    let dir = TestDir::new("blockdev-daemon");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("boot");
    ctl.create_key("other");
    let disk = Loop::new(&dir, "disk", 64 << 20);
    disk.create_volume(&ctl, &[]).assert_success();
    let uuid = ctl.inspect_json(disk.path())["uuid"]
        .as_str()
        .expect("uuid")
        .to_owned();

    // By the LUKS2 UUID, found by reading the devices (no udev link here).
    let d = Daemon::start(
        &dir,
        &devices_config(&format!("UUID={}", uuid.to_uppercase())),
    );
    let listed = d.ctl.run(&["--json", "list"]);
    listed.assert_success();
    let listed = listed.stdout_text();
    assert!(listed.contains("\"root\""), "{listed}");

    attach_root(&d).assert_success();
    // Attached, the device is held exclusively: nothing can mount or map it meanwhile.
    let held = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&disk.dev)
    };
    assert_eq!(
        held.expect_err("an exclusive open of an attached device")
            .raw_os_error(),
        Some(libc::EBUSY)
    );
    let data = e2e_tests::TestRng::new(16).bytes(4 << 20);
    d.write_export("root", &data, &dir.join("in.img"));
    d.ctl.run(&["detach", "root"]).assert_success();
    // Ciphertext on the device: the plaintext is nowhere in it.
    let raw = disk.bytes();
    let sectors: std::collections::HashSet<&[u8]> = data.chunks(4096).collect();
    assert!(
        !raw.chunks(4096).any(|c| sectors.contains(c)),
        "a plaintext sector on the device"
    );

    // Rekey changes the header in place; the data reads back under the new wrapping.
    d.ctl
        .run(&["rekey", "root", "--kms-key", "alias/other"])
        .assert_success();
    run(Command::new(cryptsetup()).arg("luksDump").arg(&disk.dev)).assert_success();
    attach_root(&d).assert_success();
    let back = d.read_export("root", &dir.join("out.img"));
    assert!(back[..data.len()] == data[..], "the data read back differs");
    d.ctl.run(&["detach", "root"]).assert_success();

    // Export, a recovery keyslot (cryptsetup opens the device with it) and a header backup.
    let plain = dir.join("plain.img");
    d.ctl
        .run(&[
            "export",
            "root",
            "--plaintext",
            "--to",
            plain.to_str().expect("utf-8"),
        ])
        .assert_success();
    assert!(std::fs::read(&plain).expect("export")[..data.len()] == data[..]);
    let pass = dir.write_secret("pass", b"correct horse battery staple");
    d.ctl
        .run(&[
            "recovery",
            "add",
            "root",
            "--passphrase-file",
            pass.to_str().expect("utf-8"),
        ])
        .assert_success();
    e2e_tests::cryptsetup_test_passphrase(&pass, disk.path()).assert_success();
    let backup = dir.join("header.bak");
    d.ctl
        .run(&[
            "header",
            "backup",
            "root",
            "--to",
            backup.to_str().expect("utf-8"),
        ])
        .assert_success();
    assert_eq!(
        std::fs::read(&backup).expect("backup")[..],
        disk.bytes()[..16 << 20],
        "the backup is the device's header area"
    );

    // The verbs that build a copy beside the volume, and delete, are refused untouched.
    let before = disk.bytes();
    let image = dir.join("image.raw");
    std::fs::write(&image, vec![7u8; 1 << 20]).expect("image");
    let image = image.to_str().expect("utf-8 path");
    for (args, said) in [
        (
            &["snapshot", "root"][..],
            "snapshots are copies kept beside a volume",
        ),
        (
            &["rebuild", "root", "--from-image", image][..],
            "a device holds one volume only",
        ),
        (&["reencrypt", "root"][..], "a device holds one volume only"),
        (
            &["delete", "root", "--yes"][..],
            "run `cryptsetup erase DEVICE`",
        ),
        (
            &["move", "root", "--to-store", "file"][..],
            "cannot move out of the block devices",
        ),
    ] {
        d.ctl.run(args).assert_code(2).assert_stderr_contains(said);
        assert!(disk.bytes() == before, "{args:?} changed the device");
    }
    assert!(
        !dir.state_dir().join("volumes/root.luks").exists(),
        "a copy of the device was left in the state directory"
    );
    d.stop();

    // By path, and a device that is not there: the daemon starts; attach says what it looked for.
    let d = Daemon::start(&dir, &devices_config(&disk.dev));
    attach_root(&d).assert_success();
    d.ctl.run(&["detach", "root"]).assert_success();
    d.stop();
    // A copy of the disk attached too: the UUID names two devices, and nothing is guessed.
    let copy = Loop::new(&dir, "copy", 64 << 20);
    std::fs::write(&copy.file, disk.bytes()).expect("copy the disk");
    let d = Daemon::start(&dir, &devices_config(&format!("UUID={uuid}")));
    attach_root(&d)
        .assert_stderr_contains(&format!("the LUKS2 UUID {uuid} is on 2 devices"))
        .assert_stderr_contains(&copy.dev);
    d.stop();
    drop(copy);
    let d = Daemon::start(
        &dir,
        &devices_config("UUID=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
    );
    attach_root(&d)
        .assert_stderr_contains("no block device holds a LUKS2 header with UUID 0f1e2d3c");
    d.stop();
}

#[test]
fn a_wrong_device_entry_stops_the_daemon_with_a_sentence() {
    let dir = TestDir::new("blockdev-config");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("boot");
    ctl.create_volume("root", "1M", "alias/boot", 512, &[]);
    let config = dir.join("bad.toml");
    for (entry, said) in [
        (
            "root = \"vdb\"",
            "name a device by its path (/dev/…) or by its LUKS2 header's UUID",
        ),
        ("root = \"UUID=1234\"", "a UUID is 36 characters"),
        ("\"bad name\" = \"/dev/vdb\"", "invalid volume name"),
        // A device may not take the name of a volume file.
        ("root = \"/dev/vdb\"", "a volume root exists in store file"),
    ] {
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nruntime_dir = \"{}\"\n[store.devices]\n{entry}\n",
                dir.state_dir().display(),
                dir.join("run").display()
            ),
        )
        .expect("config");
        // Exit 1, as for any start-up failure (docs/daemon.md).
        run(Command::new(cryptnbd_bin()).arg("--config").arg(&config))
            .assert_code(1)
            .assert_stderr_contains(said);
    }
}

#[test]
fn an_old_root_is_copied_onto_a_device_as_a_new_volume() {
    let dir = TestDir::new("blockdev-convert");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("boot");
    // The old root: an ext4 filesystem on a partition (a loop device) with a file in it.
    require_tool("mkfs.ext4", "e2fsprogs");
    let old = Loop::new(&dir, "old-root", 24 << 20);
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "oldroot", &old.dev])).assert_success();
    let old_bytes = old.bytes();

    // Too small a device: refused before anything is written.
    let small = Loop::new(&dir, "small", 32 << 20);
    let before = small.bytes();
    small
        .create_volume(&ctl, &["--from-image", &old.dev])
        .assert_code(2)
        .assert_stderr_contains("does not fit; nothing was written");
    assert!(small.bytes() == before);

    // The new disk: formatted and filled offline from the old partition.
    let disk = Loop::new(&dir, "disk", 48 << 20);
    let out = disk.create_volume(&ctl, &["--from-image", &old.dev]);
    out.assert_success();
    let uuid = out.json()["uuid"].as_str().expect("uuid").to_owned();
    let d = Daemon::start(&dir, &devices_config(&format!("UUID={uuid}")));
    attach_root(&d).assert_success();
    let back = d.read_export("root", &dir.join("back.img"));
    assert!(
        back[..old_bytes.len()] == old_bytes[..],
        "the volume does not hold the old root"
    );
    assert!(back[old_bytes.len()..].iter().all(|&b| b == 0));
    d.ctl.run(&["detach", "root"]).assert_success();
    d.stop();
}
