//! cryptnbd's RBD engine (issue 15): librados and librbd through their C API, loaded at run
//! time, and the storage layer's [`store::BackingStore`] over an RBD image ([`RbdStore`]).
//!
//! - The libraries are opened with `dlopen` the first time a cluster is used, so the
//!   workspace builds, and a daemon that uses only files runs, on a machine without any Ceph
//!   package. [`load`] says which package is missing.
//! - [`Cluster`] (`rados_t`), [`Pool`] (`rados_ioctx_t`) and [`Image`] (`rbd_image_t`) close
//!   their handles when dropped, children before parents (each holds its parent).
//! - [`RbdCatalog`]: the volumes of a pool, one image per volume, with atomic replace and
//!   RBD snapshots ([`RbdSnapshots`]).
//! - I/O goes through librbd's aio calls. [`Image`]'s `read_at`, `write_at` and `flush`
//!   submit and wait, borrowing the caller's buffer until librbd has completed the request.
//!   [`Image::read_owned`], [`Image::write_owned`] and [`Image::flush_owned`] submit without
//!   waiting: the request owns its buffer until librbd's callback, which only records the
//!   result and wakes the task awaiting the [`Submitted`] future. [`RbdStore`] offers them to
//!   the volume's data path as [`store::submit::Submit`].
//!
//! The only unsafe code is in `ffi.rs`. This crate may depend only on `store` (the layer it
//! plugs into): the volume format, the KMS and the daemon sit above it.

#![deny(unsafe_code)]

mod catalog;
mod engine;
mod ffi;

pub use catalog::{Hidden, Holder, RbdCatalog, RbdSnapshots, hidden};
pub use engine::RbdStore;
pub use ffi::{Cluster, Image, Pool, Submitted};

/// The errno of an error from librados or librbd (`ESHUTDOWN` for a client the cluster has
/// blocklisted, say); None for other errors.
pub fn errno(e: &std::io::Error) -> Option<i32> {
    e.get_ref()?
        .downcast_ref::<ffi::CephError>()
        .map(|c| c.errno)
}

/// Loads librados and librbd if they are not yet: `Err` names the Debian package to install.
pub fn load() -> Result<(), String> {
    ffi::api().map(drop)
}
