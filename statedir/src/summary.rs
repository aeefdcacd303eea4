//! What `list` and `status` show of a volume, read from its header without the KMS, and the
//! scan of the volumes directory that the CLI's offline `list` shares with the daemon.

use std::collections::BTreeMap;
use std::path::Path;

use control_api::paths::validate_name;
use control_api::{BaseImage, VolumeSummary, chain};

/// The recorded base image of a token.
pub fn base_image_of(
    token_extra: &serde_json::Map<String, serde_json::Value>,
) -> Option<BaseImage> {
    token_extra
        .get("base_image")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// A volume as `list` shows it, read from its header without the KMS (`attached` says
/// whether it is attached now). A volume whose header cannot be read is listed with the
/// problem.
pub fn volume_summary(name: &str, path: &Path, attached: bool) -> VolumeSummary {
    match volume::inspect(path) {
        Ok(info) => VolumeSummary {
            name: name.into(),
            path: path.display().to_string(),
            size: info.size,
            sector_size: info.sector_size,
            volume_id: info.token.as_ref().map(|t| t.volume_id.clone()),
            key_id: info.token.as_ref().map(|t| t.key_id.clone()),
            base_image: info.token.as_ref().and_then(|t| base_image_of(&t.extra)),
            recovery_keyslots: info.keyslot_ids.clone(),
            snapshots: 0,
            dm_crypt: None,
            context: info.token.map(|t| t.context).unwrap_or_default(),
            attached,
            problem: info
                .primary_header_problem
                .map(|p| format!("primary header copy: {p}"))
                .or(info
                    .secondary_header_problem
                    .map(|p| format!("secondary header copy: {p}"))),
        },
        Err(e) => VolumeSummary {
            name: name.into(),
            path: path.display().to_string(),
            size: 0,
            sector_size: 0,
            volume_id: None,
            key_id: None,
            context: BTreeMap::new(),
            attached,
            problem: Some(chain(&e)),
            base_image: None,
            recovery_keyslots: Vec::new(),
            snapshots: 0,
            dm_crypt: None,
        },
    }
}

/// Every `NAME.luks` with a valid name in the volumes directory, sorted by name (none when the
/// directory does not exist yet).
pub fn scan_volumes(
    dir: &Path,
    attached: impl Fn(&str) -> bool,
) -> std::io::Result<Vec<VolumeSummary>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut volumes = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".luks"))
            .filter(|n| validate_name(n).is_ok())
        else {
            continue;
        };
        volumes.push(volume_summary(name, &path, attached(name)));
    }
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(volumes)
}
