//! Crash injection for the crash-consistency tests: the storage layer's
//! [`store::crash::crash_point`], so the points of the volume format and of the catalogs are
//! one set, switched on by this crate's `crash-points` feature (which turns on store's).

pub use store::crash::crash_point;
