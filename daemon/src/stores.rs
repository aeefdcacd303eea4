//! The daemon's stores: the volume files of its state directory, the Ceph RBD pool of
//! `[store.rbd]` and the block devices of `[store.devices]` when configured, side by side as
//! one catalog (`store::stores::Stores`).
//!
//! Connecting to the cluster happens at start, so that a wrong pool, a wrong client id, an
//! unreachable cluster or a missing librbd stops the daemon with a sentence that says which.
//! The daemon is recorded on every RBD volume it opens for writing as host name, state
//! directory and instance id; the instance id lives in the state directory (`instance-id`),
//! so a restarted daemon recognises the locks its dead previous instance left.

use std::path::Path;
use std::sync::Arc;

use control_api::paths::StateLayout;
use store::catalog::{Catalog, DirCatalog};
use store::device::DeviceCatalog;
use store::stores::Stores;

use crate::DaemonError;
use crate::config::{RbdConfig, StoreConfig};

/// The name of the store of `[store.devices]`.
pub const DEVICES: &str = "device";

/// The stores, and the RBD catalog among them (for who holds what).
pub struct Opened {
    /// Every store, as one catalog.
    pub stores: Arc<Stores>,
    /// The RBD pool, when configured.
    pub rbd: Option<Arc<rbd::RbdCatalog>>,
}

/// Opens the stores `config` names.
pub fn open(config: &StoreConfig, layout: &StateLayout) -> Result<Opened, DaemonError> {
    let io = config.file.io.engine();
    let file: Arc<dyn Catalog> =
        Arc::new(DirCatalog::new(&layout.volumes(), &layout.snapshots()).with_io(io));
    let mut members = vec![("file".to_owned(), file)];
    let rbd = match &config.rbd {
        Some(c) => {
            let catalog = Arc::new(connect(c, layout)?);
            members.push(("rbd".to_owned(), Arc::clone(&catalog) as Arc<dyn Catalog>));
            Some(catalog)
        }
        None => None,
    };
    let devices = config
        .device_entries()
        .map_err(|e| DaemonError::Store(e.to_string()))?;
    if !devices.is_empty() {
        let devices: Arc<dyn Catalog> = Arc::new(DeviceCatalog::new(devices).with_io(io));
        // A name is one volume: a device entry may not shadow a volume of another store.
        for name in devices
            .list()
            .map_err(|e| DaemonError::Store(e.to_string()))?
        {
            for (store, catalog) in &members {
                if catalog.exists(&name) {
                    return Err(DaemonError::Store(format!(
                        "[store.devices] {name}: a volume {name} exists in store {store} ({}):                          give the device another name",
                        catalog.location(&name).display()
                    )));
                }
            }
        }
        members.push((DEVICES.to_owned(), devices));
    }
    let stores = Stores::new(members, config.default.as_str()).map_err(DaemonError::Store)?;
    Ok(Opened {
        stores: Arc::new(stores),
        rbd,
    })
}

fn connect(c: &RbdConfig, layout: &StateLayout) -> Result<rbd::RbdCatalog, DaemonError> {
    let fail = |m: String| DaemonError::Store(format!("[store.rbd]: {m}"));
    rbd::load().map_err(fail)?;
    let timeout = c.timeout_secs.to_string();
    let keyring = c.keyring.as_ref().map(|k| k.to_string_lossy().into_owned());
    // Every Ceph operation gives up after the timeout: an attach, a list or a lifecycle
    // command against a cluster that does not answer fails with a sentence instead of
    // hanging, and so does an NBD request (EIO; a flush that times out fails the volume
    // until it is reattached), as a kernel NBD device's own io timeout would.
    let mut options = vec![
        ("client_mount_timeout", timeout.as_str()),
        ("rados_mon_op_timeout", timeout.as_str()),
        ("rados_osd_op_timeout", timeout.as_str()),
    ];
    if let Some(k) = &keyring {
        options.push(("keyring", k.as_str()));
    }
    if !c.conf.is_file() {
        return Err(fail(format!(
            "the Ceph configuration {} does not exist: set conf = \"…/ceph.conf\"",
            c.conf.display()
        )));
    }
    let cluster = rbd::Cluster::connect(&c.conf, &c.id, &options).map_err(|e| {
        fail(format!(
            "{e} (waited up to {}s): check the monitors in {}, the client id \"{}\" and its \
             keyring",
            c.timeout_secs,
            c.conf.display(),
            c.id
        ))
    })?;
    let pool = cluster.pool(&c.pool).map_err(|e| {
        fail(format!(
            "{e}: create it (ceph osd pool create {p} && rbd pool init {p}) or set pool = \
             \"…\"",
            p = c.pool
        ))
    })?;
    // A full pool answers writes with ENOSPC (the client sees it at once) rather than
    // holding them until it has room.
    pool.fail_when_full();
    // The pool answers: a listing proves the client may read it.
    pool.images().map_err(|e| {
        fail(format!(
            "{e}: client.{} may not use pool {} (give it `profile rbd pool={}`)",
            c.id, c.pool, c.pool
        ))
    })?;
    let me = rbd::Holder {
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into()),
        state_dir: layout.state_dir.display().to_string(),
        instance: instance_id(&layout.state_dir)?,
    };
    Ok(rbd::RbdCatalog::with_holder(pool, me))
}

/// The daemon instance id kept in `state_dir/instance-id`, made on first use.
fn instance_id(state_dir: &Path) -> Result<String, DaemonError> {
    let path = state_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(DaemonError::Io {
                what: format!("cannot read {}", path.display()),
                source: e,
            });
        }
    }
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| DaemonError::Store("the system random number generator failed".into()))?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    store::durable::write_atomic(
        &path,
        format!("{id}\n").as_bytes(),
        store::durable::Existing::Replace,
    )
    .map_err(|e| DaemonError::Io {
        what: format!("cannot write {}", path.display()),
        source: e,
    })?;
    Ok(id)
}
