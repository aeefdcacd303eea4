//! The recovery keyslot against the real cryptsetup, both ways.
//!
//! - A keyslot added by `volume::keyslot::add_recovery_keyslot` to a volume made by cryptnbd
//!   opens in cryptsetup (`open --test-passphrase`; a wrong passphrase is refused with rc 2),
//!   `luksDump --dump-volume-key` prints the KMS's key, that key decrypts the data in the
//!   independent AES-XTS oracle, `luksDump` shows the keyslot as cryptsetup's own, and
//!   cryptnbd still opens the volume through the KMS.
//! - Keyslots made by `cryptsetup luksAddKey --volume-key-file` (argon2id with 2 lanes,
//!   argon2i, pbkdf2) open with `volume::keyslot::unlock_keyslot`; cryptsetup accepts the
//!   header after cryptnbd adds its own keyslot next to them and removes one of theirs.
//! - After `remove_keyslot`, cryptsetup no longer opens the volume with that passphrase and
//!   the area's bytes in the file have changed.
//!
//! cryptsetup and the oracle's Python are required: a missing tool fails the test with its
//! name. Keys and passphrases go to the tools by 0600 files only.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e_tests::{
    Model, Oracle, Segment, TestDir, TestRng, assert_bytes_eq, cryptsetup,
    cryptsetup_dump_volume_key, cryptsetup_test_passphrase, has_line_with, luks_dump_json, run,
    unwrap_volume_key,
};
use kms_client::local::{LocalKms, LocalKmsOptions};
use kms_client::{ContextKeys, IdentityContext};
use serde_json::json;
use store::file::{Access, FileStore};
use volume::keyslot::{self, Argon2Params};
use volume::{CreateOptions, Volume, VolumeErrorKind};

const VOLUME_SIZE: u64 = 64 << 20;
/// The argon2id memory cost of the keyslots the tests add (KiB): enough to be a real
/// memory-hard derivation, small enough for an unoptimised test build.
const TEST_MEMORY_KIB: u32 = 16 * 1024;
/// Where the first keyslot area goes with 16 KiB header copies.
const FIRST_AREA: u64 = 32_768;
/// The area size of a 64-byte key: 4000 stripes rounded up to 4096 bytes.
const AREA_SIZE: u64 = 258_048;

/// A keystore with one key, and a new volume made through it.
async fn new_volume(dir: &TestDir, sector_size: u32) -> (LocalKms, PathBuf) {
    let kms = LocalKms::open(
        &dir.join("keystore"),
        LocalKmsOptions {
            create_if_missing: true,
            ..Default::default()
        },
    )
    .expect("create a keystore");
    let key = kms
        .create_key(Some("alias/recovery"), "")
        .expect("create a key");
    let path = dir.join("vol.luks");
    let opts = CreateOptions {
        size: VOLUME_SIZE,
        sector_size,
        key_id: key.key_id,
        identity: IdentityContext::new(
            e2e_tests::TEST_SID,
            e2e_tests::TEST_DIRECTORY,
            &IdentityContext::generate_volume_id(),
        )
        .expect("identity"),
        context_keys: ContextKeys::default(),
        extra_context: vec![],
    };
    Volume::create(&path, &opts, &kms)
        .await
        .expect("create the volume");
    (kms, path)
}

/// The volume's file engine, opened for writing (under its exclusive lock).
fn open_rw(path: &Path) -> FileStore {
    volume::open_file_store(path, Access::ReadWrite)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

/// The volume's file engine, opened for reading without a lock.
fn open_ro(path: &Path) -> FileStore {
    volume::open_file_store(path, Access::Inspect)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

/// The lines of a `luksDump` section (from its title to the next unindented line).
fn section<'a>(dump: &'a str, title: &str) -> Vec<&'a str> {
    dump.lines()
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| l.starts_with([' ', '\t']))
        .collect()
}

fn read_area(path: &Path, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; AREA_SIZE as usize];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, offset))
        .unwrap_or_else(|e| panic!("cannot read the keyslot area of {}: {e}", path.display()));
    buf
}

#[tokio::test]
async fn cryptsetup_opens_our_recovery_keyslot() {
    let dir = TestDir::new("recovery-ours");
    let (kms, path) = new_volume(&dir, 4096).await;

    // Data written through cryptnbd, with the key the KMS unwraps.
    let mut model = Model::new();
    let mut rng = TestRng::new(0x7ec0_5107);
    {
        let vol = Volume::open(&path, &volume::OpenOptions::default(), &kms)
            .await
            .expect("open through the KMS");
        for (off, len) in [(0u64, 8192usize), (1_000_003, 5000), (40 << 20, 3)] {
            let data = rng.bytes(len);
            vol.write_at(&data, off).expect("write_at");
            model.write(off, &data);
        }
        vol.flush().expect("flush");
    }
    let key = unwrap_volume_key(&kms, &path).await;
    let seqid_before = volume::inspect(&path).expect("inspect").seqid;

    let passphrase = b"correct horse battery staple, recovery edition";
    let pass_file = dir.write_secret("recovery.pass", passphrase);
    let bad_pass_file = dir.write_secret("bad.pass", b"not the recovery passphrase");
    let started = std::time::Instant::now();
    let id = {
        let file = open_rw(&path);
        // A wrong volume key is refused before anything changes.
        let wrong = e2e_tests::flip_one_byte(&key, 9);
        let err = keyslot::add_recovery_keyslot(
            &file,
            &wrong,
            passphrase,
            &Argon2Params::for_tests(TEST_MEMORY_KIB),
        )
        .expect_err("a wrong volume key must be refused");
        assert_eq!(err.kind(), VolumeErrorKind::WrongKey, "{err}");
        keyslot::add_recovery_keyslot(
            &file,
            &key,
            passphrase,
            &Argon2Params::for_tests(TEST_MEMORY_KIB),
        )
        .expect("add the recovery keyslot")
    };
    eprintln!("add_recovery_keyslot took {:?}", started.elapsed());
    assert_eq!(id, 0);
    let info = volume::inspect(&path).expect("inspect");
    assert_eq!(info.seqid, seqid_before + 1, "one header write");
    assert_eq!(info.keyslots, 1);
    assert!(info.primary_header_problem.is_none() && info.secondary_header_problem.is_none());

    // cryptsetup opens it with the passphrase, refuses another one.
    cryptsetup_test_passphrase(&pass_file, &path).assert_success();
    cryptsetup_test_passphrase(&bad_pass_file, &path).assert_code(2);

    // ... and finds the KMS's key in it.
    let dumped = dir.join("dumped.key");
    assert!(
        *cryptsetup_dump_volume_key(&path, &pass_file, &dumped) == *key,
        "cryptsetup's dump of the recovery keyslot is not the KMS key"
    );

    // That key decrypts the data in the independent oracle.
    let segment = Segment {
        data_offset: e2e_tests::DATA_OFFSET,
        sector_size: 4096,
        iv_tweak: 0,
    };
    let hulls = model.sector_hulls(4096);
    let plain = Oracle::new().decrypt(&dumped, &path, &segment, &hulls);
    for ((off, len), got) in hulls.iter().zip(&plain) {
        assert_bytes_eq(
            got,
            &model.expected(*off, *len),
            &format!("oracle with the dumped key at {off}"),
        );
    }

    // luksDump shows the keyslot as one of cryptsetup's own.
    let dump = run(Command::new(cryptsetup()).arg("luksDump").arg(&path));
    dump.assert_success();
    let text = dump.stdout_text();
    let slots = section(&text, "Keyslots:").join("\n");
    for parts in [
        &["0: luks2"][..],
        &["Key:", "512 bits"],
        &["Cipher:", "aes-xts-plain64"],
        &["PBKDF:", "argon2id"],
        &["Time cost:", "4"],
        &["Memory:", &TEST_MEMORY_KIB.to_string()],
        &["Threads:", "1"],
        &["AF stripes:", "4000"],
        &["AF hash:", "sha256"],
        &["Area offset:", "32768 [bytes]"],
        &["Area length:", "258048 [bytes]"],
        &["Digest ID:", "0"],
    ] {
        assert!(has_line_with(&slots, parts), "no {parts:?} in\n{text}");
    }
    let md = luks_dump_json(&path);
    let ks = &md["keyslots"]["0"];
    assert_eq!(ks["type"], "luks2", "{ks}");
    assert_eq!(ks["key_size"], 64, "{ks}");
    assert_eq!(
        ks["af"],
        json!({"type": "luks1", "stripes": 4000, "hash": "sha256"}),
        "{ks}"
    );
    assert_eq!(
        ks["area"],
        json!({"type": "raw", "offset": "32768", "size": "258048",
               "encryption": "aes-xts-plain64", "key_size": 64}),
        "{ks}"
    );
    let kdf = ks["kdf"].as_object().expect("kdf object");
    assert_eq!(
        kdf.keys().map(String::as_str).collect::<Vec<_>>(),
        ["type", "time", "memory", "cpus", "salt"],
        "{ks}"
    );
    assert_eq!(md["digests"]["0"]["keyslots"], json!(["0"]), "{md}");
    assert_eq!(md["digests"]["0"]["segments"], json!(["0"]), "{md}");
    assert_eq!(md["tokens"]["0"]["keyslots"], json!([]), "{md}");

    // Our own readers agree.
    let file = open_ro(&path);
    let unlocked = keyslot::unlock_keyslot(&file, passphrase).expect("unlock");
    assert!(*unlocked == *key, "unlock_keyslot returned another key");
    let err = keyslot::unlock_keyslot(&file, b"not it").expect_err("wrong passphrase");
    assert_eq!(err.kind(), VolumeErrorKind::WrongKey, "{err}");
    drop(file);

    // The token still works: cryptnbd opens the volume through the KMS and reads its data.
    let vol = Volume::open(&path, &volume::OpenOptions::default(), &kms)
        .await
        .expect("open through the KMS after adding the keyslot");
    for (off, len) in [(0u64, 8192u64), (1_000_003, 5000), (40 << 20, 3)] {
        let mut buf = vec![0u8; len as usize];
        vol.read_at(&mut buf, off).expect("read_at");
        assert_bytes_eq(
            &buf,
            &model.expected(off, len),
            "data after adding the keyslot",
        );
    }
}

#[tokio::test]
async fn we_open_keyslots_cryptsetup_made() {
    let dir = TestDir::new("recovery-theirs");
    let (kms, path) = new_volume(&dir, 512).await;
    let key = unwrap_volume_key(&kms, &path).await;
    let key_file = dir.write_secret("volume.key", &key);

    // Three keyslots by cryptsetup: argon2id over 2 lanes, argon2i, pbkdf2.
    let kinds: [(&str, &[&str]); 3] = [
        (
            "argon2id",
            &[
                "--pbkdf",
                "argon2id",
                "--pbkdf-memory",
                "16384",
                "--pbkdf-parallel",
                "2",
                "--pbkdf-force-iterations",
                "4",
            ],
        ),
        (
            "argon2i",
            &[
                "--pbkdf",
                "argon2i",
                "--pbkdf-memory",
                "8192",
                "--pbkdf-parallel",
                "1",
                "--pbkdf-force-iterations",
                "5",
            ],
        ),
        (
            "pbkdf2",
            &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
        ),
    ];
    let mut passes = Vec::new();
    for (i, (kind, args)) in kinds.iter().enumerate() {
        let pass = format!("cryptsetup {kind} passphrase {i}");
        let pass_file = dir.write_secret(&format!("{kind}.pass"), pass.as_bytes());
        run(Command::new(cryptsetup())
            .args(["luksAddKey", "--batch-mode", "--key-size", "512"])
            .arg("--volume-key-file")
            .arg(&key_file)
            .args(*args)
            .arg(&path)
            .arg(&pass_file))
        .assert_success();
        passes.push((pass, pass_file));
    }
    let md = luks_dump_json(&path);
    for (i, (kind, _)) in kinds.iter().enumerate() {
        assert_eq!(md["keyslots"][i.to_string()]["kdf"]["type"], *kind, "{md}");
    }
    assert_eq!(md["keyslots"]["0"]["kdf"]["cpus"], 2, "{md}");

    let file = open_rw(&path);
    for (pass, _) in &passes {
        let unlocked = keyslot::unlock_keyslot(&file, pass.as_bytes())
            .unwrap_or_else(|e| panic!("unlock_keyslot with a cryptsetup passphrase: {e}"));
        assert!(*unlocked == *key, "a cryptsetup keyslot gave another key");
    }
    let err = keyslot::unlock_keyslot(&file, b"none of them").expect_err("wrong");
    assert_eq!(err.kind(), VolumeErrorKind::WrongKey, "{err}");
    assert!(err.to_string().contains("tried 0, 1, 2"), "{err}");
    let listed = keyslot::keyslots(
        &volume::header::read_headers(&file)
            .expect("headers")
            .active
            .metadata,
    );
    assert_eq!(
        listed
            .iter()
            .map(|k| (k.id, k.kdf.clone().unwrap_or_default(), k.unlocks_data))
            .collect::<Vec<_>>(),
        [
            (0, "argon2id".to_string(), true),
            (1, "argon2i".to_string(), true),
            (2, "pbkdf2".to_string(), true)
        ]
    );

    // Our keyslot goes next to theirs: id 3, in the first free area after theirs.
    let ours = b"our recovery passphrase";
    let id =
        keyslot::add_recovery_keyslot(&file, &key, ours, &Argon2Params::for_tests(TEST_MEMORY_KIB))
            .expect("add next to cryptsetup's keyslots");
    assert_eq!(id, 3);
    // And one of theirs goes.
    keyslot::remove_keyslot(&file, 1).expect("remove cryptsetup's keyslot 1");
    drop(file);

    let md = luks_dump_json(&path);
    assert_eq!(
        md["keyslots"]["3"]["area"]["offset"],
        (FIRST_AREA + 3 * AREA_SIZE).to_string(),
        "{md}"
    );
    assert_eq!(
        md["digests"]["0"]["keyslots"],
        json!(["0", "2", "3"]),
        "{md}"
    );
    let our_pass = dir.write_secret("ours.pass", ours);
    cryptsetup_test_passphrase(&our_pass, &path).assert_success();
    cryptsetup_test_passphrase(&passes[0].1, &path).assert_success();
    cryptsetup_test_passphrase(&passes[2].1, &path).assert_success();
    cryptsetup_test_passphrase(&passes[1].1, &path).assert_code(2);
}

#[tokio::test]
async fn removed_keyslot_no_longer_opens() {
    let dir = TestDir::new("recovery-remove");
    let (kms, path) = new_volume(&dir, 4096).await;
    let key = unwrap_volume_key(&kms, &path).await;
    let passphrase = b"short-lived recovery passphrase";
    let pass_file = dir.write_secret("recovery.pass", passphrase);

    let file = open_rw(&path);
    let id = keyslot::add_recovery_keyslot(
        &file,
        &key,
        passphrase,
        &Argon2Params::for_tests(TEST_MEMORY_KIB),
    )
    .expect("add");
    drop(file);
    cryptsetup_test_passphrase(&pass_file, &path).assert_success();
    let area_before = read_area(&path, FIRST_AREA);

    let file = open_rw(&path);
    let err = keyslot::remove_keyslot(&file, id + 1).expect_err("no such keyslot");
    assert_eq!(err.kind(), VolumeErrorKind::NotFound, "{err}");
    keyslot::remove_keyslot(&file, id).expect("remove");
    drop(file);

    let out = cryptsetup_test_passphrase(&pass_file, &path);
    assert_ne!(
        out.code,
        Some(0),
        "cryptsetup still opens a removed keyslot:\n{}",
        out.stderr
    );
    let area_after = read_area(&path, FIRST_AREA);
    assert_ne!(
        area_before, area_after,
        "the keyslot area was not overwritten"
    );
    let md = luks_dump_json(&path);
    assert_eq!(md["keyslots"], json!({}), "{md}");
    assert_eq!(md["digests"]["0"]["keyslots"], json!([]), "{md}");
    let file = open_ro(&path);
    let err = keyslot::unlock_keyslot(&file, passphrase).expect_err("removed");
    assert_eq!(err.kind(), VolumeErrorKind::NotFound, "{err}");
    drop(file);

    // The token is untouched: the volume still opens through the KMS.
    Volume::open(&path, &volume::OpenOptions::default(), &kms)
        .await
        .expect("open through the KMS after removing the keyslot");
}
