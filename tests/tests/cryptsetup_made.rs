//! cryptnbd reads headers cryptsetup made.
//!
//! `cryptsetup luksFormat` on a 3 TiB sparse file (segment size "dynamic", one pbkdf2
//! keyslot, no token): `volume::inspect` and `cryptnbdctl inspect` read it,
//! `Volume::open_with_key` opens it with the volume key given to luksFormat (which
//! `luksDump --dump-volume-key` confirms) and refuses a wrong key with `WrongKey`, and data
//! written through `Volume`, also past 2 TiB, decrypts with the independent oracle.

use std::process::Command;

use e2e_tests::{
    Ctl, DATA_OFFSET, Oracle, Segment, TIB, TestDir, check_reads, check_with_oracle, cryptsetup,
    cryptsetup_dump_volume_key, cryptsetup_test_passphrase, exercise_volume, flip_one_byte,
    has_line_with, luks_dump_json, random_key, run, sparse_file,
};
use kms_client::local::{LocalKms, LocalKmsOptions};
use serde_json::{Value, json};
use volume::VolumeErrorKind;

const FILE_SIZE: u64 = 3 * TIB;

async fn reads_cryptsetup_made_volume(sector_size: u32) {
    let dir = TestDir::new(&format!("luksformat-{sector_size}"));
    let image = dir.join("cs.img");
    sparse_file(&image, FILE_SIZE);
    let key = random_key();
    let key_file = dir.write_secret("volume.key", &key);
    let pass_file = dir.write_secret("pass", b"e2e luksFormat passphrase");
    run(Command::new(cryptsetup())
        .args([
            "luksFormat",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            "512",
            "--sector-size",
            &sector_size.to_string(),
            "--volume-key-file",
        ])
        .arg(&key_file)
        .arg("--batch-mode")
        .arg(&image)
        .arg(&pass_file))
    .assert_success();

    // What cryptsetup wrote: a dynamic segment, one keyslot, no token.
    let md_before = luks_dump_json(&image);
    let seg = &md_before["segments"]["0"];
    assert_eq!(seg["size"], "dynamic", "{md_before}");
    assert_eq!(seg["offset"], DATA_OFFSET.to_string(), "{md_before}");
    assert_eq!(seg["sector_size"], sector_size, "{md_before}");
    assert_eq!(seg["encryption"], "aes-xts-plain64", "{md_before}");
    assert_eq!(md_before["tokens"], json!({}), "{md_before}");
    let text = run(Command::new(cryptsetup()).arg("luksDump").arg(&image));
    text.assert_success();
    assert!(
        has_line_with(&text.stdout_text(), &["length:", "(whole device)"]),
        "{}",
        text.stdout_text()
    );

    // The key luksFormat was given is the volume key, as cryptsetup itself reports.
    let dumped = cryptsetup_dump_volume_key(&image, &pass_file, &dir.join("dumped.key"));
    assert!(
        *dumped == *key,
        "cryptsetup's dumped volume key differs from the one given to luksFormat"
    );

    // volume::inspect reads it: no token, one keyslot, size to the end of the file.
    let expected_size = FILE_SIZE - DATA_OFFSET;
    let info = volume::inspect(&image).expect("inspect a cryptsetup-made header");
    assert!(info.token.is_none(), "{info:?}");
    assert_eq!(info.keyslots, 1, "{info:?}");
    assert_eq!(info.sector_size, sector_size, "{info:?}");
    assert_eq!(info.data_offset, DATA_OFFSET, "{info:?}");
    assert_eq!(info.size, expected_size, "{info:?}");
    assert_eq!(info.iv_tweak, 0, "{info:?}");
    assert_eq!(info.key_bits, 512, "{info:?}");
    assert_eq!(info.cipher, "aes-xts-plain64", "{info:?}");
    assert!(info.primary_header_problem.is_none(), "{info:?}");
    assert!(info.secondary_header_problem.is_none(), "{info:?}");
    assert_eq!(md_before["keyslots"]["0"]["type"], "luks2", "{md_before}");
    // So does the CLI, by path, with and without --json.
    let state = dir.state_dir();
    let ctl = Ctl::new(&state);
    let cli = ctl.inspect_json(&image);
    assert_eq!(cli["token"], Value::Null, "{cli}");
    assert_eq!(cli["keyslots"], 1, "{cli}");
    assert_eq!(cli["size"], expected_size, "{cli}");
    assert_eq!(cli["uuid"], info.uuid.as_str(), "{cli}");
    let image_arg = image.to_string_lossy();
    let out = ctl.run(&["inspect", &image_arg]);
    out.assert_success();
    assert!(
        has_line_with(&out.stdout_text(), &["kms token:", "none"]),
        "{}",
        out.stdout_text()
    );

    // No token: opening through a KMS is refused as unsupported, before any KMS call.
    let kms_dir = dir.join("keystore");
    let kms = LocalKms::open(
        &kms_dir,
        LocalKmsOptions {
            create_if_missing: true,
            ..Default::default()
        },
    )
    .expect("create a keystore");
    let err = volume::Volume::open(&image, &volume::OpenOptions::default(), &kms)
        .await
        .expect_err("a volume without token cannot be opened through the KMS");
    assert_eq!(err.kind(), VolumeErrorKind::Unsupported, "{err}");

    // Wrong keys are refused by the digest: one byte flipped in either AES key, or a key of
    // the wrong length.
    for wrong in [flip_one_byte(&key, 40), flip_one_byte(&key, 0)] {
        let err = volume::Volume::open_with_key(&image, &wrong, false)
            .expect_err("a wrong key must be refused");
        assert_eq!(err.kind(), VolumeErrorKind::WrongKey, "{err}");
    }
    let err = volume::Volume::open_with_key(&image, &key[..32], false)
        .expect_err("a 32-byte key must be refused");
    assert_eq!(err.kind(), VolumeErrorKind::WrongKey, "{err}");

    // The right key opens it; data written past 2 TiB decrypts with the oracle.
    let vol = volume::Volume::open_with_key(&image, &key, false).expect("open with the key");
    assert_eq!(vol.size(), expected_size);
    assert_eq!(vol.sector_size(), sector_size);
    let model = exercise_volume(&vol, 0xc5_0000 + u64::from(sector_size));
    check_reads(&vol, &model);
    drop(vol);
    let segment = Segment {
        data_offset: DATA_OFFSET,
        sector_size,
        iv_tweak: 0,
    };
    check_with_oracle(&Oracle::new(), &key_file, &image, &segment, &model);

    // Our I/O left cryptsetup's header alone: same metadata, the passphrase still opens it.
    assert_eq!(luks_dump_json(&image), md_before);
    cryptsetup_test_passphrase(&pass_file, &image).assert_success();
    // And a fresh open reads the same data.
    let vol = volume::Volume::open_with_key(&image, &key, true).expect("reopen read-only");
    check_reads(&vol, &model);
}

#[tokio::test]
async fn reads_cryptsetup_made_volume_512() {
    reads_cryptsetup_made_volume(512).await;
}

#[tokio::test]
async fn reads_cryptsetup_made_volume_4096() {
    reads_cryptsetup_made_volume(4096).await;
}
