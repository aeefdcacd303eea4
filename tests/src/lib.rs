//! Helpers for the end-to-end tests: locating the project's binaries and the real peer tools.
//!
//! The tests in `tests/tests/` run the real `cryptnbdctl` (built by `cargo build --workspace
//! --bins`), the real `cryptsetup` and an independent AES-XTS oracle (`tests/oracle/xts_oracle.py`,
//! Python `cryptography`). A peer tool that is missing makes the test fail with the name of the
//! tool and of the package to install: a test never passes without running its peer.
//!
//! Key material: keys are written only to 0600 files inside the test's temporary directory
//! and handed to the tools by path. No helper here prints key bytes, puts them on a command
//! line or in an assertion message; byte comparisons report offsets and lengths only.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

use base64::Engine as _;
use kms_client::local::{LocalKms, LocalKmsOptions};
use kms_client::{EncryptionContext, Kms};
use serde_json::{Map, Value};
pub use zeroize::Zeroizing;

pub mod kms_proxy;
pub mod moto;

/// A SID that passes cryptnbd's checks (the example of docs/format.md).
pub const TEST_SID: &str = "S-1-5-21-277731876-1789304096-451871588-1107";
/// A directory id that passes cryptnbd's checks.
pub const TEST_DIRECTORY: &str = "d-1234abcd01";
/// Where the data segment starts in every volume cryptnbd creates (and in cryptsetup's
/// default LUKS2 layout).
pub const DATA_OFFSET: u64 = 16 << 20;
/// One tebibyte.
pub const TIB: u64 = 1 << 40;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// Length of an aes-xts-plain64 volume key with two AES-256 keys.
pub const KEY_LEN: usize = 64;
/// The LUKS2 token type cryptnbd writes.
pub const TOKEN_TYPE: &str = "cryptnbd-kms";
/// Default context key of the `[SID]@[DIRECTORY]` pair.
pub const SID_DIRECTORY_KEY: &str = "cryptnbd:sid-directoryid";
/// Default context key of the volume id pair.
pub const VOLUME_ID_KEY: &str = "cryptnbd:volume-id";

// ---------------------------------------------------------------------------------------------
// Locating the workspace, the built binaries and the peer tools
// ---------------------------------------------------------------------------------------------

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root when relative)
/// or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The built `cryptnbdctl` (debug profile). Fails the test when it has not been built, and
/// warns (once) when a source file of the crates it is made of is newer than the binary.
pub fn cryptnbdctl() -> PathBuf {
    static CHECKED: OnceLock<PathBuf> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let bin = target_dir().join("debug").join("cryptnbdctl");
            let built = fs::metadata(&bin).and_then(|m| m.modified());
            let Ok(built) = built else {
                panic!(
                    "{} is missing: the end-to-end tests run the real binaries, build them first \
                     with `cargo build --workspace --bins` (scripts/test-all.sh does both)",
                    bin.display()
                );
            };
            let root = workspace_root();
            let newest = ["ctl", "volume", "kms-client"]
                .iter()
                .filter_map(|c| newest_mtime(&root.join(c).join("src")))
                .max();
            if newest.is_some_and(|n| n > built) {
                eprintln!(
                    "warning: {} is older than its sources: run `cargo build --workspace --bins` \
                     so the tests exercise the current code",
                    bin.display()
                );
            }
            bin
        })
        .clone()
}

/// The newest modification time of any file under `dir`.
pub(crate) fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// Finds `name` on `PATH`, then in `/usr/sbin` and `/sbin` (where Debian puts cryptsetup,
/// which a non-root `PATH` may lack).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The path of a peer tool the test cannot run without. A missing tool fails the test with
/// the name of the Debian package to install: the test never passes silently.
pub fn require_tool(name: &str, debian_package: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "this test needs `{name}`, which is not installed: install the Debian package \
             {debian_package} (`apt-get install -y {debian_package}`; scripts/test-all.sh does it)"
        )
    })
}

/// The real `cryptsetup` (Debian package `cryptsetup-bin`).
pub fn cryptsetup() -> PathBuf {
    require_tool("cryptsetup", "cryptsetup-bin")
}

/// A Python interpreter that can import `cryptography`: `CRYPTNBD_TEST_PYTHON` when set (it
/// must work), else `<workspace>/.venv/bin/python`, else `python3` on `PATH`. Fails the test
/// when none works.
pub fn python() -> PathBuf {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let has_cryptography = |py: &Path| {
            Command::new(py)
                .args([
                    "-c",
                    "from cryptography.hazmat.primitives.ciphers import modes; modes.XTS",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let how = "make one with `/usr/bin/python3 -m venv .venv && .venv/bin/pip install \
                   cryptography` in the workspace (Debian package python3-venv), or install \
                   the Debian package python3-cryptography, or run scripts/test-all.sh";
        if let Some(py) = std::env::var_os("CRYPTNBD_TEST_PYTHON").filter(|v| !v.is_empty()) {
            let py = PathBuf::from(py);
            return if has_cryptography(&py) {
                Ok(py)
            } else {
                Err(format!(
                    "CRYPTNBD_TEST_PYTHON={} cannot import the Python package `cryptography` \
                     (the AES-XTS oracle needs it): {how}",
                    py.display()
                ))
            };
        }
        let venv = workspace_root().join(".venv/bin/python");
        [Some(venv), find_tool("python3")]
            .into_iter()
            .flatten()
            .find(|p| has_cryptography(p))
            .ok_or_else(|| {
                format!(
                    "no Python with the package `cryptography` found (the AES-XTS oracle needs \
                     it; looked at CRYPTNBD_TEST_PYTHON, .venv/bin/python, python3): {how}"
                )
            })
    });
    match found {
        Ok(p) => p.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// What a finished command did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The command line, for messages (never holds key bytes: keys go by file).
    pub command: String,
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Everything written on stdout.
    pub stdout: Vec<u8>,
    /// Everything written on stderr, lossily decoded.
    pub stderr: String,
}

impl Outcome {
    /// Stdout, lossily decoded.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts the exit code, showing the command and its output otherwise.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "`{}` exited with {:?}, expected {code}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.command,
            self.code,
            self.stdout_text(),
            self.stderr
        );
        self
    }

    /// Asserts exit code 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }

    /// Asserts that stderr contains `needle`.
    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr of `{}` lacks {needle:?}:\n{}",
            self.command,
            self.stderr
        );
        self
    }

    /// Parses stdout as one JSON document (fails the test otherwise).
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout of `{}` is not JSON ({e}):\n{}",
                self.command,
                self.stdout_text()
            )
        })
    }
}

/// `outer` (a wrapper: `env …`, `unshare … sh -c …`) followed by `inner`'s program and
/// arguments, with `inner`'s environment changes: `inner` run through the wrapper.
pub fn wrapped(mut outer: Command, inner: &Command) -> Command {
    outer.arg(inner.get_program()).args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(v) => outer.env(key, v),
            None => outer.env_remove(key),
        };
    }
    outer
}

/// Runs a command to completion, capturing stdout, stderr and the exit code. Fails the test
/// only when the program cannot be started.
#[track_caller]
pub fn run(cmd: &mut Command) -> Outcome {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    Outcome {
        command,
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The state letter of every thread of process `pid` (`/proc/PID/task/*/stat`), by thread id.
pub fn thread_states(pid: u32) -> Vec<(u32, char)> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut states: Vec<(u32, char)> = tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(t.path().join("stat")).ok()?;
            // The state follows the command name, which is in parentheses and may hold any.
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some((tid, state))
        })
        .collect();
    states.sort_unstable();
    states
}

/// A size field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`, `VmLck:`...) in KiB; 0 when absent.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// How many descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Stops process `pid` with SIGSTOP and returns once every one of its threads has stopped:
/// `kill` returns when the signal is queued, and a thread busy in the kernel (a disk write)
/// carries on until it is done. Fails the test, with the thread states, after 10 s.
#[track_caller]
pub fn freeze(pid: u32) {
    signal(pid, libc::SIGSTOP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let states = thread_states(pid);
        if !states.is_empty() && states.iter().all(|&(_, s)| s == 'T' || s == 't') {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} did not stop within 10 s of SIGSTOP; its threads: {states:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Lets a process stopped by [`freeze`] run again.
#[track_caller]
pub fn thaw(pid: u32) {
    signal(pid, libc::SIGCONT);
}

#[track_caller]
#[allow(unsafe_code)]
fn signal(pid: u32, sig: libc::c_int) {
    let target = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes two integers and touches no memory of this process.
    let r = unsafe { libc::kill(target, sig) };
    assert_eq!(
        r,
        0,
        "cannot signal process {pid}: {}",
        std::io::Error::last_os_error()
    );
}

// ---------------------------------------------------------------------------------------------
// Temporary directories, files and keys
// ---------------------------------------------------------------------------------------------

/// A test's private temporary directory (0700), removed when dropped. It holds the state
/// directory (keystore and volumes), key files and images.
#[derive(Debug)]
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    /// A fresh directory named after `label`.
    #[track_caller]
    pub fn new(label: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cryptnbd-e2e-{label}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", dir.path().display()));
        Self { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `--state-dir` given to `cryptnbdctl`.
    pub fn state_dir(&self) -> PathBuf {
        self.join("state")
    }

    /// Where `cryptnbdctl create NAME` puts `NAME.luks`.
    pub fn volumes_dir(&self) -> PathBuf {
        self.state_dir().join("volumes")
    }

    /// Writes secret bytes (a key, a passphrase) to a new 0600 file and returns its path.
    #[track_caller]
    pub fn write_secret(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

/// Reads a secret file back into a zeroized buffer.
#[track_caller]
pub fn read_secret(path: &Path) -> Zeroizing<Vec<u8>> {
    let mut buf = Zeroizing::new(Vec::new());
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    buf
}

/// 64 bytes from the kernel's random number generator, for keys the test makes itself.
#[track_caller]
pub fn random_key() -> Zeroizing<Vec<u8>> {
    let mut key = Zeroizing::new(vec![0u8; KEY_LEN]);
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .unwrap_or_else(|e| panic!("cannot read /dev/urandom: {e}"));
    key
}

/// A copy of `key` with one byte changed: a wrong key that differs as little as possible.
pub fn flip_one_byte(key: &[u8], at: usize) -> Zeroizing<Vec<u8>> {
    let mut wrong = Zeroizing::new(key.to_vec());
    let i = at % wrong.len().max(1);
    if let Some(b) = wrong.get_mut(i) {
        *b ^= 0x01;
    }
    wrong
}

/// Creates (or truncates) `path` as a sparse file of `len` bytes.
#[track_caller]
pub fn sparse_file(path: &Path, len: u64) {
    File::create(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("cannot make the sparse file {}: {e}", path.display()));
}

/// Bytes of disk actually allocated to a file (to check that big volumes stay sparse).
#[track_caller]
pub fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
}

/// Overwrites `bytes` at `offset` of an existing file (to damage a header on purpose).
#[track_caller]
pub fn patch_file(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(bytes, offset).and_then(|()| f.sync_all()))
        .unwrap_or_else(|e| panic!("cannot patch {}: {e}", path.display()));
}

/// Names of the entries of a directory, sorted (to check nothing was left behind).
#[track_caller]
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        })
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------------
// The CLI
// ---------------------------------------------------------------------------------------------

/// `cryptnbdctl` bound to one state directory, with the caller's cryptnbd environment
/// variables removed so the host's configuration cannot leak into a test.
#[derive(Debug, Clone)]
pub struct Ctl {
    /// The binary.
    pub bin: PathBuf,
    /// The `--state-dir` of every call.
    pub state_dir: PathBuf,
    /// The `--socket` of every call (a daemon under test), if any.
    pub socket: Option<PathBuf>,
}

impl Ctl {
    /// The CLI over `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            bin: cryptnbdctl(),
            state_dir: state_dir.to_path_buf(),
            socket: None,
        }
    }

    /// A command `cryptnbdctl --state-dir DIR ARGS...`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--state-dir").arg(&self.state_dir);
        // Without a daemon under test, point at a socket that does not exist, so a daemon of
        // the host is never used by accident.
        cmd.arg("--socket").arg(
            self.socket
                .clone()
                .unwrap_or_else(|| self.state_dir.join("no-daemon.sock")),
        );
        cmd.args(args);
        for var in [
            "CRYPTNBD_STATE_DIR",
            "CRYPTNBD_SOCKET",
            "CRYPTNBD_KMS_PASSPHRASE",
            "CRYPTNBD_BACKUP_PASSPHRASE",
            "CRYPTNBD_LOG",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Runs `cryptnbdctl ARGS...`.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Outcome {
        run(&mut self.command(args))
    }

    /// `kms create-key --alias alias/NAME`; returns the new key's id.
    #[track_caller]
    pub fn create_key(&self, alias_name: &str) -> String {
        let alias = format!("alias/{alias_name}");
        let out = self.run(&["--json", "kms", "create-key", "--alias", &alias]);
        out.assert_success();
        let meta = out.json();
        assert_eq!(meta["aliases"], serde_json::json!([alias]), "{meta}");
        assert_eq!(meta["state"], "Enabled", "{meta}");
        meta["key_id"]
            .as_str()
            .unwrap_or_else(|| panic!("kms create-key --json has no key_id: {meta}"))
            .to_owned()
    }

    /// `create NAME --size SIZE --kms-key KEY --sid TEST_SID --directory TEST_DIRECTORY
    /// --sector-size N --json EXTRA...`; asserts success and returns the JSON it printed.
    #[track_caller]
    pub fn create_volume(
        &self,
        name: &str,
        size: &str,
        kms_key: &str,
        sector_size: u32,
        extra: &[&str],
    ) -> Value {
        let ss = sector_size.to_string();
        let mut args = vec![
            "--json",
            "create",
            name,
            "--size",
            size,
            "--kms-key",
            kms_key,
            "--sid",
            TEST_SID,
            "--directory",
            TEST_DIRECTORY,
            "--sector-size",
            &ss,
        ];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        out.assert_success();
        out.json()
    }

    /// `inspect --json VOLUME`; asserts success and returns the JSON.
    #[track_caller]
    pub fn inspect_json(&self, volume: &Path) -> Value {
        let v = volume.to_string_lossy();
        let out = self.run(&["--json", "inspect", &v]);
        out.assert_success();
        out.json()
    }

    /// The keystore `cryptnbdctl` uses, opened in this process through the real local KMS.
    #[track_caller]
    pub fn local_kms(&self) -> LocalKms {
        let dir = self.state_dir.join("keystore");
        LocalKms::open(&dir, LocalKmsOptions::default())
            .unwrap_or_else(|e| panic!("cannot open the keystore {}: {e}", dir.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// Reading headers independently, and unwrapping the volume key
// ---------------------------------------------------------------------------------------------

/// The JSON metadata of the primary LUKS2 header copy, read with a few lines of code that
/// share nothing with the `volume` crate: magic, big-endian `hdr_size` at byte 8, JSON from
/// byte 4096 up to the first NUL.
#[track_caller]
pub fn read_primary_metadata(path: &Path) -> Value {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut bin = [0u8; 4096];
    f.read_exact(&mut bin)
        .unwrap_or_else(|e| panic!("cannot read the header of {}: {e}", path.display()));
    assert_eq!(
        &bin[..6],
        b"LUKS\xba\xbe",
        "{} has no LUKS magic",
        path.display()
    );
    assert_eq!(&bin[6..8], &[0, 2], "{} is not LUKS2", path.display());
    let mut size = [0u8; 8];
    size.copy_from_slice(&bin[8..16]);
    let hdr_size = u64::from_be_bytes(size);
    assert!(
        (16384..=4 << 20).contains(&hdr_size),
        "{}: hdr_size {hdr_size}",
        path.display()
    );
    let mut json = vec![0u8; (hdr_size - 4096) as usize];
    f.read_exact(&mut json)
        .unwrap_or_else(|e| panic!("cannot read the JSON area of {}: {e}", path.display()));
    let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
    serde_json::from_slice(&json[..end])
        .unwrap_or_else(|e| panic!("the JSON area of {} does not parse: {e}", path.display()))
}

/// Sets one pair of the volume's token context in place (both header copies), leaving the
/// wrapped key as it is: the context then no longer matches the one the key was wrapped
/// under, unless the pair is put back.
#[track_caller]
pub fn set_context_pair(volume: &Path, key: &str, value: &str) {
    let file = volume::lifecycle::open_locked(volume, false).expect("open the volume");
    volume::lifecycle::rewrite_token(&file, |t| {
        let mut pairs = t.context.pairs().clone();
        pairs.insert(key.into(), value.into());
        t.context = EncryptionContext::new(pairs).expect("context");
    })
    .expect("rewrite the token");
}

/// The `cryptnbd-kms` token object of LUKS2 metadata (fails the test when there is none).
#[track_caller]
pub fn kms_token(metadata: &Value) -> Map<String, Value> {
    metadata["tokens"]
        .as_object()
        .and_then(|tokens| {
            tokens
                .values()
                .find(|t| t["type"] == TOKEN_TYPE)
                .and_then(Value::as_object)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no {TOKEN_TYPE} token in {}", metadata["tokens"]))
}

/// Unwraps a volume's key through the real local KMS exactly as the token says: `Decrypt(
/// wrapped_key, context, key_id)`. The token is read by [`read_primary_metadata`], not by
/// the `volume` crate.
pub async fn unwrap_volume_key(kms: &LocalKms, volume: &Path) -> Zeroizing<Vec<u8>> {
    let token = kms_token(&read_primary_metadata(volume));
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(token["wrapped_key"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("wrapped_key of {} is not base64: {e}", volume.display()));
    let pairs: BTreeMap<String, String> = token["context"]
        .as_object()
        .unwrap_or_else(|| panic!("the token of {} has no context", volume.display()))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let context = EncryptionContext::new(pairs)
        .unwrap_or_else(|e| panic!("the token's context is invalid: {e}"));
    let key_id = token["key_id"].as_str().unwrap_or_default();
    let key = kms
        .decrypt(&wrapped, &context, key_id)
        .await
        .unwrap_or_else(|e| panic!("the local KMS refused to unwrap the key: {e}"));
    assert_eq!(key.len(), KEY_LEN, "the volume key has the wrong length");
    Zeroizing::new(key.expose().to_vec())
}

/// `cryptsetup luksAddKey --key-size 512 --volume-key-file VOLUME_KEY VOLUME PASSPHRASE`
/// (a fast pbkdf2 keyslot, batch mode): exit 0 when the key in `volume_key` matches the
/// header's digest and the passphrase in `passphrase` is added, 2 when the key does not match.
pub fn cryptsetup_add_key(volume: &Path, volume_key: &Path, passphrase: &Path) -> Outcome {
    run(Command::new(cryptsetup())
        .args(["luksAddKey", "--key-size", "512", "--volume-key-file"])
        .arg(volume_key)
        .args([
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--batch-mode",
        ])
        .arg(volume)
        .arg(passphrase))
}

/// `cryptsetup open --test-passphrase --key-file PASSPHRASE VOLUME`: exit 0 when a keyslot
/// opens with the passphrase, 2 when none does.
pub fn cryptsetup_test_passphrase(passphrase: &Path, volume: &Path) -> Outcome {
    run(Command::new(cryptsetup())
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(passphrase)
        .arg(volume))
}

/// The volume key as cryptsetup itself reports it: `luksDump --dump-volume-key`, unlocked by
/// the keyslot `passphrase` opens, written to `out` and read back.
#[track_caller]
pub fn cryptsetup_dump_volume_key(
    volume: &Path,
    passphrase: &Path,
    out: &Path,
) -> Zeroizing<Vec<u8>> {
    run(Command::new(cryptsetup())
        .args(["luksDump", "--dump-volume-key", "--volume-key-file"])
        .arg(out)
        .args(["--batch-mode", "--key-file"])
        .arg(passphrase)
        .arg(volume))
    .assert_success();
    read_secret(out)
}

/// `cryptsetup luksDump --dump-json-metadata FILE`, parsed.
#[track_caller]
pub fn luks_dump_json(volume: &Path) -> Value {
    let out = run(Command::new(cryptsetup())
        .args(["luksDump", "--dump-json-metadata"])
        .arg(volume));
    out.assert_success();
    out.json()
}

// ---------------------------------------------------------------------------------------------
// The AES-XTS oracle
// ---------------------------------------------------------------------------------------------

/// Where a volume's data is and how it is encrypted: what the oracle needs besides the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset of the data segment in the file.
    pub data_offset: u64,
    /// Encryption sector size (512 or 4096).
    pub sector_size: u32,
    /// The segment's `iv_tweak`, added to every IV.
    pub iv_tweak: u64,
}

/// The independent AES-XTS decryptor `tests/oracle/xts_oracle.py` (Python `cryptography`).
#[derive(Debug, Clone)]
pub struct Oracle {
    python: PathBuf,
    script: PathBuf,
}

impl Oracle {
    /// Finds a Python with `cryptography` (fails the test when there is none).
    pub fn new() -> Self {
        Self {
            python: python(),
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("oracle/xts_oracle.py"),
        }
    }

    /// Decrypts byte ranges `(offset, length)` of the data segment of `volume` with the key in
    /// `key_file` (64 raw bytes or 128 hex digits); returns each range's plaintext.
    #[track_caller]
    pub fn decrypt(
        &self,
        key_file: &Path,
        volume: &Path,
        segment: &Segment,
        ranges: &[(u64, u64)],
    ) -> Vec<Vec<u8>> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script)
            .arg("--key")
            .arg(key_file)
            .arg("--volume")
            .arg(volume)
            .arg("--data-offset")
            .arg(segment.data_offset.to_string())
            .arg("--sector-size")
            .arg(segment.sector_size.to_string())
            .arg("--iv-tweak")
            .arg(segment.iv_tweak.to_string());
        for (off, len) in ranges {
            cmd.arg("--range").arg(format!("{off}:{len}"));
        }
        let out = run(&mut cmd);
        out.assert_success();
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(
            out.stdout.len() as u64,
            total,
            "the oracle returned {} bytes for ranges totalling {total}",
            out.stdout.len()
        );
        let mut at = 0usize;
        ranges
            .iter()
            .map(|&(_, len)| {
                let chunk = out.stdout[at..at + len as usize].to_vec();
                at += len as usize;
                chunk
            })
            .collect()
    }
}

impl Default for Oracle {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Test data: a reproducible generator, a reference model, byte comparisons
// ---------------------------------------------------------------------------------------------

/// A small reproducible generator (splitmix64) for test data. Not for keys.
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `len` bytes of data. Never all zero in practice, so a sector left unencrypted or
    /// unwritten cannot pass for it.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// The plaintext a volume should hold: every write applied in order over zeros.
#[derive(Debug, Default, Clone)]
pub struct Model {
    writes: Vec<(u64, Vec<u8>)>,
}

impl Model {
    /// An empty (all-zero) model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }

    /// Records a write of `len` zero bytes at `offset`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) {
        self.writes.push((offset, vec![0; len as usize]));
    }

    /// What bytes `offset..offset+len` should read as.
    pub fn expected(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let end = offset + len;
        for (w_off, data) in &self.writes {
            let w_end = w_off + data.len() as u64;
            let from = offset.max(*w_off);
            let to = end.min(w_end);
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - w_off) as usize..(to - w_off) as usize]);
            }
        }
        out
    }

    /// The written ranges, each widened to whole sectors of `sector_size`: every byte of
    /// them was encrypted by the volume (a partial-sector write rewrites its whole sector),
    /// so an oracle that decrypts every sector must find exactly [`Model::expected`] there.
    pub fn sector_hulls(&self, sector_size: u32) -> Vec<(u64, u64)> {
        let ss = u64::from(sector_size);
        self.writes
            .iter()
            .map(|(off, data)| {
                let start = off - off % ss;
                let end = (off + data.len() as u64).div_ceil(ss) * ss;
                (start, end - start)
            })
            .collect()
    }
}

/// Asserts two byte strings are equal; on failure reports the first difference by offset
/// (never the bytes, which may be large).
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    let differing = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
    panic!(
        "{what}: {} bytes, expected {}; first difference at byte {first}, {differing} bytes differ",
        actual.len(),
        expected.len()
    );
}

/// Looks for a line of `text` that contains every one of `parts` (for `luksDump` output).
pub fn has_line_with(text: &str, parts: &[&str]) -> bool {
    text.lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

// ---------------------------------------------------------------------------------------------
// A write plan for big sparse volumes, and its checks
// ---------------------------------------------------------------------------------------------

/// Writes a fixed mix of requests through `vol` and returns the model of what it should now
/// hold. The volume must be larger than 2 TiB + 2 GiB (so that IVs pass 2^32) and never
/// written before; the plan writes about 100 KiB in total, so a sparse file stays sparse.
///
/// The mix: aligned and unaligned writes, sub-sector writes (two into one sector), explicit
/// zero buffers (aligned and not), `write_zeroes` over written data and over never-written
/// sectors, a write across the 2 TiB boundary (IV 2^32 - 1 to 2^32), writes far beyond it and
/// one that ends at the last byte of the volume. Ends with a flush.
#[track_caller]
pub fn exercise_volume(vol: &volume::Volume, seed: u64) -> Model {
    let ss = u64::from(vol.sector_size());
    let size = vol.size();
    assert!(
        size > 2 * TIB + 2 * GIB,
        "the write plan needs a volume larger than 2 TiB + 2 GiB, not {size} bytes"
    );
    let mut rng = TestRng::new(seed);
    let mut model = Model::new();
    let mib = 1u64 << 20;
    let write = |model: &mut Model, off: u64, data: Vec<u8>| {
        vol.write_at(&data, off)
            .unwrap_or_else(|e| panic!("write_at({off}, {} bytes) failed: {e}", data.len()));
        model.write(off, &data);
    };
    // Aligned, several sectors.
    write(&mut model, 0, rng.bytes(16 * 1024));
    // Unaligned at both ends, across sectors.
    write(&mut model, mib + 100, rng.bytes(2 * ss as usize + 77));
    // Sub-sector: two separate writes into one sector (read-modify-write keeps both).
    write(&mut model, 2 * mib + 5, rng.bytes(7));
    write(&mut model, 2 * mib + 300, rng.bytes(30));
    // Explicit zeros, aligned and unaligned: they must be encrypted, not left as holes.
    write(&mut model, 3 * mib, vec![0; 3 * ss as usize]);
    write(&mut model, 3 * mib + 64 * 1024 + 333, vec![0; 1000]);
    // write_zeroes over data, unaligned.
    write(&mut model, 4 * mib, rng.bytes(4 * ss as usize));
    let (zoff, zlen) = (4 * mib + ss / 2 + 1, 2 * ss);
    vol.write_zeroes(zoff, zlen)
        .unwrap_or_else(|e| panic!("write_zeroes({zoff}, {zlen}) failed: {e}"));
    model.write_zeroes(zoff, zlen);
    // write_zeroes over never-written sectors: aligned, and inside one sector.
    for (off, len) in [(5 * mib, 3 * ss), (6 * mib + 17, 100)] {
        vol.write_zeroes(off, len)
            .unwrap_or_else(|e| panic!("write_zeroes({off}, {len}) failed: {e}"));
        model.write_zeroes(off, len);
    }
    // Across 2 TiB: the 512-byte IV goes from 2^32 - 1 to 2^32 inside this write.
    write(
        &mut model,
        2 * TIB - ss - 3,
        rng.bytes(2 * ss as usize + 10),
    );
    // Beyond 2 TiB: unaligned data, zeros and write_zeroes.
    write(&mut model, 2 * TIB + GIB / 2 + 12_345, rng.bytes(5000));
    write(&mut model, 2 * TIB + GIB + 7 * ss, vec![0; ss as usize]);
    let (zoff, zlen) = (2 * TIB + GIB + 64 * ss + 3, 2 * ss + 1);
    vol.write_zeroes(zoff, zlen)
        .unwrap_or_else(|e| panic!("write_zeroes({zoff}, {zlen}) failed: {e}"));
    model.write_zeroes(zoff, zlen);
    // The very end of the volume.
    write(
        &mut model,
        size - 2 * ss - 9,
        rng.bytes(2 * ss as usize + 9),
    );
    vol.flush().unwrap_or_else(|e| panic!("flush failed: {e}"));
    model
}

/// Reads every written range (exactly, and widened to whole sectors) back through `vol` and
/// compares with the model.
#[track_caller]
pub fn check_reads(vol: &volume::Volume, model: &Model) {
    let ss = vol.sector_size();
    let exact = model.writes.iter().map(|(o, d)| (*o, d.len() as u64));
    for (off, len) in exact.chain(model.sector_hulls(ss)) {
        let mut buf = vec![0xa5u8; len as usize];
        vol.read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("read_at({off}, {len}) failed: {e}"));
        assert_bytes_eq(
            &buf,
            &model.expected(off, len),
            &format!("read_at({off}, {len}) through cryptnbd"),
        );
    }
}

/// Decrypts every written range, widened to whole sectors, with the oracle and compares with
/// the model: the bytes cryptnbd wrote are exactly what dm-crypt would read.
#[track_caller]
pub fn check_with_oracle(
    oracle: &Oracle,
    key_file: &Path,
    volume: &Path,
    segment: &Segment,
    model: &Model,
) {
    let ranges = model.sector_hulls(segment.sector_size);
    let plain = oracle.decrypt(key_file, volume, segment, &ranges);
    for ((off, len), got) in ranges.iter().zip(&plain) {
        assert_bytes_eq(
            got,
            &model.expected(*off, *len),
            &format!(
                "the oracle's decryption of data bytes {off}..{} ({}-byte sectors, first IV {})",
                off + len,
                segment.sector_size,
                off / 512 + segment.iv_tweak
            ),
        );
    }
}

/// Asserts that the ciphertext of every sector in `off..off+len` of the data segment is not
/// all zeros (zeros written by a client must be encrypted, never left as holes).
#[track_caller]
pub fn assert_sectors_encrypted(volume: &Path, segment: &Segment, off: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let ss = u64::from(segment.sector_size);
    let start = off - off % ss;
    let end = (off + len).div_ceil(ss) * ss;
    let mut buf = vec![0u8; (end - start) as usize];
    File::open(volume)
        .and_then(|f| f.read_exact_at(&mut buf, segment.data_offset + start))
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", volume.display()));
    for (i, sector) in buf.chunks(ss as usize).enumerate() {
        assert!(
            sector.iter().any(|&b| b != 0),
            "the sector at data offset {} is all-zero ciphertext: written zeros were left as a hole",
            start + i as u64 * ss
        );
    }
}

pub mod ceph;
pub mod cpio;
pub mod cryptroot;
pub mod daemon;
pub mod loopdev;
pub mod mount;
pub mod pki;
pub mod vm;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "install the Debian package e2e-no-such-package")]
    fn a_missing_tool_fails_the_test_with_its_package() {
        require_tool("cryptnbd-e2e-no-such-tool", "e2e-no-such-package");
    }

    #[test]
    fn model_applies_writes_in_order_over_zeros() {
        let mut m = Model::new();
        m.write(10, &[1, 2, 3, 4]);
        m.write_zeroes(11, 2);
        m.write(13, &[9]);
        assert_eq!(m.expected(8, 8), vec![0, 0, 1, 0, 0, 9, 0, 0]);
        assert_eq!(m.expected(100, 3), vec![0, 0, 0]);
    }

    #[test]
    fn sector_hulls_cover_whole_sectors() {
        let mut m = Model::new();
        m.write(4095, &[1, 2]);
        m.write(8192, &[0; 4096]);
        m.write(5, &[7]);
        assert_eq!(
            m.sector_hulls(4096),
            vec![(0, 8192), (8192, 4096), (0, 4096)]
        );
        assert_eq!(
            m.sector_hulls(512),
            vec![(3584, 1024), (8192, 4096), (0, 512)]
        );
    }

    #[test]
    fn a_flipped_key_differs_in_one_byte() {
        let key = vec![0x11u8; KEY_LEN];
        let wrong = flip_one_byte(&key, 70);
        assert_eq!(wrong.len(), KEY_LEN);
        assert_eq!(
            key.iter().zip(wrong.iter()).filter(|(a, b)| a != b).count(),
            1
        );
    }

    #[test]
    fn test_rng_is_reproducible() {
        assert_eq!(TestRng::new(5).bytes(33), TestRng::new(5).bytes(33));
        assert_ne!(TestRng::new(5).bytes(33), TestRng::new(6).bytes(33));
    }
}
