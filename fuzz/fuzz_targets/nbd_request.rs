//! The transmission phase's request decoder, on a stream of bytes: every header it accepts
//! encodes back to the same 28 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::proto::{Decoded, REQUEST_HEADER_LEN, RequestHeader};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match RequestHeader::decode(&data[at..]) {
            Ok(Decoded::Complete { value, consumed }) => {
                assert_eq!(consumed, REQUEST_HEADER_LEN);
                assert_eq!(&value.to_bytes()[..], &data[at..at + consumed]);
                at += consumed;
            }
            Ok(Decoded::Incomplete { .. }) | Err(_) => break,
        }
    }
});
