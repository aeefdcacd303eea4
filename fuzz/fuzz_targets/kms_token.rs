//! The cryptnbd-kms token of a LUKS2 header: any JSON object, then the token's own checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(data) {
        let _ = volume::token::KmsToken::from_json(&obj);
    }
});
