//! What names a client certificate for the per-export allow-lists (`nbd::x509`): the subject,
//! issuer and serial read from the certificate's DER, and the RFC 4514 patterns of
//! `--allow-cert` matched against them. The first byte picks:
//! - even: the rest is a certificate. Its names are read or refused; a subject that is a
//!   valid pattern, written as an administrator would copy it from `certtool -i`, must admit
//!   the certificate it came from.
//! - odd: the rest is a pattern and a name, split at the first NUL; checking and matching
//!   them answers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Some(n) = nbd::x509::names(rest) {
            for dn in [&n.subject, &n.issuer] {
                if nbd::x509::check_pattern(dn).is_ok() {
                    assert!(
                        nbd::x509::dn_matches(dn, dn),
                        "{dn:?} does not match itself"
                    );
                }
            }
            assert!(
                n.serial.chars().all(|c| c.is_ascii_hexdigit()),
                "{:?}",
                n.serial
            );
        }
    } else {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let (pattern, dn) = text.split_once('\0').unwrap_or((text, ""));
        let _ = nbd::x509::check_pattern(pattern);
        let _ = nbd::x509::dn_matches(pattern, dn);
    }
});
