//! The encrypted root at boot (docs/root-volume.md): what the kernel command line asks for
//! ([`cmdline`]), what the root configuration puts into an initramfs ([`config`]), and
//! what an initramfs image holds ([`initramfs`]).
//!
//! Pure parsing and reading files: no KMS, no daemon, no device I/O. It must not depend on
//! `daemon`, `nbd`, `volume` or `kms-client`, so that the parsers stay small enough to fuzz.

pub mod cmdline;
pub mod config;
pub mod initramfs;
