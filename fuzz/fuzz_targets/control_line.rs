//! The control API's line codec, both ways: requests as the daemon reads them from a client,
//! responses as cryptnbdctl reads them from the daemon. A decoded message encodes to a line
//! that decodes again.
#![no_main]

use control_api::{Request, Response, decode_line, encode_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    while let Ok(Some(req)) = decode_line::<Request>(&mut buf) {
        let mut line = encode_line(&req);
        let again = decode_line::<Request>(&mut line);
        assert!(
            matches!(&again, Ok(Some(r)) if *r == req),
            "{req:?} came back as {again:?}"
        );
    }
    let mut buf = data.to_vec();
    while let Ok(Some(resp)) = decode_line::<Response>(&mut buf) {
        let mut line = encode_line(&resp);
        let again = decode_line::<Response>(&mut line);
        assert!(
            matches!(&again, Ok(Some(r)) if *r == resp),
            "{resp:?} came back as {again:?}"
        );
    }
});
