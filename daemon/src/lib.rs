//! The cryptnbd daemon: serves attached encrypted volumes over NBD, controlled through a unix
//! socket. [`run`] takes a configuration and a shutdown future, so tests start the real
//! daemon in-process or as a binary on temporary sockets.
//!
//! Start-up: harden the process (not dumpable, no core files, memory locked), open the KMS and
//! the audit trail, bind the sockets, re-attach the saved attachments, tell systemd READY=1.
//! Shutdown (SIGTERM/SIGINT, or the future): STOPPING=1, stop accepting, finish in-flight
//! requests, flush every volume, drop them (keys wiped), remove the sockets.
//!
//! This crate must not be depended on by the libraries (nbd, volume, kms-client, control-api).

pub mod attach;
pub mod caller;
pub mod certpolicy;
pub mod control;
pub mod daemon;
pub mod device;
pub mod dmcrypt;
pub mod error;
pub mod hardening;
pub mod kdev;
pub mod keys;
pub mod lifecycle;
pub mod locks;
pub mod metrics;
pub mod netlink;
pub mod notify;
pub mod ops;
pub mod registry;
pub mod reload;
pub mod relocate;
pub mod request;
pub mod services;
pub mod staging;
pub mod state;
pub mod stores;
pub mod tls;
pub mod volumes;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use control_api::paths::StateLayout;
use kms_client::KmsBackend;
use kms_client::aws::AwsKms;
use kms_client::local::{LocalKms, LocalKmsOptions};
use statedir::audit::{AUDIT_SCOPE, AuditLog, AuditRecord};
use tokio::net::{TcpListener, UnixListener};
use zeroize::Zeroizing;

pub use daemon_config as config;
pub use daemon_config::Config;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Hardening that was required failed.
    #[error(transparent)]
    Hardening(#[from] hardening::HardeningError),
    /// The KMS could not be opened.
    #[error("cannot open the KMS")]
    Kms(#[from] kms_client::KmsError),
    /// The TLS certificates cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A store cannot be used (the RBD pool of `[store.rbd]`).
    #[error("{0}")]
    Store(String),
    /// Anything about files and sockets.
    #[error("{what}")]
    Io {
        /// What failed, with the path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

fn make_dir(dir: &Path, mode: u32) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io(format!("cannot create the directory {}", dir.display())))
}

/// Binds a unix socket at `path`, replacing a stale socket file left by a crash but never a
/// live one (a running daemon answers a connect).
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Io {
                what: format!(
                    "{} is in use: is another cryptnbd running with the same state?",
                    path.display()
                ),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        std::fs::remove_file(path).map_err(io(format!(
            "cannot remove the stale socket {}",
            path.display()
        )))?;
    }
    let listener =
        UnixListener::bind(path).map_err(io(format!("cannot listen on {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("cannot set the mode of {}", path.display())))?;
    Ok(listener)
}

fn passphrase(file: Option<&PathBuf>) -> Result<Option<Zeroizing<Vec<u8>>>, DaemonError> {
    if let Some(f) = file {
        let mut b = Zeroizing::new(std::fs::read(f).map_err(io(format!(
            "cannot read the passphrase file {}",
            f.display()
        )))?);
        while b.last().is_some_and(|&c| c == b'\n' || c == b'\r') {
            b.pop();
        }
        return Ok(Some(b));
    }
    Ok(std::env::var_os("CRYPTNBD_KMS_PASSPHRASE")
        .filter(|v| !v.is_empty())
        .map(|v| Zeroizing::new(v.into_encoded_bytes())))
}

/// SIGTERM and SIGINT, the signals that stop the daemon.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Listens for them (None when the runtime cannot: then nothing stops the daemon but a
    /// kill).
    pub fn new() -> Option<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Self {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
        })
    }

    /// The next of them.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The first SIGTERM or SIGINT: the `shutdown` the `cryptnbd` binary runs the daemon until.
pub async fn stop_signal() {
    match StopSignals::new() {
        Some(mut s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// When the root storage daemon stops: at SIGTERM or SIGINT while it serves no kernel device
/// (an unlock that failed), never while it serves one (the root filesystem is on it: the
/// system's final reboot ends it, after the root was remounted read-only and flushed).
async fn root_shutdown(daemon: Arc<daemon::Daemon>) {
    let Some(mut signals) = StopSignals::new() else {
        return std::future::pending().await;
    };
    loop {
        signals.next().await;
        let serving: Vec<String> = daemon
            .state
            .registry
            .all()
            .iter()
            .filter_map(|a| a.kernel().map(|k| k.path()))
            .collect();
        if serving.is_empty() {
            return;
        }
        tracing::warn!(
            devices = %serving.join(", "),
            "the root storage daemon does not stop while it serves a kernel device: the \
             system's final reboot ends it (docs/root-volume.md)"
        );
    }
}

/// Merges the root daemon's boot-time audit records (the initramfs wrote them under `/run`)
/// into this daemon's trail, unless this daemon is the one writing them.
fn merge_initramfs_trail(config: &Config, layout: &StateLayout, audit: &AuditLog) {
    let from = &config.audit.initramfs_trail;
    let own = layout.audit_log();
    let same = |a: &Path, b: &Path| {
        a == b || std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok()
    };
    if !from.exists() || same(from, &own) {
        return;
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let marker = own.with_file_name("initramfs-merged");
    match audit.merge_from(from, &marker, boot.trim(), "initramfs") {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(records = n, from = %from.display(), "merged the root daemon's audit records of this boot")
        }
        Err(e) => {
            tracing::warn!(error = %e, from = %from.display(), "cannot merge the root daemon's audit records")
        }
    }
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    config.validate()?;
    // Certificates are checked before anything else is opened.
    let tls = tls::load(&config.nbd.tls)?;
    let layout = StateLayout::new(config.state_dir.clone(), config.runtime_dir.clone());
    let is_root = rustix::process::geteuid().is_root();
    let mut config = config;
    if config.root_daemon {
        // Serving the root from the initramfs: nothing by path once the system switches to
        // the real root (its /proc, /sys, /run are moved there), so no key checks (the KMS's
        // files and network settings stay behind) and no audit rotation (the open file is
        // the trail); never killed for memory, never stopped by a signal while it serves a
        // kernel device.
        if let Err(m) = hardening::root_daemon() {
            tracing::warn!(
                "{m}: the OOM killer could choose the daemon that serves the root; give it \
                 CAP_SYS_RESOURCE"
            );
        }
        config.kms.key_check_interval_secs = 0;
        config.audit.max_bytes = u64::MAX;
        tracing::info!("running as the root storage daemon (@cryptnbd)");
    }
    let hardening = hardening::apply(config.memory.require_lock.unwrap_or(is_root))?;

    make_dir(&layout.state_dir, 0o700)?;
    make_dir(&layout.runtime_dir, 0o755)?;
    let keystore = config
        .kms
        .keystore
        .clone()
        .unwrap_or_else(|| layout.keystore());
    let audit = Arc::new(
        AuditLog::open(
            &layout.audit_log(),
            config.audit.max_bytes,
            config.audit.keep,
        )
        .map_err(io(format!(
            "cannot open the audit log {}",
            layout.audit_log().display()
        )))?,
    );
    merge_initramfs_trail(&config, &layout, &audit);
    // The metrics endpoint is bound before anything is attached, so a taken port fails the
    // start with a sentence.
    let metrics = match config.metrics.listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(io(format!(
                "cannot serve the metrics on {addr} ([metrics] listen)"
            )))?;
            let m = Arc::new(metrics::Metrics::new());
            let counted = Arc::clone(&m);
            audit.observe(Box::new(move |record| counted.audited(record)));
            Some((m, listener))
        }
        None => None,
    };
    let kms_metrics = metrics.as_ref().map(|(m, _)| Arc::clone(m));
    let kms = match config.kms.backend.as_str() {
        "aws" => KmsBackend::Aws(
            AwsKms::connect(config.kms.aws.to_backend())
                .await?
                .with_observer(kms_call_observer(Arc::clone(&audit), kms_metrics)),
        ),
        _ => {
            let local = LocalKms::open(
                &keystore,
                LocalKmsOptions {
                    create_if_missing: true,
                    passphrase: passphrase(config.kms.passphrase_file.as_ref())?,
                    ..LocalKmsOptions::default()
                },
            )?;
            KmsBackend::Local(match kms_metrics {
                Some(m) => local.with_observer(Arc::new(move |call| m.kms_call(call))),
                None => local,
            })
        }
    };
    let key_policy = services::KeyPolicy {
        check_interval: (config.kms.key_check_interval_secs > 0)
            .then(|| std::time::Duration::from_secs(config.kms.key_check_interval_secs)),
        on_unusable: config.kms.on_unusable_key,
        grants: (config.kms.backend == "aws" && config.kms.aws.grants).then(|| {
            services::GrantPolicy {
                grantee: config.kms.aws.grantee_principal.clone(),
                retiring: config.kms.aws.retiring_principal.clone(),
            }
        }),
    };

    let control_path = config
        .control
        .socket
        .clone()
        .unwrap_or_else(|| layout.control_socket());
    let nbd_path = config
        .nbd
        .unix_socket
        .clone()
        .unwrap_or_else(|| layout.nbd_socket());
    // Anyone may connect to the NBD socket; exports check the peer's credentials.
    let nbd_unix = bind_unix(&nbd_path, 0o666)?;
    let control = bind_unix(&control_path, 0o660)?;
    let nbd_tcp = match config.nbd.tcp {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(io(format!("cannot listen on tcp {addr}")))?,
        ),
        None => None,
    };
    let tcp_addr = nbd_tcp.as_ref().and_then(|l| l.local_addr().ok());

    let registry = Arc::new(registry::Registry::default());
    registry.set_audit(Arc::clone(&audit), kms_client::Kms::backend_name(&kms));
    let server = nbd::server::Server::new(registry.clone(), config.limits.to_limits());
    server.set_tls(tls.settings.clone());
    let mut daemon = daemon::Daemon::new(
        layout.clone(),
        kms,
        registry,
        Arc::clone(&server),
        audit,
        config.audit.keep,
        nbd_path.clone(),
        tcp_addr,
        hardening.memory_locked,
        config.recovery.params(),
        key_policy,
        (config.kms.backend != "aws").then(|| keystore.clone()),
    );
    let opened = stores::open(&config.store, &layout)?;
    daemon.services.catalog = opened.stores;
    daemon.services.rbd = opened.rbd;
    daemon.services.root_daemon = config.root_daemon;
    daemon.services.metrics = metrics.as_ref().map(|(m, _)| Arc::clone(m));
    daemon.services.tls = tls::TlsService {
        config: config.nbd.tls.clone(),
        loaded: std::sync::Mutex::new(tls),
    };
    let daemon = Arc::new(daemon);
    daemon.finish_moves();
    daemon.clean_leftovers();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    {
        let server = Arc::clone(&server);
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            if let Err(e) = server.serve_unix(nbd_unix, stop).await {
                tracing::error!(error = %e, "the NBD unix listener failed");
            }
        });
    }
    if let Some(l) = nbd_tcp {
        let server = Arc::clone(&server);
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            if let Err(e) = server.serve_tcp(l, stop).await {
                tracing::error!(error = %e, "the NBD tcp listener failed");
            }
        });
    }

    if let Some((m, listener)) = metrics {
        let addr = listener
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string());
        let stop = stopped(stop_rx.clone());
        let weak = Arc::downgrade(&daemon);
        tasks.spawn(metrics::serve(
            listener,
            m,
            move || {
                if let Some(d) = weak.upgrade() {
                    d.refresh_metrics();
                }
            },
            stop,
        ));
        tracing::info!(listen = %addr, "metrics served at /metrics");
    }
    daemon.restore_attachments().await;
    tasks.spawn(Arc::clone(&daemon).key_checker(stop_rx.clone()));
    tasks.spawn(Arc::clone(&daemon).reload_on_sighup(stop_rx.clone()));
    tasks.spawn(Arc::clone(&daemon).session_checker(stop_rx.clone()));
    tracing::info!(
        state = %layout.state_dir.display(),
        control = %control_path.display(),
        nbd = %nbd_path.display(),
        tcp = ?tcp_addr,
        memory_locked = hardening.memory_locked,
        "cryptnbd ready"
    );
    notify::notify("READY=1");

    let acl = control::ControlAcl {
        uids: config.control.allow_uids.clone(),
        gids: config.control.allow_gids.clone(),
    };
    if config.root_daemon {
        drop(shutdown);
        control::serve(
            control,
            Arc::clone(&daemon),
            acl,
            root_shutdown(Arc::clone(&daemon)),
        )
        .await;
    } else {
        control::serve(control, Arc::clone(&daemon), acl, shutdown).await;
    }

    notify::notify("STOPPING=1");
    tracing::info!("shutting down: finishing in-flight requests, flushing, wiping keys");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    daemon.shutdown().await;
    let _ = std::fs::remove_file(&control_path);
    let _ = std::fs::remove_file(&nbd_path);
    tracing::info!("stopped");
    Ok(())
}

/// An observer for a remote KMS backend that writes one record per call (operation
/// `kms:ACTION`, with the request id), naming the volume and caller of the request being
/// handled (see [`AUDIT_SCOPE`]), and counts it in the metrics when they are on.
fn kms_call_observer(
    log: Arc<AuditLog>,
    metrics: Option<Arc<metrics::Metrics>>,
) -> kms_client::CallObserver {
    Arc::new(move |call: &kms_client::KmsCall| {
        if let Some(m) = &metrics {
            m.kms_call(call);
        }
        let scope = AUDIT_SCOPE.try_with(Clone::clone).unwrap_or_default();
        log.record(&AuditRecord {
            time: statedir::stamp::now(),
            operation: format!("kms:{}", call.operation),
            backend: "aws".into(),
            key_id: Some(call.key_id.clone()),
            context: call.context.as_ref().map(|c| c.pairs().clone()),
            volume: scope.volume,
            caller_uid: scope.caller_uid,
            outcome: match &call.outcome {
                Ok(()) => "ok".into(),
                Err(e) => e.clone(),
            },
            latency_ms: call.latency.as_millis() as u64,
            request_id: call.request_id.clone(),
        });
    })
}
