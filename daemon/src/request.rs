//! What a control request brings besides its JSON: a passed descriptor, and the progress and
//! cancellation shared with the connection that sent it.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use control_api::ErrorCode;
use volume::lifecycle::{Cancel, Progress};

use crate::error::{Error, api};

/// What a request brings besides its JSON: a passed descriptor, and the progress and
/// cancellation shared with the connection that sent it.
#[derive(Default)]
pub struct RequestContext {
    /// The descriptor passed with the request (SCM_RIGHTS), if any.
    pub fd: Option<OwnedFd>,
    /// Where the operation reports progress.
    pub progress: Arc<Progress>,
    /// Set when the client goes away or `cancel` is called.
    pub cancel: Cancel,
}

impl RequestContext {
    /// The descriptor passed with the request, for `what` (refused when there is none).
    pub fn take_fd(&mut self, what: &str) -> Result<File, Error> {
        self.fd.take().map(File::from).ok_or_else(|| {
            api(
                ErrorCode::InvalidRequest,
                format!(
                    "{what} needs a file descriptor passed with the request (SCM_RIGHTS); \
                     cryptnbdctl does this"
                ),
            )
        })
    }
}
