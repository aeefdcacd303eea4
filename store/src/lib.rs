//! cryptnbd's storage layer: where bytes live and how they are made durable.
//!
//! Today it holds [`durable`], the one place that replaces a small file atomically (temporary
//! file, fsync, rename, directory fsync) and makes private directories: the saved
//! attachments, the local keystore, volume files replaced by a lifecycle operation. The
//! backing stores under volumes and the catalogs of volumes (issue 13) grow here next.
//!
//! It must not depend on any other crate of the workspace: everything above it (the volume
//! format, the KMS, the daemon, the CLI) may use it.

#![forbid(unsafe_code)]

pub mod durable;
