//! moto (`pip install 'moto[server]'`) as an AWS KMS API server on a loopback port, and boto3
//! calls to set it up (create, disable and schedule keys; list grants). Both come from the
//! Python the tests use ([`crate::python`]); a Python without them fails the test with what to
//! install. Credentials are fixed test strings: no real credential is ever used.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The region every test uses.
pub const REGION: &str = "eu-west-1";
/// Test credentials (moto does not check signatures).
pub const ACCESS_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
/// Test credentials (the example secret of the AWS documentation).
pub const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

/// The environment a test process needs to reach moto with the standard credential chain.
pub fn aws_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
        ("AWS_REGION", REGION),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
}

/// The daemon's `[kms]` configuration for AWS KMS at `endpoint`, with credentials from files
/// written in `dir`, two attempts per call and `timeouts` = (seconds per attempt, seconds per
/// operation); `extra_kms` and `extra_aws` are more lines for `[kms]` and `[kms.aws]`.
pub fn daemon_aws_config(
    dir: &std::path::Path,
    endpoint: &str,
    extra_kms: &str,
    extra_aws: &str,
    timeouts: (f64, f64),
) -> String {
    let (config, credentials) = write_aws_files(dir);
    format!(
        "[kms]\nbackend = \"aws\"\n{extra_kms}\n[kms.aws]\nregion = \"{REGION}\"\n\
         endpoint_url = \"{endpoint}\"\nconfig_file = \"{}\"\ncredentials_file = \"{}\"\n\
         max_attempts = 2\ninitial_backoff_ms = 20\nmax_backoff_ms = 100\n\
         attempt_timeout_secs = {:.1}\noperation_timeout_secs = {:.1}\n{extra_aws}\n",
        config.display(),
        credentials.display(),
        timeouts.0,
        timeouts.1,
    )
}

/// Writes an AWS config file (region) and a credentials file (the test key) into `dir`;
/// returns (config, credentials).
pub fn write_aws_files(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let config = dir.join("aws-config");
    let credentials = dir.join("aws-credentials");
    std::fs::write(&config, format!("[default]\nregion = {REGION}\n")).expect("aws config");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = {ACCESS_KEY_ID}\n\
             aws_secret_access_key = {SECRET_ACCESS_KEY}\n"
        ),
    )
    .expect("aws credentials");
    (config, credentials)
}

/// A running moto server (killed on drop).
pub struct Moto {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    python: PathBuf,
}

/// The key id of an ARN (`arn:aws:kms:REGION:ACCOUNT:key/ID` -> `ID`).
pub fn bare(key: &str) -> &str {
    key.rsplit_once(":key/").map_or(key, |(_, id)| id)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Moto {
    /// Starts moto on 127.0.0.1 and waits until it answers.
    #[track_caller]
    pub fn start() -> Self {
        let python = crate::python();
        let has = Command::new(&python)
            .args(["-c", "import moto.server, boto3"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            has,
            "{} cannot import moto.server and boto3: install them with `{} -m pip install \
             'moto[server]'` (scripts/test-all.sh does)",
            python.display(),
            python.display()
        );
        let port = free_port();
        let child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not listen on {addr} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            addr,
            python,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs Python with `kms`, a boto3 KMS client on this server, bound; the code's last
    /// expression must be assigned to `out`, which is printed as JSON and returned.
    #[track_caller]
    pub fn boto(&self, code: &str) -> Value {
        let script = format!(
            "import boto3, json\n\
             kms = boto3.client('kms', endpoint_url='{}', region_name='{REGION}', \
             aws_access_key_id='{ACCESS_KEY_ID}', aws_secret_access_key='{SECRET_ACCESS_KEY}')\n\
             out = None\n{code}\nprint(json.dumps(out, default=str))\n",
            self.url()
        );
        let out = Command::new(&self.python)
            .args(["-c", &script])
            .output()
            .expect("run boto3");
        assert!(
            out.status.success(),
            "boto3 failed: {}\n{code}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("boto3 JSON output")
    }

    /// A new symmetric key; returns its ARN.
    pub fn create_key(&self, description: &str) -> String {
        self.boto(&format!(
            "out = kms.create_key(Description='{description}')['KeyMetadata']['Arn']"
        ))
        .as_str()
        .expect("arn")
        .to_owned()
    }

    /// Runs one KMS admin action (`disable_key`, `enable_key`, `cancel_key_deletion`, or
    /// `schedule_key_deletion`) on a key given by ARN or id (moto wants the bare id).
    #[track_caller]
    pub fn admin(&self, action: &str, key: &str) {
        let extra = if action == "schedule_key_deletion" {
            ", PendingWindowInDays=7"
        } else {
            ""
        };
        self.boto(&format!("kms.{action}(KeyId='{}'{extra})", bare(key)));
    }

    /// The ids of the grants on a key.
    pub fn grant_ids(&self, key: &str) -> Vec<String> {
        self.boto(&format!(
            "out = [g['GrantId'] for g in kms.list_grants(KeyId='{}')['Grants']]",
            bare(key)
        ))
        .as_array()
        .expect("grants")
        .iter()
        .filter_map(|g| g.as_str().map(str::to_owned))
        .collect()
    }

    /// The grants on a key, as moto lists them.
    pub fn grants(&self, key: &str) -> Vec<Value> {
        self.boto(&format!(
            "out = kms.list_grants(KeyId='{}')['Grants']",
            bare(key)
        ))
        .as_array()
        .cloned()
        .unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
