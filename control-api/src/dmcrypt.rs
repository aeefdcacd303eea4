//! Types of the dm-crypt requests (docs/control-api.md, "dm-crypt"): `cryptnbdctl open
//! VOLUME --dm-crypt NAME` has the daemon unwrap the volume key as `attach` does and write it
//! into a pipe whose read end `cryptsetup open` reads; `cryptnbdctl close NAME` runs
//! `cryptsetup close`. The key never passes through the client's memory nor a file.

use serde::{Deserialize, Serialize};

/// `open-dm-crypt`: sent with the write end of a pipe (SCM_RIGHTS), into which the daemon
/// writes the 64-byte volume key and which it then closes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpenDmCryptRequest {
    /// Volume name.
    pub volume: String,
    /// The device-mapper name the client will give the mapping (`/dev/mapper/NAME`).
    pub name: String,
    /// The client maps it read-only (`cryptsetup open --readonly`).
    #[serde(default)]
    pub read_only: bool,
    /// If given, must match the volume's stored SID (checked before any KMS call).
    #[serde(default)]
    pub sid: Option<String>,
    /// If given, must match the volume's stored directory.
    #[serde(default)]
    pub directory: Option<String>,
}

/// A volume and its dm-crypt mapping (made, about to be made, or about to be removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DmCryptMapping {
    /// Volume name.
    pub volume: String,
    /// Device-mapper name.
    pub name: String,
    /// `/dev/mapper/NAME`.
    pub device: String,
    /// The volume file (what `cryptsetup open` is given).
    pub path: String,
    /// The LUKS2 UUID in the volume's header (cryptsetup names the mapping's device-mapper
    /// UUID `CRYPT-LUKS2-<UUID without dashes>-<NAME>`).
    pub uuid: String,
    /// Encryption sector size.
    pub sector_size: u32,
    /// Data size in bytes.
    pub size: u64,
    /// Mapped read-only.
    pub read_only: bool,
}

/// Checks a device-mapper name given to `open --dm-crypt`: the rule of volume names (1-64
/// letters, digits, `.`, `_`, `-`, not starting with `.` or `-`), which is stricter than
/// device-mapper's and keeps the name from reading as an option on cryptsetup's command line.
pub fn validate_dm_name(name: &str) -> Result<(), String> {
    crate::paths::validate_name(name).map_err(|_| {
        format!(
            "invalid dm-crypt name '{name}': use 1-64 letters, digits, '.', '_' or '-', not \
             starting with '.' or '-'"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_names() {
        for ok in ["home", "alice-home", "v.1_x"] {
            assert!(validate_dm_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            let e = validate_dm_name(bad).expect_err(bad);
            assert!(e.contains("dm-crypt name"), "{e}");
        }
    }
}
