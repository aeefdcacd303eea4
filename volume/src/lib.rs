//! cryptnbd volumes on disk.
//!
//! - [`luks2`]: the LUKS2 header codec (pure, over byte buffers);
//! - [`header`]: reading and writing the two header copies on a backing store;
//! - [`token`]: the `cryptnbd-kms` token that records the KMS-wrapped volume key;
//! - [`keyslot`]: LUKS2 passphrase keyslots (argon2id), the break-glass copy of the volume key;
//! - [`xts`]: AES-256-XTS sector encryption with dm-crypt's plain64 IVs;
//! - [`lifecycle`]: building blocks of long operations (import, export, clone, rekey, swap);
//! - [`volume`]: [`Volume`], byte-addressed encrypted I/O on a backing store (the `store`
//!   crate's file engine when opened by path, any engine through `create_on`/`open_store`).
//!
//! This crate must not depend on the NBD protocol, the daemon or the CLI; it sees its bytes
//! only through `store::BackingStore`.

pub mod crash;
pub mod error;
mod gate;
pub mod header;
pub mod keyslot;
pub mod lifecycle;
pub mod luks2;
pub mod token;
pub mod volume;
pub mod xts;

pub use gate::Paused;

pub use error::{VolumeError, VolumeErrorKind};
pub use volume::{
    CreateOptions, OpenOptions, TokenInfo, Volume, VolumeInfo, device_data_size, inspect,
    inspect_store, open_file_store, open_in, unwrap_key, wipe_and_remove, wipe_and_remove_in,
    wipe_header_area,
};
