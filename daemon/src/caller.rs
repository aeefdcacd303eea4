//! Who sent a control request: the peer credentials of the control socket, checked against
//! the allow-list before a request is read (control.rs) and carried to every handler.

/// Who sent a request (from the control socket's peer credentials).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}
