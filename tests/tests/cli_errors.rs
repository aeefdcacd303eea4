//! `cryptnbdctl`'s error paths and exit codes (ctl/src/exit.rs): 2 bad argument, 3 no such key
//! or volume, 4 conflict, 5 KMS refused, 7 damaged volume. A failed `create` leaves nothing in
//! the volumes directory, and every `--json` output parses as JSON.

use e2e_tests::{
    Ctl, TEST_DIRECTORY, TEST_SID, TestDir, TestRng, assert_bytes_eq, dir_entries, patch_file,
    sparse_file,
};
use serde_json::Value;

const USAGE: i32 = 2;
const NOT_FOUND: i32 = 3;
const CONFLICT: i32 = 4;
const KMS_REFUSED: i32 = 5;
const DAMAGED: i32 = 7;

/// `create NAME --size 16M --kms-key KEY` with the given SID, directory and extra arguments.
fn create(
    ctl: &Ctl,
    name: &str,
    key: &str,
    sid: &str,
    directory: &str,
    extra: &[&str],
) -> e2e_tests::Outcome {
    let mut args = vec![
        "create",
        name,
        "--size",
        "16M",
        "--kms-key",
        key,
        "--sid",
        sid,
        "--directory",
        directory,
    ];
    args.extend_from_slice(extra);
    ctl.run(&args)
}

/// Nothing but `expected` in the volumes directory (which may not exist at all).
#[track_caller]
fn assert_volumes_dir_holds(dir: &TestDir, expected: &[&str]) {
    let volumes = dir.volumes_dir();
    let found = if volumes.exists() {
        dir_entries(&volumes)
    } else {
        Vec::new()
    };
    assert_eq!(found, expected, "entries of {}", volumes.display());
}

#[test]
fn create_refuses_malformed_identities_with_the_expected_form() {
    let dir = TestDir::new("bad-identity");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("e2e");
    let sid_form = "expected S-1-<authority>-<subauthority>";
    let dir_form = "expected d- followed by 10 lowercase hex digits";
    let vol_form = "expected vol- followed by 17 lowercase hex digits";
    let cases: &[(&str, &str, &[&str], &str)] = &[
        ("S-1-5-x", TEST_DIRECTORY, &[], sid_form),
        ("s-1-5-21-1", TEST_DIRECTORY, &[], sid_form),
        ("S-1-5", TEST_DIRECTORY, &[], sid_form),
        (
            "S-1-5-21-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16",
            TEST_DIRECTORY,
            &[],
            sid_form,
        ),
        ("", TEST_DIRECTORY, &[], sid_form),
        (TEST_SID, "d-1234ABCD01", &[], dir_form),
        (TEST_SID, "d-123", &[], dir_form),
        (TEST_SID, "1234abcd01", &[], dir_form),
        (
            TEST_SID,
            TEST_DIRECTORY,
            &["--volume-id", "vol-123"],
            vol_form,
        ),
        (
            TEST_SID,
            TEST_DIRECTORY,
            &["--volume-id", "vol-0123456789ABCDEF0"],
            vol_form,
        ),
        (
            TEST_SID,
            TEST_DIRECTORY,
            &["--volume-id", "0123456789abcdef0"],
            vol_form,
        ),
    ];
    for (sid, directory, extra, form) in cases {
        let out = create(&ctl, "v", "alias/e2e", sid, directory, extra);
        out.assert_code(USAGE).assert_stderr_contains(form);
        assert!(out.stdout.is_empty(), "{}", out.stdout_text());
    }
    // The examples in the messages are themselves valid.
    let out = create(&ctl, "v", "alias/e2e", "S-1-5-x", TEST_DIRECTORY, &[]);
    out.assert_stderr_contains("such as S-1-5-21-277731876-1789304096-451871588-1107");
    // Other bad arguments: volume name, size, sector size, context pair.
    for (name, extra) in [
        ("bad/name", &[][..]),
        (".hidden", &[][..]),
        ("v", &["--size", "1000"][..]),
        ("v", &["--sector-size", "1024"][..]),
        ("v", &["--context", "novalue"][..]),
        (
            "v",
            &["--context", "cryptnbd:volume-id=vol-0123456789abcdef0"][..],
        ),
    ] {
        let mut args = extra.to_vec();
        if !extra.contains(&"--size") {
            args.extend(["--size", "16M"]);
        }
        let mut full = vec![
            "create",
            name,
            "--kms-key",
            "alias/e2e",
            "--sid",
            TEST_SID,
            "--directory",
            TEST_DIRECTORY,
        ];
        full.extend(args);
        ctl.run(&full).assert_code(USAGE);
    }
    assert_volumes_dir_holds(&dir, &[]);
}

#[test]
fn create_over_an_existing_volume_or_file_is_a_conflict() {
    let dir = TestDir::new("exists");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("e2e");
    create(&ctl, "v", "alias/e2e", TEST_SID, TEST_DIRECTORY, &[]).assert_success();
    let path = dir.volumes_dir().join("v.luks");
    let before = std::fs::read(&path).expect("read the volume");
    create(
        &ctl,
        "v",
        "alias/e2e",
        TEST_SID,
        TEST_DIRECTORY,
        &["--sector-size", "512"],
    )
    .assert_code(CONFLICT)
    .assert_stderr_contains("already exists");
    assert_bytes_eq(
        &std::fs::read(&path).expect("read the volume"),
        &before,
        "the existing volume after a refused create",
    );
    assert_volumes_dir_holds(&dir, &["v.luks"]);

    // --path onto an existing file that is not a volume: refused, the file untouched.
    let other = dir.join("precious.dat");
    let content = TestRng::new(7).bytes(10_000);
    std::fs::write(&other, &content).expect("write a file");
    let other_arg = other.to_string_lossy();
    create(
        &ctl,
        "w",
        "alias/e2e",
        TEST_SID,
        TEST_DIRECTORY,
        &["--path", &other_arg],
    )
    .assert_code(CONFLICT);
    assert_bytes_eq(
        &std::fs::read(&other).expect("read the file"),
        &content,
        "a file create refused to overwrite",
    );
    let mut expected = vec!["precious.dat".to_owned(), "state".to_owned()];
    expected.sort();
    assert_eq!(dir_entries(dir.path()), expected);
}

#[test]
fn create_with_an_unknown_key_is_not_found() {
    let dir = TestDir::new("unknown-key");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("e2e");
    for key in ["alias/nope", "11111111-2222-4333-8444-555555555555"] {
        create(&ctl, "v", key, TEST_SID, TEST_DIRECTORY, &[])
            .assert_code(NOT_FOUND)
            .assert_stderr_contains(key);
    }
    assert_volumes_dir_holds(&dir, &[]);
    // And inspecting a volume that does not exist.
    ctl.run(&["inspect", "nosuchvolume"]).assert_code(NOT_FOUND);
}

#[test]
fn create_with_a_disabled_key_is_refused_by_the_kms() {
    let dir = TestDir::new("disabled-key");
    let ctl = Ctl::new(&dir.state_dir());
    let key_id = ctl.create_key("e2e");
    let out = ctl.run(&["--json", "kms", "disable-key", "alias/e2e"]);
    out.assert_success();
    assert_eq!(out.json()["state"], "Disabled", "{}", out.stdout_text());
    create(&ctl, "v", "alias/e2e", TEST_SID, TEST_DIRECTORY, &[])
        .assert_code(KMS_REFUSED)
        .assert_stderr_contains("disabled");
    create(&ctl, "v", &key_id, TEST_SID, TEST_DIRECTORY, &[]).assert_code(KMS_REFUSED);
    assert_volumes_dir_holds(&dir, &[]);
    // Enabled again, the same command works: the refusal was the key's state.
    let out = ctl.run(&["--json", "kms", "enable-key", &key_id]);
    out.assert_success();
    assert_eq!(out.json()["state"], "Enabled", "{}", out.stdout_text());
    create(&ctl, "v", "alias/e2e", TEST_SID, TEST_DIRECTORY, &[]).assert_success();
    assert_volumes_dir_holds(&dir, &["v.luks"]);
}

#[test]
fn create_that_fails_after_making_its_file_leaves_nothing_behind() {
    let dir = TestDir::new("leftovers");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("e2e");
    create(&ctl, "keep", "alias/e2e", TEST_SID, TEST_DIRECTORY, &[]).assert_success();
    // A size no file can have (2^63 - 4096 bytes of data after a 16 MiB header): the KMS
    // call and the header succeed, then sizing the file fails.
    let size = ((1u64 << 63) - 4096).to_string();
    let out = ctl.run(&[
        "create",
        "huge",
        "--size",
        &size,
        "--kms-key",
        "alias/e2e",
        "--sid",
        TEST_SID,
        "--directory",
        TEST_DIRECTORY,
    ]);
    assert!(
        out.code.is_some_and(|c| c != 0),
        "an impossible size must fail: {out:?}"
    );
    assert_volumes_dir_holds(&dir, &["keep.luks"]);
}

#[test]
fn inspect_of_a_file_that_is_no_volume_is_damaged() {
    let dir = TestDir::new("not-a-volume");
    let ctl = Ctl::new(&dir.state_dir());
    let random = dir.join("random.bin");
    std::fs::write(&random, TestRng::new(1).bytes(1 << 20)).expect("write");
    let zeros = dir.join("zeros.bin");
    sparse_file(&zeros, 64 << 20);
    let empty = dir.join("empty.bin");
    sparse_file(&empty, 0);
    for file in [&random, &zeros, &empty] {
        let arg = file.to_string_lossy();
        let out = ctl.run(&["inspect", &arg]);
        out.assert_code(DAMAGED);
        let out = ctl.run(&["--json", "inspect", &arg]);
        out.assert_code(DAMAGED);
        assert!(out.stdout.is_empty(), "{}", out.stdout_text());
    }
}

#[tokio::test]
async fn inspect_reports_damaged_header_copies() {
    let dir = TestDir::new("damaged");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("e2e");
    create(&ctl, "v", "alias/e2e", TEST_SID, TEST_DIRECTORY, &[]).assert_success();
    let path = dir.volumes_dir().join("v.luks");
    let data = TestRng::new(3).bytes(10_000);
    let kms = ctl.local_kms();
    {
        let vol = volume::Volume::open(&path, &volume::OpenOptions::default(), &kms)
            .await
            .expect("open");
        vol.write_at(&data, 12_345).expect("write");
        vol.flush().expect("flush");
    }
    let pristine = std::fs::read(&path).expect("read the volume");
    let hdr = 16_384u64;
    // One byte of the JSON area changed: the copy's checksum fails.
    let damage = |copy: u64| {
        let at = copy * hdr + 4096 + 10;
        let old = pristine[at as usize];
        patch_file(&path, at, &[old ^ 0x20]);
    };
    let restore = || std::fs::write(&path, &pristine).expect("restore the volume");

    // Only the primary damaged: inspect works from the secondary and says so.
    damage(0);
    let info = ctl.inspect_json(&path);
    assert!(info["primary_header_problem"].is_string(), "{info}");
    assert_eq!(info["secondary_header_problem"], Value::Null, "{info}");
    assert_eq!(info["token"]["backend"], "local", "{info}");
    let text = ctl.run(&["inspect", &path.to_string_lossy()]);
    text.assert_success();
    assert!(
        text.stdout_text().contains("DAMAGED"),
        "{}",
        text.stdout_text()
    );
    // ... and the volume still opens through the KMS and reads its data.
    {
        let vol = volume::Volume::open(&path, &volume::OpenOptions::default(), &kms)
            .await
            .expect("open with the primary header damaged");
        let mut buf = vec![0u8; data.len()];
        vol.read_at(&mut buf, 12_345).expect("read");
        assert_bytes_eq(&buf, &data, "data read through the secondary header");
    }
    restore();

    // Only the secondary damaged.
    damage(1);
    let info = ctl.inspect_json(&path);
    assert_eq!(info["primary_header_problem"], Value::Null, "{info}");
    assert!(info["secondary_header_problem"].is_string(), "{info}");
    restore();

    // Both damaged: the volume is unreadable, exit 7, and cryptsetup agrees.
    damage(0);
    damage(1);
    ctl.run(&["inspect", &path.to_string_lossy()])
        .assert_code(DAMAGED);
    let out = ctl.run(&["--json", "inspect", &path.to_string_lossy()]);
    out.assert_code(DAMAGED);
    let cs = e2e_tests::run(
        std::process::Command::new(e2e_tests::cryptsetup())
            .arg("luksDump")
            .arg(&path),
    );
    assert_ne!(
        cs.code,
        Some(0),
        "cryptsetup read a header with both copies damaged"
    );
    let err = volume::Volume::open(&path, &volume::OpenOptions::default(), &kms)
        .await
        .expect_err("both copies damaged");
    assert_eq!(err.kind(), volume::VolumeErrorKind::Corrupt, "{err}");
}

#[test]
fn json_outputs_parse() {
    let dir = TestDir::new("json");
    let ctl = Ctl::new(&dir.state_dir());
    let key_id = ctl.create_key("e2e");
    let out = ctl.run(&["--json", "kms", "list-keys"]);
    out.assert_success();
    let keys = out.json();
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "{keys}");
    assert_eq!(keys[0]["key_id"], key_id.as_str(), "{keys}");
    for key in [key_id.as_str(), "alias/e2e"] {
        let out = ctl.run(&["--json", "kms", "describe-key", key]);
        out.assert_success();
        let meta = out.json();
        assert_eq!(meta["key_id"], key_id.as_str(), "{meta}");
        assert_eq!(meta["backend"], "local", "{meta}");
        assert_eq!(meta["versions"], 1, "{meta}");
    }
    let out = ctl.run(&["--json", "kms", "rotate-key", "alias/e2e"]);
    out.assert_success();
    assert_eq!(out.json()["versions"], 2, "{}", out.stdout_text());
    let created = ctl.create_volume("v", "1G", "alias/e2e", 4096, &[]);
    assert_eq!(created["key_id"], key_id.as_str(), "{created}");
    let volume_id = created["volume_id"].as_str().expect("volume_id");
    assert!(
        e2e_tests::kms_token(&e2e_tests::read_primary_metadata(
            &dir.volumes_dir().join("v.luks")
        ))["volume_id"]
            == volume_id,
        "the generated volume id is the token's"
    );
    // inspect by name and by path give the same document.
    let by_name = ctl.run(&["--json", "inspect", "v"]);
    by_name.assert_success();
    let by_path = ctl.inspect_json(&dir.volumes_dir().join("v.luks"));
    assert_eq!(by_name.json(), by_path);
    assert_eq!(by_path["size"], 1u64 << 30, "{by_path}");
    assert!(
        by_path["token"]["wrapped_key_bytes"].as_u64() > Some(64),
        "{by_path}"
    );
}

/// `cryptnbdctl list | head -0`: a reader that closed the pipe before anything was written
/// ends the command quietly with 141 (128 + SIGPIPE), not a panic (which was exit 134 with
/// "failed printing to stdout: Broken pipe").
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = TestDir::new("closed-stdout");
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("e2e");
    create(&ctl, "v", "alias/e2e", TEST_SID, TEST_DIRECTORY, &[]).assert_success();
    for args in [&["list"][..], &["--json", "list"][..]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = ctl
            .command(args)
            .stdout(writer)
            .output()
            .expect("run cryptnbdctl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} printed on stderr: {stderr}");
    }
    // The same command with a reader lists the volume.
    let listed = ctl.run(&["list"]).assert_success().stdout_text();
    assert!(listed.contains('v'), "{listed}");
}
