//! NBD (Network Block Device) for cryptnbd: the protocol as a pure codec ([`proto`]) and a
//! tokio server ([`server`]) generic over a small blocking [`device::BlockDevice`] trait.
//!
//! This crate must not depend on the volume format, the KMS or the daemon: it knows byte
//! ranges, exports and peers, nothing about the volumes' encryption or keys (it
//! does encrypt its own transport, with TLS). The daemon adapts its volumes
//! to [`device::BlockDevice`] and its registry of attached volumes to
//! [`device::ExportRegistry`].
//!
//! The protocol is NetworkBlockDevice/nbd `doc/proto.md`: fixed newstyle negotiation with
//! `NBD_OPT_GO`/`INFO`, structured replies, `base:allocation` block status, and every command
//! of the transmission phase except the experimental ones.
//!
//! No unsafe code, except in one module: `server/tls/gcm.rs` calls aws-lc's streaming AES-GCM
//! through its C API, so that TLS records are sealed and opened between buffers without a
//! copy (aws-lc-rs has no such call). Every unsafe block there says why it is sound.

#![deny(unsafe_code)]

pub mod device;
mod error;
pub mod proto;
pub mod server;
pub mod x509;

pub use device::{
    BlockDevice, BlockSizes, DeviceError, Errno, Export, ExportRegistry, Extent, Io, Peer,
    RequestObserver, Submission,
};
pub use error::NbdError;
pub use server::{ConnectionInfo, Limits, Server, SessionParams};
