//! cryptsetup reads the volumes `cryptnbdctl create` makes.
//!
//! - `luksDump` lists the segment, the pbkdf2 digest and the `cryptnbd-kms` token, and its
//!   JSON dump carries every token field (512- and 4096-byte sectors).
//! - The digest proves the KMS key: the key unwrapped through the real local KMS is accepted
//!   by `cryptsetup luksAddKey --volume-key-file` (a key with one byte flipped is refused), the
//!   recovery passphrase it adds opens the volume in cryptsetup, and cryptnbd still opens
//!   cryptsetup's rewrite of its header through the KMS and reads the data written before.

use std::collections::BTreeMap;
use std::process::Command;

use e2e_tests::{
    Ctl, DATA_OFFSET, Model, SID_DIRECTORY_KEY, TEST_DIRECTORY, TEST_SID, TOKEN_TYPE, TestDir,
    TestRng, VOLUME_ID_KEY, assert_bytes_eq, cryptsetup, cryptsetup_add_key,
    cryptsetup_dump_volume_key, cryptsetup_test_passphrase, has_line_with, kms_token,
    luks_dump_json, read_primary_metadata, run, unwrap_volume_key,
};
use serde_json::{Value, json};

const VOLUME_SIZE: u64 = 64 << 20;

/// The lines of a `luksDump` section (from its title to the next unindented line).
fn section<'a>(dump: &'a str, title: &str) -> Vec<&'a str> {
    dump.lines()
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| l.starts_with([' ', '\t']))
        .collect()
}

fn cryptsetup_reads_created_volume(sector_size: u32) {
    let dir = TestDir::new(&format!("dump-{sector_size}"));
    let ctl = Ctl::new(&dir.state_dir());
    let key_id = ctl.create_key("e2e");
    let size = VOLUME_SIZE.to_string();
    let volume_id = "vol-0123456789abcdef0";
    // The 512 case lives in the state directory; the 4096 case at an explicit --path.
    let custom_path = dir.join("elsewhere.img");
    let custom = custom_path.to_string_lossy().into_owned();
    let mut extra = vec![
        "--volume-id",
        volume_id,
        "--context",
        "classification=secret",
    ];
    if sector_size == 4096 {
        extra.extend(["--path", custom.as_str()]);
    }
    let created = ctl.create_volume("vol1", &size, "alias/e2e", sector_size, &extra);
    let path = std::path::PathBuf::from(created["path"].as_str().expect("create --json: path"));
    if sector_size == 4096 {
        assert_eq!(path, custom_path, "{created}");
    } else {
        assert_eq!(path, dir.volumes_dir().join("vol1.luks"), "{created}");
    }
    let expected_context = json!({
        SID_DIRECTORY_KEY: format!("[{TEST_SID}]@[{TEST_DIRECTORY}]"),
        VOLUME_ID_KEY: volume_id,
        "classification": "secret",
    });
    assert_eq!(created["name"], "vol1", "{created}");
    assert_eq!(created["size"], VOLUME_SIZE, "{created}");
    assert_eq!(created["sector_size"], sector_size, "{created}");
    assert_eq!(created["key_id"], key_id.as_str(), "{created}");
    assert_eq!(created["volume_id"], volume_id, "{created}");
    assert_eq!(created["context"], expected_context, "{created}");
    let len = std::fs::metadata(&path).expect("stat the volume").len();
    assert_eq!(len, DATA_OFFSET + VOLUME_SIZE, "file length");

    // cryptsetup recognises a LUKS2 device.
    run(Command::new(cryptsetup())
        .args(["isLuks", "--type", "luks2"])
        .arg(&path))
    .assert_success();

    // luksDump, as text.
    let dump = run(Command::new(cryptsetup()).arg("luksDump").arg(&path));
    dump.assert_success();
    let text = dump.stdout_text();
    assert!(has_line_with(&text, &["Version:", "2"]), "{text}");
    let segments = section(&text, "Data segments:").join("\n");
    assert!(has_line_with(&segments, &["0: crypt"]), "{text}");
    assert!(
        has_line_with(&segments, &["offset:", &format!("{DATA_OFFSET} [bytes]")]),
        "{text}"
    );
    assert!(
        has_line_with(&segments, &["length:", &format!("{VOLUME_SIZE} [bytes]")]),
        "{text}"
    );
    assert!(
        has_line_with(&segments, &["cipher:", "aes-xts-plain64"]),
        "{text}"
    );
    assert!(
        has_line_with(&segments, &["sector:", &format!("{sector_size} [bytes]")]),
        "{text}"
    );
    assert!(
        section(&text, "Keyslots:").is_empty(),
        "a new volume has no keyslot:\n{text}"
    );
    let tokens = section(&text, "Tokens:").join("\n");
    assert!(has_line_with(&tokens, &["0: cryptnbd-kms"]), "{text}");
    let digests = section(&text, "Digests:").join("\n");
    assert!(has_line_with(&digests, &["0: pbkdf2"]), "{text}");
    assert!(has_line_with(&digests, &["Hash:", "sha256"]), "{text}");
    assert!(has_line_with(&digests, &["Iterations:", "1000"]), "{text}");
    let uuid = text
        .lines()
        .find_map(|l| l.strip_prefix("UUID:"))
        .map(str::trim)
        .expect("luksDump shows a UUID")
        .to_owned();

    // luksDump --dump-json-metadata, field by field.
    let md = luks_dump_json(&path);
    assert_eq!(md["keyslots"], json!({}), "{md}");
    let tokens = md["tokens"].as_object().expect("tokens object");
    assert_eq!(tokens.len(), 1, "{md}");
    let token = &tokens["0"];
    assert_eq!(token["type"], TOKEN_TYPE, "{token}");
    assert_eq!(token["keyslots"], json!([]), "{token}");
    assert_eq!(token["version"], 1, "{token}");
    assert_eq!(token["backend"], "local", "{token}");
    assert_eq!(token["key_id"], key_id.as_str(), "{token}");
    assert_eq!(token["context"], expected_context, "{token}");
    assert_eq!(
        token["context_keys"],
        json!({"sid_directory": SID_DIRECTORY_KEY, "volume_id": VOLUME_ID_KEY}),
        "{token}"
    );
    assert_eq!(token["volume_id"], volume_id, "{token}");
    let wrapped = token["wrapped_key"].as_str().expect("wrapped_key string");
    assert!(wrapped.len() > 64, "wrapped_key is too short: {token}");
    let created_at = token["created"].as_str().expect("created string");
    assert!(
        created_at.len() == 20 && created_at.ends_with('Z') && created_at.as_bytes()[10] == b'T',
        "created is not RFC 3339 UTC: {created_at}"
    );
    let seg = &md["segments"]["0"];
    assert_eq!(
        *seg,
        json!({
            "type": "crypt",
            "offset": DATA_OFFSET.to_string(),
            "size": VOLUME_SIZE.to_string(),
            "iv_tweak": "0",
            "encryption": "aes-xts-plain64",
            "sector_size": sector_size,
        }),
        "{md}"
    );
    let digest = &md["digests"]["0"];
    assert_eq!(digest["type"], "pbkdf2", "{digest}");
    assert_eq!(digest["keyslots"], json!([]), "{digest}");
    assert_eq!(digest["segments"], json!(["0"]), "{digest}");
    assert_eq!(digest["hash"], "sha256", "{digest}");
    assert_eq!(digest["iterations"], 1000, "{digest}");
    assert_eq!(
        md["config"],
        json!({"json_size": "12288", "keyslots_size": "16744448"}),
        "{md}"
    );
    // cryptsetup's view of the metadata is exactly what an independent reader finds on disk.
    assert_eq!(read_primary_metadata(&path), md);

    // Our own inspect agrees with cryptsetup.
    let info = ctl.inspect_json(&path);
    assert_eq!(info["uuid"], uuid.as_str(), "{info}");
    assert_eq!(info["size"], VOLUME_SIZE, "{info}");
    assert_eq!(info["sector_size"], sector_size, "{info}");
    assert_eq!(info["data_offset"], DATA_OFFSET, "{info}");
    assert_eq!(info["keyslots"], 0, "{info}");
    assert_eq!(info["primary_header_problem"], Value::Null, "{info}");
    assert_eq!(info["secondary_header_problem"], Value::Null, "{info}");
    assert_eq!(info["token"]["key_id"], key_id.as_str(), "{info}");
    assert_eq!(info["token"]["context"], expected_context, "{info}");
    assert!(
        !info.to_string().contains(wrapped),
        "inspect must not print the wrapped key"
    );
}

#[test]
fn cryptsetup_dumps_our_volume_512() {
    cryptsetup_reads_created_volume(512);
}

#[test]
fn cryptsetup_dumps_our_volume_4096() {
    cryptsetup_reads_created_volume(4096);
}

async fn digest_proves_the_kms_key(sector_size: u32) {
    let dir = TestDir::new(&format!("addkey-{sector_size}"));
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("e2e");
    ctl.create_volume("v", "64M", "alias/e2e", sector_size, &[]);
    let path = dir.volumes_dir().join("v.luks");
    let token_before = kms_token(&read_primary_metadata(&path));
    let seqid_before = ctl.inspect_json(&path)["seqid"].clone();

    // Data written through cryptnbd (key unwrapped by the KMS) before cryptsetup touches it.
    let kms = ctl.local_kms();
    let mut model = Model::new();
    let mut rng = TestRng::new(0x5eed_0000 + u64::from(sector_size));
    {
        let vol = volume::Volume::open(&path, &volume::OpenOptions::default(), &kms)
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
    let key_file = dir.write_secret("volume.key", &key);
    let wrong_file = dir.write_secret("wrong.key", &e2e_tests::flip_one_byte(&key, 17));
    let pass_file = dir.write_secret("recovery.pass", b"e2e recovery passphrase");
    let bad_pass_file = dir.write_secret("bad.pass", b"not the recovery passphrase");
    let add_key = |vk: &std::path::Path| cryptsetup_add_key(&path, vk, &pass_file);

    // A key one byte off is refused by the digest, and nothing changes.
    add_key(&wrong_file)
        .assert_code(2)
        .assert_stderr_contains("Volume key does not match the volume");
    let info = ctl.inspect_json(&path);
    assert_eq!(info["keyslots"], 0, "{info}");
    assert_eq!(info["seqid"], seqid_before, "{info}");

    // The KMS's key is accepted.
    add_key(&key_file).assert_success();
    cryptsetup_test_passphrase(&pass_file, &path).assert_success();
    cryptsetup_test_passphrase(&bad_pass_file, &path).assert_code(2);
    // And the new keyslot holds that same key.
    let dumped = cryptsetup_dump_volume_key(&path, &pass_file, &dir.join("dumped.key"));
    assert!(
        *dumped == *key,
        "cryptsetup's keyslot does not hold the KMS key"
    );

    // cryptsetup rewrote our header: one keyslot, the digest bound to it, our token intact.
    let dump = run(Command::new(cryptsetup()).arg("luksDump").arg(&path));
    dump.assert_success();
    let text = dump.stdout_text();
    assert!(
        has_line_with(&section(&text, "Keyslots:").join("\n"), &["0: luks2"]),
        "{text}"
    );
    let md = luks_dump_json(&path);
    assert_eq!(md["keyslots"].as_object().map(|m| m.len()), Some(1), "{md}");
    assert_eq!(md["digests"]["0"]["keyslots"], json!(["0"]), "{md}");
    let token_after = kms_token(&read_primary_metadata(&path));
    assert_eq!(
        token_after.into_iter().collect::<BTreeMap<_, _>>(),
        token_before.into_iter().collect::<BTreeMap<_, _>>(),
        "cryptsetup changed the cryptnbd-kms token"
    );
    let info = ctl.inspect_json(&path);
    assert_eq!(info["keyslots"], 1, "{info}");
    assert!(
        info["seqid"].as_u64() > seqid_before.as_u64(),
        "seqid did not grow: {info}"
    );
    assert_eq!(info["primary_header_problem"], Value::Null, "{info}");
    assert_eq!(info["secondary_header_problem"], Value::Null, "{info}");
    assert_eq!(info["sector_size"], sector_size, "{info}");
    assert_eq!(info["token"]["backend"], "local", "{info}");

    // cryptnbd opens cryptsetup's header through the KMS and reads what it wrote before.
    let vol = volume::Volume::open(&path, &volume::OpenOptions::default(), &kms)
        .await
        .expect("open through the KMS after luksAddKey");
    for (off, data) in [(0u64, 8192u64), (1_000_003, 5000), (40 << 20, 3)] {
        let mut buf = vec![0u8; data as usize];
        vol.read_at(&mut buf, off).expect("read_at");
        assert_bytes_eq(
            &buf,
            &model.expected(off, data),
            "data after cryptsetup's header rewrite",
        );
    }
    // And still writes.
    let more = rng.bytes(4096);
    vol.write_at(&more, 8 << 20)
        .expect("write after luksAddKey");
    let mut back = vec![0u8; 4096];
    vol.read_at(&mut back, 8 << 20).expect("read_at");
    assert_bytes_eq(&back, &more, "write after luksAddKey");
}

#[tokio::test]
async fn digest_proves_the_kms_key_512() {
    digest_proves_the_kms_key(512).await;
}

#[tokio::test]
async fn digest_proves_the_kms_key_4096() {
    digest_proves_the_kms_key(4096).await;
}
