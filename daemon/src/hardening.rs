//! Process hardening for key custody: not dumpable, no core files, memory locked so keys
//! never reach swap, and enough file descriptors for many clients.

/// What could be applied.
#[derive(Debug, Clone, Copy)]
pub struct Hardening {
    /// All current and future memory is locked (mlockall).
    pub memory_locked: bool,
}

/// Why hardening failed when it was required.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HardeningError(pub String);

/// Applies the protections. `require_lock`: fail when memory cannot be locked.
pub fn apply(require_lock: bool) -> Result<Hardening, HardeningError> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| HardeningError(format!("cannot make the process non-dumpable: {e}")))?;
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| HardeningError(format!("cannot disable core dumps: {e}")))?;
    // Raise the soft descriptor limit to the hard one: every client is a socket.
    let nofile = rustix::process::getrlimit(Resource::Nofile);
    if nofile.current < nofile.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: nofile.maximum,
                maximum: nofile.maximum,
            },
        );
    }
    use rustix::mm::{MlockAllFlags, mlockall};
    let memory_locked = match mlockall(
        MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT,
    ) {
        Ok(()) => true,
        Err(e) if require_lock => {
            return Err(HardeningError(format!(
                "cannot lock memory ({e}), so keys could reach swap: raise the memory-lock limit \
                     (LimitMEMLOCK=infinity in the systemd unit, or ulimit -l) or set \
                     memory.require_lock = false"
            )));
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot lock memory: key material could be swapped out; raise the memory-lock limit \
                 (ulimit -l) or run with swap disabled or encrypted"
            );
            false
        }
    };
    Ok(Hardening { memory_locked })
}

/// Marks the calling thread as an I/O flusher (PR_SET_IO_FLUSHER): its memory allocations
/// do not recurse into filesystem or block I/O and it is not throttled as a writer, so a
/// daemon serving a kernel block device cannot deadlock waiting for memory that only its own
/// writes would free. Threads started afterwards inherit it. Needs CAP_SYS_RESOURCE; without
/// it the daemon still works, but a kernel device under heavy memory pressure could stall.
pub fn set_io_flusher() -> Result<(), String> {
    rustix::process::configure_io_flusher_behavior(true).map_err(|e| {
        format!(
            "cannot mark the daemon as an I/O flusher (PR_SET_IO_FLUSHER: {e}); kernel NBD \
             devices could stall under memory pressure: give it CAP_SYS_RESOURCE"
        )
    })
}

/// What the root storage daemon sets up (docs/root-volume.md): the OOM killer passes it over
/// (`oom_score_adj` -1000: killing it would take the root filesystem with it).
pub fn root_daemon() -> Result<(), String> {
    std::fs::write("/proc/self/oom_score_adj", b"-1000")
        .map_err(|e| format!("cannot set oom_score_adj to -1000: {e}"))
}
