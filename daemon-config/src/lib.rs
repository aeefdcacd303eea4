//! The daemon's TOML configuration. Every field has a default, so cryptnbd runs with no
//! config file at all: the local KMS in the per-user (or system) state directory, a unix
//! NBD socket, no TCP. Unknown keys are refused so that a typo is not silently ignored.
//!
//! A crate of its own so that what reads the file can be built without the daemon: the fuzz
//! target `daemon_config` drives [`Config::parse`], and the fuzz build leaves out the AWS SDK
//! that the daemon links. This crate must not depend on the daemon, the AWS SDK (kms-client's
//! `aws` feature), sockets or files other than the ones a key names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration (docs/daemon.md lists every key).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State directory (keystore, volumes, audit log). Default: as `cryptnbdctl`.
    pub state_dir: Option<PathBuf>,
    /// Socket directory. Default: `/run/cryptnbd` as root, else `$XDG_RUNTIME_DIR/cryptnbd`.
    pub runtime_dir: Option<PathBuf>,
    /// NBD listeners.
    pub nbd: NbdConfig,
    /// The control socket.
    pub control: ControlConfig,
    /// The KMS backend.
    pub kms: KmsConfig,
    /// Resource limits.
    pub limits: LimitsConfig,
    /// The audit trail.
    pub audit: AuditConfig,
    /// Key memory.
    pub memory: MemoryConfig,
    /// Recovery passphrase keyslots.
    pub recovery: RecoveryConfig,
    /// Where volumes live.
    pub store: StoreConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Started as the root storage daemon (`argv[0]` begins with `@`, as the initramfs starts
    /// it; docs/root-volume.md): not a configuration key.
    #[serde(skip)]
    pub root_daemon: bool,
}

/// `[store]`: where volumes live. Files in the state directory always; an RBD pool too when
/// `[store.rbd]` is given.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Where `create` puts new volumes: `file` (the default) or `rbd`.
    pub default: StoreKind,
    /// The Ceph RBD pool, if any.
    pub rbd: Option<RbdConfig>,
    /// `[store.devices]`: volumes on block devices, by name: `NAME = "UUID=…"` (the LUKS2
    /// header's UUID) or `NAME = "/dev/…"` (docs/root-volume.md).
    pub devices: std::collections::BTreeMap<String, String>,
    /// `[store.file]`: how the file engine moves data (volume files and devices).
    pub file: FileConfig,
}

/// `[store.file]`: the file engine (volume files in the state directory, and devices).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `buffered` (through the page cache, the default) or `direct` (`O_DIRECT`, where the
    /// filesystem has it; docs/benchmarks.md compares them).
    pub io: FileIoMode,
}

/// `[store.file] io`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileIoMode {
    /// Through the page cache.
    #[default]
    Buffered,
    /// Around the page cache (`O_DIRECT`).
    Direct,
}

impl FileIoMode {
    /// The file engine's setting.
    pub fn engine(self) -> store::file::FileIo {
        match self {
            FileIoMode::Buffered => store::file::FileIo::Buffered,
            FileIoMode::Direct => store::file::FileIo::Direct,
        }
    }
}

impl StoreConfig {
    /// The `[store.devices]` entries, parsed; `Err` names the entry that is wrong and why.
    pub fn device_entries(
        &self,
    ) -> Result<std::collections::BTreeMap<String, store::device::Locator>, ConfigError> {
        self.devices
            .iter()
            .map(|(name, value)| {
                control_api::paths::validate_name(name)
                    .and_then(|()| store::device::Locator::parse(value))
                    .map(|l| (name.clone(), l))
                    .map_err(|m| ConfigError::Invalid(format!("[store.devices] {name}: {m}")))
            })
            .collect()
    }
}

/// A store's kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Files in the state directory.
    #[default]
    File,
    /// A Ceph RBD pool.
    Rbd,
}

impl StoreKind {
    /// `file` or `rbd`.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::File => "file",
            StoreKind::Rbd => "rbd",
        }
    }
}

/// `[store.rbd]`: the Ceph cluster and pool (docs/rbd.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RbdConfig {
    /// The cluster's `ceph.conf`.
    pub conf: PathBuf,
    /// The pool the volumes live in (give cryptnbd a pool of its own).
    pub pool: String,
    /// The cephx client name, without `client.`.
    pub id: String,
    /// The client's keyring, when `ceph.conf` does not name it.
    pub keyring: Option<PathBuf>,
    /// Seconds to wait for the monitors at start, and for any monitor or OSD operation
    /// (catalog and data alike) before failing it.
    pub timeout_secs: u64,
}

impl Default for RbdConfig {
    fn default() -> Self {
        Self {
            conf: PathBuf::from("/etc/ceph/ceph.conf"),
            pool: "rbd".into(),
            id: "cryptnbd".into(),
            keyring: None,
            timeout_secs: 30,
        }
    }
}

/// `[recovery]`: the argon2id cost of new recovery keyslots. Defaults: cryptsetup's (1 GiB,
/// at most 4 lanes, 4 passes), the memory capped at a quarter of physical memory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Memory cost in KiB.
    pub argon2_memory_kib: Option<u32>,
    /// Passes (at least 4).
    pub argon2_time: Option<u32>,
    /// Lanes (1 to 4).
    pub argon2_parallel: Option<u32>,
}

impl RecoveryConfig {
    /// The parameters new keyslots get.
    pub fn params(&self) -> volume::keyslot::Argon2Params {
        let d = volume::keyslot::Argon2Params::default();
        volume::keyslot::Argon2Params {
            time: self.argon2_time.unwrap_or(d.time),
            memory_kib: self.argon2_memory_kib.unwrap_or(d.memory_kib),
            parallel: self.argon2_parallel.unwrap_or(d.parallel),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint (docs/metrics.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics`, e.g. "127.0.0.1:9810". Off by default; loopback only
    /// unless `allow_non_loopback`.
    pub listen: Option<SocketAddr>,
    /// Serve the metrics on a non-loopback address: anyone who reaches it learns the names
    /// of the attached volumes and how busy they are.
    pub allow_non_loopback: bool,
}

/// `[nbd]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// The NBD unix socket. Default: RUNTIME_DIR/nbd.sock.
    pub unix_socket: Option<PathBuf>,
    /// A TCP listener, e.g. "127.0.0.1:10809". Off by default; loopback only unless
    /// `allow_non_loopback`. Volumes are reachable on it only when attached with `--tcp`.
    pub tcp: Option<SocketAddr>,
    /// Allow a TCP listener on a non-loopback address without TLS that checks clients
    /// (`[nbd.tls] mode = "require"` with `verify_peer`), where it is allowed anyway.
    pub allow_non_loopback: bool,
    /// `[nbd.tls]`.
    pub tls: TlsConfig,
}

/// How a listener treats TLS: `off`, `on` (offered; `--tls-only` exports need it) or
/// `require` (nothing without it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsModeConfig {
    /// No TLS.
    #[default]
    Off,
    /// TLS offered.
    On,
    /// TLS required.
    Require,
}

impl From<TlsModeConfig> for nbd::server::TlsMode {
    fn from(m: TlsModeConfig) -> Self {
        match m {
            TlsModeConfig::Off => Self::Off,
            TlsModeConfig::On => Self::On,
            TlsModeConfig::Require => Self::Require,
        }
    }
}

/// `[nbd.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The TCP listener's mode.
    pub mode: TlsModeConfig,
    /// The certificate directory: ca-cert.pem, server-cert.pem, server-key.pem, optional
    /// ca-crl.pem (nbdkit's and qemu's layout).
    pub certificates: PathBuf,
    /// Client certificates required and checked against ca-cert.pem and the CRL (else
    /// checked only when a client sends one).
    pub verify_peer: bool,
    /// The unix socket's mode (for `nbds+unix://`).
    pub unix_mode: TlsModeConfig,
    /// How often live TLS sessions are checked again between reloads, so that one whose
    /// certificate expires is disconnected within this many seconds (0: only at reloads).
    pub session_check_interval_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            mode: TlsModeConfig::Off,
            certificates: PathBuf::from("/etc/cryptnbd/pki"),
            verify_peer: true,
            unix_mode: TlsModeConfig::Off,
            session_check_interval_secs: 60,
        }
    }
}

/// `[control]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The control socket. Default: RUNTIME_DIR/control.sock (mode 0660).
    pub socket: Option<PathBuf>,
    /// Users allowed on the control socket besides root and the daemon's own user.
    pub allow_uids: Vec<u32>,
    /// Groups allowed on the control socket (the caller's primary group).
    pub allow_gids: Vec<u32>,
}

/// `[kms]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KmsConfig {
    /// `local` (the embedded KMS; the default) or `aws`.
    pub backend: String,
    /// Keystore directory of the local KMS. Default: STATE_DIR/keystore.
    pub keystore: Option<PathBuf>,
    /// File with the passphrase of a sealed keystore (else env CRYPTNBD_KMS_PASSPHRASE).
    pub passphrase_file: Option<PathBuf>,
    /// Seconds between checks of the attached volumes' master keys (DescribeKey); 0: never.
    pub key_check_interval_secs: u64,
    /// What to do when an attached volume's master key is found disabled or pending
    /// deletion: `report` (log it, show it in `status`; the volume keeps working, as EBS
    /// does) or `detach` (detach the volume at once and wipe its key).
    pub on_unusable_key: UnusableKeyAction,
    /// `[kms.aws]`: the AWS KMS backend.
    pub aws: AwsConfig,
}

impl Default for KmsConfig {
    fn default() -> Self {
        Self {
            backend: "local".into(),
            keystore: None,
            passphrase_file: None,
            key_check_interval_secs: 300,
            on_unusable_key: UnusableKeyAction::Report,
            aws: AwsConfig::default(),
        }
    }
}

/// `kms.on_unusable_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnusableKeyAction {
    /// Log and report; keep serving.
    Report,
    /// Detach at once (clients are disconnected, the key wiped).
    Detach,
}

/// `[kms.aws]`. Everything left unset comes from the standard AWS configuration (environment,
/// `~/.aws/config` and `~/.aws/credentials`, the profile).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region, e.g. `eu-west-1` (else AWS_REGION / the profile's region).
    pub region: Option<String>,
    /// KMS endpoint URL: a VPC endpoint, or a test server on loopback.
    pub endpoint_url: Option<String>,
    /// STS endpoint URL (asked who the daemon is, for grants without grantee_principal).
    pub sts_endpoint_url: Option<String>,
    /// Profile in the shared config files (else AWS_PROFILE / default).
    pub profile: Option<String>,
    /// AWS config file to read instead of AWS_CONFIG_FILE / ~/.aws/config.
    pub config_file: Option<PathBuf>,
    /// AWS credentials file to read instead of AWS_SHARED_CREDENTIALS_FILE /
    /// ~/.aws/credentials.
    pub credentials_file: Option<PathBuf>,
    /// Use the FIPS endpoint (kms-fips.REGION.amazonaws.com).
    pub use_fips: bool,
    /// Seconds to open a connection.
    pub connect_timeout_secs: f64,
    /// Seconds for one attempt.
    pub attempt_timeout_secs: f64,
    /// Seconds for a whole call, retries included.
    pub operation_timeout_secs: f64,
    /// Attempts per call (throttling, 5xx and network errors are retried with jittered
    /// exponential backoff).
    pub max_attempts: u32,
    /// First retry delay, milliseconds.
    pub initial_backoff_ms: u64,
    /// Largest retry delay, milliseconds.
    pub max_backoff_ms: u64,
    /// Create a grant per volume at create (Decrypt + ReEncryptFrom, constrained to the
    /// volume id), retired when the volume is deleted.
    pub grants: bool,
    /// The grantee of those grants. Default: the daemon's own principal (STS
    /// GetCallerIdentity; an assumed role becomes its role ARN).
    pub grantee_principal: Option<String>,
    /// Who may retire them. Default: the grantee.
    pub retiring_principal: Option<String>,
}

impl Default for AwsConfig {
    fn default() -> Self {
        let d = kms_client::aws_config::AwsKmsConfig::default();
        Self {
            region: None,
            endpoint_url: None,
            sts_endpoint_url: None,
            profile: None,
            config_file: None,
            credentials_file: None,
            use_fips: false,
            connect_timeout_secs: d.connect_timeout.as_secs_f64(),
            attempt_timeout_secs: d.attempt_timeout.as_secs_f64(),
            operation_timeout_secs: d.operation_timeout.as_secs_f64(),
            max_attempts: d.max_attempts,
            initial_backoff_ms: d.initial_backoff.as_millis() as u64,
            max_backoff_ms: d.max_backoff.as_millis() as u64,
            grants: false,
            grantee_principal: None,
            retiring_principal: None,
        }
    }
}

impl AwsConfig {
    /// The backend's settings.
    pub fn to_backend(&self) -> kms_client::aws_config::AwsKmsConfig {
        use std::time::Duration;
        kms_client::aws_config::AwsKmsConfig {
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            sts_endpoint_url: self.sts_endpoint_url.clone(),
            profile: self.profile.clone(),
            config_file: self.config_file.clone(),
            credentials_file: self.credentials_file.clone(),
            use_fips: self.use_fips,
            connect_timeout: Duration::from_secs_f64(self.connect_timeout_secs),
            attempt_timeout: Duration::from_secs_f64(self.attempt_timeout_secs),
            operation_timeout: Duration::from_secs_f64(self.operation_timeout_secs),
            max_attempts: self.max_attempts,
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("attempt_timeout_secs", self.attempt_timeout_secs),
            ("operation_timeout_secs", self.operation_timeout_secs),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
                return Err(ConfigError::Invalid(format!(
                    "kms.aws.{name} must be a number of seconds in (0, 3600]"
                )));
            }
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(ConfigError::Invalid(
                "kms.aws.max_attempts must be 1..=20".into(),
            ));
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err(ConfigError::Invalid(
                "kms.aws.initial_backoff_ms must not exceed kms.aws.max_backoff_ms".into(),
            ));
        }
        if self.use_fips && self.endpoint_url.is_some() {
            return Err(ConfigError::Invalid(
                "kms.aws.use_fips and kms.aws.endpoint_url exclude each other: the SDK picks \
                 the FIPS endpoint itself; give a FIPS endpoint as endpoint_url instead"
                    .into(),
            ));
        }
        for (name, url) in [
            ("endpoint_url", &self.endpoint_url),
            ("sts_endpoint_url", &self.sts_endpoint_url),
        ] {
            if let Some(url) = url
                && !(url.starts_with("https://") || url.starts_with("http://"))
            {
                return Err(ConfigError::Invalid(format!(
                    "kms.aws.{name} = {url:?} must start with https:// (or http:// for a test \
                     server)"
                )));
            }
        }
        Ok(())
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest NBD request payload (bytes).
    pub max_payload: u32,
    /// In-flight payload bytes per connection.
    pub per_connection_inflight_bytes: u64,
    /// In-flight payload bytes over all connections.
    pub global_inflight_bytes: u64,
    /// Most simultaneous NBD connections.
    pub max_connections: usize,
    /// Seconds a client has to finish the handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds a client has to send a write's payload once its header arrived.
    pub payload_timeout_secs: u64,
    /// Seconds a client may leave its replies unread (its socket full) before it is
    /// disconnected.
    pub reply_timeout_secs: u64,
    /// Threads doing the blocking volume I/O (0: one per core, at least 4).
    pub io_threads: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = nbd::server::Limits::default();
        Self {
            max_payload: d.max_payload,
            per_connection_inflight_bytes: d.per_connection_inflight_bytes,
            global_inflight_bytes: d.global_inflight_bytes,
            max_connections: d.max_connections,
            handshake_timeout_secs: d.handshake_timeout.as_secs(),
            payload_timeout_secs: d.payload_timeout.as_secs(),
            reply_timeout_secs: d.reply_timeout.as_secs(),
            io_threads: 0,
        }
    }
}

impl LimitsConfig {
    /// The server limits these settings describe. With an RBD store the default number of
    /// I/O threads is the same: its requests do not hold a thread while they wait on the
    /// cluster (docs/rbd.md, "Requests in flight").
    pub fn to_limits(&self) -> nbd::server::Limits {
        let d = nbd::server::Limits::default();
        nbd::server::Limits {
            max_payload: self.max_payload,
            per_connection_inflight_bytes: self.per_connection_inflight_bytes,
            global_inflight_bytes: self.global_inflight_bytes,
            max_connections: self.max_connections,
            handshake_timeout: std::time::Duration::from_secs(self.handshake_timeout_secs),
            payload_timeout: std::time::Duration::from_secs(self.payload_timeout_secs),
            reply_timeout: std::time::Duration::from_secs(self.reply_timeout_secs),
            io_threads: if self.io_threads > 0 {
                self.io_threads
            } else {
                d.io_threads
            },
        }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Rotate the audit file when it would exceed this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (audit.jsonl.1 .. .N).
    pub keep: u32,
    /// The root daemon's trail, written in the initramfs (docs/root-volume.md): its records
    /// are merged into this trail at start, once each, marked `"origin": "initramfs"`.
    pub initramfs_trail: PathBuf,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            max_bytes: 10 << 20,
            keep: 5,
            initramfs_trail: Path::new(control_api::paths::ROOT_RUNTIME_DIR)
                .join("state/audit/audit.jsonl"),
        }
    }
}

/// `[memory]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Refuse to start when memory cannot be locked (keys could reach swap). Default: true
    /// as root, false otherwise (an unprivileged user rarely may lock enough memory; the
    /// daemon then warns).
    pub require_lock: Option<bool>,
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("invalid configuration in {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (with line and column).
        message: String,
    },
    /// A value is not allowed.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Invalid(message) => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.kms.backend.as_str() {
            "local" => {}
            "aws" => self.kms.aws.validate()?,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "kms.backend = \"{other}\" is not a backend this build has: use \"local\" \
                     or \"aws\""
                )));
            }
        }
        let checked_tls = self.nbd.tls.mode == TlsModeConfig::Require && self.nbd.tls.verify_peer;
        if let Some(addr) = self.nbd.tcp
            && !addr.ip().is_loopback()
            && !self.nbd.allow_non_loopback
            && !checked_tls
        {
            return Err(ConfigError::Invalid(format!(
                "nbd.tcp = \"{addr}\" is not a loopback address, and without TLS that checks \
                 client certificates anyone on the network could read and write the volumes \
                 exported there: set [nbd.tls] mode = \"require\" with verify_peer = true \
                 (docs/tls.md), or nbd.allow_non_loopback = true to do it anyway"
            )));
        }
        if let Some(addr) = self.metrics.listen
            && !addr.ip().is_loopback()
            && !self.metrics.allow_non_loopback
        {
            return Err(ConfigError::Invalid(format!(
                "metrics.listen = \"{addr}\" is not a loopback address: anyone who reaches it \
                 would learn the names of the attached volumes and how busy they are. Use \
                 127.0.0.1 (and let the scraper reach it through a proxy or a tunnel), or set \
                 metrics.allow_non_loopback = true"
            )));
        }
        let l = &self.limits;
        if l.payload_timeout_secs == 0 || l.handshake_timeout_secs == 0 || l.reply_timeout_secs == 0
        {
            return Err(ConfigError::Invalid(
                "limits.handshake_timeout_secs, limits.payload_timeout_secs and \
                 limits.reply_timeout_secs must be at least 1"
                    .into(),
            ));
        }
        if self.limits.max_payload < 4096 || self.limits.max_payload > (32 << 20) {
            return Err(ConfigError::Invalid(
                "limits.max_payload must be 4096..=33554432".into(),
            ));
        }
        if self.limits.global_inflight_bytes < u64::from(self.limits.max_payload) {
            return Err(ConfigError::Invalid(
                "limits.global_inflight_bytes must be at least limits.max_payload".into(),
            ));
        }
        if self.store.default == StoreKind::Rbd && self.store.rbd.is_none() {
            return Err(ConfigError::Invalid(
                "store.default = \"rbd\" needs a [store.rbd] section naming the cluster \
                 (conf, pool, id): see docs/rbd.md"
                    .into(),
            ));
        }
        self.store.device_entries()?;
        if let Some(rbd) = &self.store.rbd
            && (rbd.pool.is_empty() || rbd.id.is_empty() || rbd.timeout_secs == 0)
        {
            return Err(ConfigError::Invalid(
                "[store.rbd] pool and id must not be empty, and timeout_secs must be at least 1"
                    .into(),
            ));
        }
        if self.audit.max_bytes < 4096 {
            return Err(ConfigError::Invalid(
                "audit.max_bytes must be at least 4096".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_valid_and_typos_are_refused() {
        let c = Config::parse("").expect("empty");
        assert_eq!(c.kms.backend, "local");
        assert!(c.nbd.tcp.is_none());
        let err = Config::parse("[nbd]\ntcpp = \"127.0.0.1:1\"\n").expect_err("typo");
        assert!(err.to_string().contains("tcpp"), "{err}");
        let err = Config::parse("[nbd]\ntcp = \"0.0.0.0:10809\"\n").expect_err("public");
        assert!(err.to_string().contains("allow_non_loopback"), "{err}");
        let err = Config::parse("[metrics]\nlisten = \"0.0.0.0:9810\"\n").expect_err("public");
        assert!(
            err.to_string().contains("metrics.allow_non_loopback"),
            "{err}"
        );
        Config::parse("[metrics]\nlisten = \"0.0.0.0:9810\"\nallow_non_loopback = true\n")
            .expect("allowed");
        let c = Config::parse("[metrics]\nlisten = \"127.0.0.1:9810\"\n").expect("loopback");
        assert_eq!(c.metrics.listen, "127.0.0.1:9810".parse().ok());
        Config::parse("[nbd]\ntcp = \"0.0.0.0:10809\"\nallow_non_loopback = true\n")
            .expect("opt-in");
        let err = Config::parse("[store]\ndefault = \"rbd\"\n").expect_err("no cluster");
        assert!(err.to_string().contains("[store.rbd]"), "{err}");
        let err = Config::parse("[store]\ndefault = \"nfs\"\n").expect_err("kind");
        assert!(err.to_string().contains("nfs"), "{err}");
        let c = Config::parse("[store]\ndefault = \"rbd\"\n[store.rbd]\npool = \"vols\"\n")
            .expect("rbd");
        let rbd = c.store.rbd.expect("rbd");
        assert_eq!(
            (rbd.pool.as_str(), rbd.id.as_str(), rbd.conf.to_str()),
            ("vols", "cryptnbd", Some("/etc/ceph/ceph.conf"))
        );
        let err = Config::parse("[kms]\nbackend = \"vault\"\n").expect_err("backend");
        assert!(err.to_string().contains("vault"), "{err}");
        let c = Config::parse(
            "[kms]\nbackend = \"aws\"\non_unusable_key = \"detach\"\n[kms.aws]\n\
             region = \"eu-west-1\"\nendpoint_url = \"http://127.0.0.1:4566\"\ngrants = true\n",
        )
        .expect("aws");
        assert_eq!(c.kms.on_unusable_key, UnusableKeyAction::Detach);
        assert_eq!(c.kms.aws.to_backend().max_attempts, 4);
        let err = Config::parse("[kms]\nbackend = \"aws\"\n[kms.aws]\nmax_attempts = 0\n")
            .expect_err("attempts");
        assert!(err.to_string().contains("max_attempts"), "{err}");
        let err = Config::parse("[kms]\nbackend = \"aws\"\n[kms.aws]\nendpoint_url = \"kms\"\n")
            .expect_err("url");
        assert!(err.to_string().contains("https://"), "{err}");
        let err = Config::parse("[kms]\non_unusable_key = \"panic\"\n").expect_err("action");
        assert!(err.to_string().contains("panic"), "{err}");
    }

    #[test]
    fn limits_convert_and_timeouts_of_zero_are_refused() {
        let c = Config::parse("[limits]\nreply_timeout_secs = 5\npayload_timeout_secs = 7\n")
            .expect("limits");
        let l = c.limits.to_limits();
        assert_eq!(
            (l.reply_timeout.as_secs(), l.payload_timeout.as_secs()),
            (5, 7)
        );
        let d = Config::parse("").expect("empty").limits.to_limits();
        assert_eq!(
            d.reply_timeout,
            nbd::server::Limits::default().reply_timeout
        );
        for key in [
            "reply_timeout_secs",
            "payload_timeout_secs",
            "handshake_timeout_secs",
        ] {
            let err = Config::parse(&format!("[limits]\n{key} = 0\n")).expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
        }
    }
}
