//! cryptnbd's state directory as a library, for the daemon and for the CLI's offline verbs
//! (which must not link the daemon): the audit trail ([`audit`]), what `list` shows of a
//! volume ([`summary`]) and the time stamps written in them ([`stamp`]).
//!
//! It must not depend on the daemon, the NBD server or a KMS backend; it reads volumes only
//! through the volume crate's header inspection (never a key).

#![forbid(unsafe_code)]

pub mod audit;
pub mod keys;
pub mod stamp;
pub mod summary;
