//! The STARTTLS negotiation (proto.md "TLS support"): a whole session, as in `nbd_session`,
//! against a server with a certificate whose unix listener is in one of the three TLS modes,
//! picked by the first byte (off, on, require). Exports: "disk", and "secret", TLS-only. What
//! it reaches: the options each mode serves or refuses before TLS (`ERR_TLS_REQD`,
//! `ERR_POLICY`), LIST without the TLS-only export, EXPORT_NAME of it, STARTTLS with data or
//! twice, and a TLS handshake that fails on the fuzzer's bytes. The server must answer or
//! close, never panic; the connection is checked to end.
#![no_main]

use cryptnbd_fuzz::{Mode, session};
use libfuzzer_sys::fuzz_target;
use nbd::server::TlsMode;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mode = [TlsMode::Off, TlsMode::On, TlsMode::Require][usize::from(which % 3)];
    session(Mode::Tls(mode), rest);
});
