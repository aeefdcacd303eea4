//! The control API's line codec, both ways: requests as the daemon reads them from a client,
//! responses as cryptnbdctl reads them from the daemon. A decoded message encodes to a line
//! that decodes to the same message.
#![no_main]

use std::fmt::Debug;

use control_api::{Request, Response, decode_line, encode_line};
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};

/// Decodes every line of `data` as a `T` and checks that each survives encoding.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let mut buf = data.to_vec();
    while let Ok(Some(msg)) = decode_line::<T>(&mut buf) {
        let mut line = encode_line(&msg);
        let again = decode_line::<T>(&mut line);
        assert!(
            matches!(&again, Ok(Some(m)) if *m == msg),
            "{msg:?} came back as {again:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Request>(data);
    round_trip::<Response>(data);
});
