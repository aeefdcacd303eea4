//! One LUKS2 header copy: the binary header, its checksum and the JSON area. The first byte
//! picks where the copy claims to be (bits 0-1: the primary at 0 or a secondary at one of
//! the offsets LUKS2 allows) and whether the target writes a correct SHA-256 checksum into
//! the input first (bit 2), so that mutated inputs get past the checksum to the JSON parser.
//! A copy that decodes encodes to one that decodes to the same header.
#![no_main]

use aws_lc_rs::digest;
use libfuzzer_sys::fuzz_target;

/// Where the checksum field is, and how long.
const OFF_CSUM: usize = 448;
const LEN_CSUM: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let offset = match pick % 4 {
        0 => 0,
        1 => 16 << 10,
        2 => 32 << 10,
        _ => 64 << 10,
    };
    let mut copy = rest.to_vec();
    if pick & 4 != 0 && copy.len() >= 4096 {
        let size = u64::from_be_bytes(copy[8..16].try_into().unwrap());
        if let Ok(size) = usize::try_from(size)
            && (4096..=copy.len()).contains(&size)
        {
            copy[OFF_CSUM..OFF_CSUM + LEN_CSUM].fill(0);
            let sum = digest::digest(&digest::SHA256, &copy[..size]);
            copy[OFF_CSUM..OFF_CSUM + sum.as_ref().len()].copy_from_slice(sum.as_ref());
        }
    }
    if let Ok(header) = volume::luks2::decode_copy(&copy, offset) {
        let again = volume::luks2::encode_copy(&header.binary, &header.metadata)
            .and_then(|bytes| volume::luks2::decode_copy(&bytes, offset));
        assert!(
            matches!(&again, Ok(h) if *h == header),
            "a decoded header did not survive encoding: {again:?}"
        );
    }
});
