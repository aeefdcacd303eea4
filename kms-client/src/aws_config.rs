//! How to reach AWS KMS ([`AwsKmsConfig`]): plain settings, compiled without the `aws`
//! feature too, so that what reads a configuration file (the daemon's, `daemon-config`) does
//! not need the AWS SDK. The backend that uses them is `aws::AwsKms`.

use std::path::PathBuf;
use std::time::Duration;

/// How to reach AWS KMS. Everything not set here comes from the standard AWS configuration
/// (environment variables, `~/.aws/config`, the profile's settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKmsConfig {
    /// Region (else `AWS_REGION` / the profile's `region`).
    pub region: Option<String>,
    /// Endpoint URL of KMS: a VPC endpoint, a test server (else the regional endpoint).
    pub endpoint_url: Option<String>,
    /// Endpoint URL of STS, asked who the daemon is when grants name it (else the regional
    /// endpoint).
    pub sts_endpoint_url: Option<String>,
    /// Profile in the shared config files (else `AWS_PROFILE` / `default`).
    pub profile: Option<String>,
    /// The shared config file to read instead of `AWS_CONFIG_FILE` / `~/.aws/config` (a
    /// service's own, e.g. `/etc/cryptnbd/aws-config`).
    pub config_file: Option<PathBuf>,
    /// The shared credentials file to read instead of `AWS_SHARED_CREDENTIALS_FILE` /
    /// `~/.aws/credentials`.
    pub credentials_file: Option<PathBuf>,
    /// Use the FIPS 140 endpoint (`kms-fips.REGION.amazonaws.com`).
    pub use_fips: bool,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one attempt.
    pub attempt_timeout: Duration,
    /// Time allowed for a whole call, retries included.
    pub operation_timeout: Duration,
    /// Attempts per call (1 = no retry).
    pub max_attempts: u32,
    /// First retry delay (the SDK draws each delay at random up to an exponential bound).
    pub initial_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
}

impl Default for AwsKmsConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            sts_endpoint_url: None,
            profile: None,
            config_file: None,
            credentials_file: None,
            use_fips: false,
            connect_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(20),
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}
