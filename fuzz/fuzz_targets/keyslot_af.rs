//! The anti-forensic split of LUKS2 keyslots (`volume::keyslot::af_split`, `af_merge`), as a
//! keyslot's area and its JSON's sizes arrive from a header: merging any bytes with any sizes
//! answers or refuses, never panics or allocates without bound; splitting a key and merging
//! it back gives the key, for every hash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume::keyslot::{AfHash, af_merge, af_split};

const HASHES: [AfHash; 4] = [AfHash::Sha1, AfHash::Sha256, AfHash::Sha384, AfHash::Sha512];

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let hash = HASHES[usize::from(data[0] % 4)];
    // Sizes as a header could state them; the material is the rest.
    let key_size = usize::from(u16::from_le_bytes([data[1], data[2]]) % 600);
    let stripes = usize::from(data[3]) * 16 + 1;
    let material = &data[4..];
    if let Some(key) = af_merge(material, key_size, stripes, hash) {
        assert_eq!(key.len(), key_size);
        assert!(material.len() >= key_size * stripes);
    }
    // A split of the first bytes, with the rest as its randomness, merges back.
    let key_len = key_size.clamp(1, 64).min(material.len());
    if key_len == 0 {
        return;
    }
    let key = &material[..key_len];
    let stripes = usize::from(data[3] % 8) + 1;
    let noise = &material[key_len..];
    let split = af_split(key, stripes, hash, |out| {
        for (i, b) in out.iter_mut().enumerate() {
            *b = noise.get(i % noise.len().max(1)).copied().unwrap_or(0x5a);
        }
        Ok(())
    })
    .expect("a valid split");
    assert_eq!(split.len(), key_len * stripes);
    let merged = af_merge(&split, key_len, stripes, hash).expect("merge");
    assert_eq!(&merged[..], key);
});
