//! Helpers for the end-to-end tests: locating the project's binaries and the real peer tools.
