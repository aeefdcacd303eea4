//! The data cryptnbd writes decrypts with an independent AES-XTS implementation.
//!
//! The oracle (`tests/oracle/xts_oracle.py`, Python `cryptography`) is first checked against
//! IEEE 1619 test vector 10, so it is anchored to the standard and not to our code. Then a
//! 3 TiB sparse volume made by `cryptnbdctl create` is opened through the real local KMS,
//! written through `Volume` (aligned, unaligned and sub-sector data, zero buffers and
//! write-zeroes, offsets past 2 TiB where the IV exceeds 2^32), and the oracle, given the key
//! the KMS unwraps, must decrypt exactly the bytes written, for 512- and 4096-byte sectors.

use e2e_tests::{
    Ctl, DATA_OFFSET, GIB, Oracle, Segment, TIB, TestDir, allocated_bytes,
    assert_sectors_encrypted, check_reads, check_with_oracle, exercise_volume, unwrap_volume_key,
};

/// IEEE Std 1619-2007, XTS-AES-256 test vector 10: key1 || key2, data unit 0xff, 512 bytes.
const V10_KEY_HEX: &str = "27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592";
const V10_UNIT: u64 = 0xff;
const V10_CIPHERTEXT_HEX: &str = concat!(
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
    "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
    "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
    "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
    "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
    "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
    "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae",
    "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f",
    "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385",
    "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
);

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// The oracle follows IEEE 1619 and dm-crypt's plain64 conventions: the tweak is the
/// little-endian 512-byte unit number from the data segment start, plus `iv_tweak`.
#[test]
fn oracle_matches_ieee_1619_vector_10() {
    let dir = TestDir::new("oracle-kat");
    // The key as 128 hex digits (the oracle's other key format; cryptsetup's is raw).
    let key_file = dir.write_secret("v10.key", format!("{V10_KEY_HEX}\n").as_bytes());
    let ciphertext = unhex(V10_CIPHERTEXT_HEX);
    let plaintext: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let image = dir.join("kat.img");
    let data_offset = 8192u64;
    // Unit 0xff at byte 0xff * 512 of the data segment, with iv_tweak 0 ...
    e2e_tests::sparse_file(&image, data_offset + 1024 * 512);
    e2e_tests::patch_file(&image, data_offset + V10_UNIT * 512, &ciphertext);
    // ... and at byte 0, where iv_tweak 0xff gives it the same tweak.
    e2e_tests::patch_file(&image, data_offset, &ciphertext);
    let oracle = Oracle::new();
    let seg = |iv_tweak| Segment {
        data_offset,
        sector_size: 512,
        iv_tweak,
    };
    let got = oracle.decrypt(&key_file, &image, &seg(0), &[(V10_UNIT * 512, 512)]);
    e2e_tests::assert_bytes_eq(&got[0], &plaintext, "vector 10 at unit 0xff");
    let got = oracle.decrypt(&key_file, &image, &seg(V10_UNIT), &[(0, 512), (17, 100)]);
    e2e_tests::assert_bytes_eq(&got[0], &plaintext, "vector 10 with iv_tweak 0xff");
    e2e_tests::assert_bytes_eq(&got[1], &plaintext[17..117], "an unaligned slice of it");
    // With another tweak the same ciphertext is noise, so the tweak really is used.
    let got = oracle.decrypt(&key_file, &image, &seg(1), &[(0, 512)]);
    assert_ne!(got[0], plaintext, "the oracle ignores the tweak");
}

async fn volume_data_decrypts_with_the_oracle(sector_size: u32) {
    let dir = TestDir::new(&format!("oracle-{sector_size}"));
    let ctl = Ctl::new(&dir.state_dir());
    ctl.create_key("e2e");
    let created = ctl.create_volume("big", "3T", "alias/e2e", sector_size, &[]);
    assert_eq!(created["size"], 3 * TIB, "{created}");
    let path = dir.volumes_dir().join("big.luks");
    let kms = ctl.local_kms();

    let vol = volume::Volume::open(&path, &volume::OpenOptions::default(), &kms)
        .await
        .expect("open through the KMS");
    assert_eq!(vol.size(), 3 * TIB);
    assert_eq!(vol.sector_size(), sector_size);
    let model = exercise_volume(&vol, 0x0dac_1e00 + u64::from(sector_size));
    check_reads(&vol, &model);
    drop(vol);

    let info = ctl.inspect_json(&path);
    let segment = Segment {
        data_offset: info["data_offset"].as_u64().expect("data_offset"),
        sector_size,
        iv_tweak: info["iv_tweak"].as_u64().expect("iv_tweak"),
    };
    assert_eq!(segment.data_offset, DATA_OFFSET, "{info}");
    let key = unwrap_volume_key(&kms, &path).await;
    let key_file = dir.write_secret("volume.key", &key);
    check_with_oracle(&Oracle::new(), &key_file, &path, &segment, &model);

    // Zeros written by the client are ciphertext on disk (dm-crypt reads them as zeros).
    let ss = u64::from(sector_size);
    for (off, len) in [
        (3 << 20, 3 * ss),
        (5 << 20, 3 * ss),
        (6 << 20, 1),
        (2 * TIB + GIB + 7 * ss, ss),
    ] {
        assert_sectors_encrypted(&path, &segment, off, len);
    }
    // The 3 TiB volume stays sparse: headers plus the few sectors written.
    let used = allocated_bytes(&path);
    assert!(used < 4 << 20, "the volume file uses {used} bytes of disk");
}

#[tokio::test]
async fn volume_data_decrypts_with_the_oracle_512() {
    volume_data_decrypts_with_the_oracle(512).await;
}

#[tokio::test]
async fn volume_data_decrypts_with_the_oracle_4096() {
    volume_data_decrypts_with_the_oracle(4096).await;
}
