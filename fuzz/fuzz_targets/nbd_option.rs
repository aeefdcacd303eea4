//! The handshake's option decoder and every option's parser, on a stream of options.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::proto::{Decoded, decode_option};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match decode_option(&data[at..], 4096) {
            Ok(Decoded::Complete { consumed, .. }) => {
                assert!(consumed >= 16 && consumed <= data.len() - at);
                at += consumed;
            }
            Ok(Decoded::Incomplete { .. }) | Err(_) => break,
        }
    }
});
