//! What `list` and `status` show of a volume, read from its header without the KMS, and the
//! scan of a catalog of volumes that the CLI's offline `list` shares with the daemon.

use std::collections::BTreeMap;

use control_api::paths::validate_name;
use control_api::{BaseImage, VolumeSummary, chain};
use store::catalog::Catalog;
use store::file::{Access, OpenError};
use volume::{VolumeError, VolumeErrorKind};

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
pub fn volume_summary(catalog: &dyn Catalog, name: &str, attached: bool) -> VolumeSummary {
    let path = catalog.location(name);
    let inspected = catalog
        .open(name, Access::Inspect)
        .map_err(|e| match e {
            OpenError::Locked => VolumeError::new(VolumeErrorKind::InUse, "locked"),
            OpenError::Held(who) => VolumeError::new(VolumeErrorKind::InUse, who),
            OpenError::Io(e) => VolumeError::io(&path, "opening the volume", e),
        })
        .and_then(|store| volume::inspect_store(&*store));
    match inspected {
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
            store: "file".into(),
            held_by: None,
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
            store: "file".into(),
            held_by: None,
        },
    }
}

/// Every volume of `catalog` with a valid name, sorted by name (none when there is none yet).
pub fn scan_volumes(
    catalog: &dyn Catalog,
    attached: impl Fn(&str) -> bool,
) -> std::io::Result<Vec<VolumeSummary>> {
    Ok(catalog
        .list()?
        .into_iter()
        .filter(|n| validate_name(n).is_ok())
        .map(|name| {
            let attached = attached(&name);
            volume_summary(catalog, &name, attached)
        })
        .collect())
}
