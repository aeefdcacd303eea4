//! Where cryptnbd keeps its state (docs/cli.md, "State layout").
//!
//! As root: `/var/lib/cryptnbd` (state) and `/run/cryptnbd` (sockets). Otherwise
//! `$XDG_STATE_HOME/cryptnbd` (default `~/.local/state/cryptnbd`) and
//! `$XDG_RUNTIME_DIR/cryptnbd` (default `/tmp/cryptnbd-UID`). `--state-dir` /
//! `CRYPTNBD_STATE_DIR` and `--socket` / `CRYPTNBD_SOCKET` override them.

use std::path::{Path, PathBuf};

/// The root daemon's directory (docs/root-volume.md): its sockets, its log and its state
/// (`state/`, with the audit records of the boot), on `/run`, which moves to the real root.
pub const ROOT_RUNTIME_DIR: &str = "/run/cryptnbd-root";

/// The resolved state layout, shared by the daemon and the CLI.
#[derive(Debug, Clone)]
pub struct StateLayout {
    /// Root of the persistent state.
    pub state_dir: PathBuf,
    /// Directory of the sockets.
    pub runtime_dir: PathBuf,
}

impl StateLayout {
    /// Resolves the directories from the flag/env/config values or the defaults.
    pub fn new(state_dir: Option<PathBuf>, runtime_dir: Option<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.unwrap_or_else(default_state_dir),
            runtime_dir: runtime_dir.unwrap_or_else(default_runtime_dir),
        }
    }

    /// The daemon's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("control.sock")
    }

    /// The daemon's NBD unix socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.runtime_dir.join("nbd.sock")
    }

    /// The audit trail (current file; rotated ones get `.1`, `.2`, ...).
    pub fn audit_log(&self) -> PathBuf {
        self.state_dir.join("audit").join("audit.jsonl")
    }

    /// Attachments re-attached when the daemon starts.
    pub fn attachments(&self) -> PathBuf {
        self.state_dir.join("attachments.json")
    }

    /// The local KMS keystore.
    pub fn keystore(&self) -> PathBuf {
        self.state_dir.join("keystore")
    }

    /// Where volume files live.
    pub fn volumes(&self) -> PathBuf {
        self.state_dir.join("volumes")
    }

    /// The file of volume `name`.
    pub fn volume_file(&self, name: &str) -> PathBuf {
        self.volumes().join(format!("{name}.luks"))
    }

    /// Where the snapshot directories live, one per volume.
    pub fn snapshots(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }

    /// Where the snapshots of volume `name` live (each a LUKS2 volume file).
    pub fn snapshots_dir(&self, name: &str) -> PathBuf {
        self.snapshots().join(name)
    }

    /// The file of snapshot `snapshot` of volume `name`.
    pub fn snapshot_file(&self, name: &str, snapshot: &str) -> PathBuf {
        self.snapshots_dir(name).join(format!("{snapshot}.luks"))
    }

    /// A volume argument: a path when it contains `/` or names an existing file, else a name.
    pub fn resolve_volume(&self, arg: &str) -> PathBuf {
        let p = Path::new(arg);
        if arg.contains('/') || (p.is_file() && !self.volume_file(arg).exists()) {
            p.to_path_buf()
        } else {
            self.volume_file(arg)
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The default state directory.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/cryptnbd");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("cryptnbd");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/state/cryptnbd"),
        None => PathBuf::from(format!(
            "/tmp/cryptnbd-state-{}",
            rustix::process::geteuid().as_raw()
        )),
    }
}

/// Validates a volume name: 1-64 characters of letters, digits, `.`, `_`, `-`, not starting
/// with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid volume name '{name}': use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ))
    }
}

/// The default runtime directory (sockets).
pub fn default_runtime_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/cryptnbd");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x).join("cryptnbd"),
        None => PathBuf::from(format!(
            "/tmp/cryptnbd-{}",
            rustix::process::geteuid().as_raw()
        )),
    }
}
