//! A whole server session: the input is everything a client sends after the server's
//! greeting (flags, options, requests, payloads), over a real unix socket to the NBD server
//! with a 1 MiB memory export named "disk" (also the default export; half its reads served
//! on the spot, half on the I/O threads) and a TLS-only export "secret" the server cannot
//! serve, having no TLS. The server must answer or close, never panic; the connection is
//! checked to end.
#![no_main]

use cryptnbd_fuzz::{Mode, session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| session(Mode::Plain, data));
