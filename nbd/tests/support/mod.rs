//! Test support: an in-memory block device, a registry, a server harness on a temp socket,
//! checks for the external NBD clients, and a raw protocol client for hostile tests.

#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

pub mod memdev;
pub mod raw;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd::{BlockDevice, Export, ExportRegistry, Limits, Peer, Server};

pub use memdev::MemDevice;

/// Exports by name; `remove` is what the daemon does before `disconnect_export`.
#[derive(Default)]
pub struct MemRegistry {
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    default: Mutex<Option<String>>,
}

impl MemRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn add(&self, name: &str, description: &str, device: Arc<dyn BlockDevice>) {
        self.exports.lock().unwrap().insert(
            name.to_owned(),
            Arc::new(Export {
                name: name.to_owned(),
                description: description.to_owned(),
                device,
                tls_only: false,
                observer: None,
            }),
        );
    }

    pub fn remove(&self, name: &str) {
        self.exports.lock().unwrap().remove(name);
    }

    pub fn set_default(&self, name: &str) {
        *self.default.lock().unwrap() = Some(name.to_owned());
    }
}

impl ExportRegistry for MemRegistry {
    fn lookup(&self, name: &str, _peer: &Peer) -> Option<Arc<Export>> {
        self.exports.lock().unwrap().get(name).cloned()
    }
    fn list(&self, _peer: &Peer) -> Vec<(String, String)> {
        self.exports
            .lock()
            .unwrap()
            .values()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
    fn default_export(&self) -> Option<String> {
        self.default.lock().unwrap().clone()
    }
}

/// Logs to the test's output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The server on its own runtime, listening on a unix socket in a temp directory (and on
/// 127.0.0.1:0 if asked). Ready as soon as `start` returns: the listeners are bound, so
/// clients queue in the backlog until the accept loop runs. Dropping it shuts down and drains.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: Arc<Server>,
    pub registry: Arc<MemRegistry>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub fn start(registry: Arc<MemRegistry>, limits: Limits) -> Self {
        Self::start_with(registry, limits, false)
    }

    pub fn start_with(registry: Arc<MemRegistry>, limits: Limits, tcp: bool) -> Self {
        init_tracing();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = Server::new(registry.clone(), limits);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        let std_listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let mut tcp_addr = None;
        {
            let _guard = rt.enter();
            let listener = tokio::net::UnixListener::from_std(std_listener).unwrap();
            let s = server.clone();
            let mut rx1 = rx.clone();
            tasks.push(rt.spawn(async move {
                s.serve_unix(listener, async move {
                    let _ = rx1.wait_for(|v| *v).await;
                })
                .await
            }));
            if tcp {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.set_nonblocking(true).unwrap();
                tcp_addr = Some(l.local_addr().unwrap());
                let listener = tokio::net::TcpListener::from_std(l).unwrap();
                let s = server.clone();
                let mut rx2 = rx.clone();
                tasks.push(rt.spawn(async move {
                    s.serve_tcp(listener, async move {
                        let _ = rx2.wait_for(|v| *v).await;
                    })
                    .await
                }));
            }
        }
        Self {
            rt,
            server,
            registry,
            dir,
            socket,
            tcp: tcp_addr,
            shutdown: Some(tx),
            tasks,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp.unwrap())
    }

    /// Stops accepting and drains every connection, within a deadline.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
            let tasks = std::mem::take(&mut self.tasks);
            let server = self.server.clone();
            self.rt.block_on(async move {
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
                tokio::time::timeout(Duration::from_secs(20), server.drain_all())
                    .await
                    .expect("drain_all finished");
            });
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop();
        }
    }
}

/// The path of an external tool, or a failure naming the Debian package to install.
pub fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed: run `apt-get install -y {package}` (Debian package `{package}`)"
    );
}

/// nbdsh needs Debian's python3 with the libnbd binding (python3-libnbd).
pub fn nbdsh() -> PathBuf {
    let p = tool("nbdsh", "python3-libnbd");
    let py = tool("python3", "python3");
    let ok = Command::new(py)
        .args(["-c", "import nbd"])
        .current_dir("/")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "/usr/bin/python3 cannot import nbd: run `apt-get install -y python3-libnbd`"
    );
    p
}

/// A command with /usr/bin first in PATH (the first python3 on PATH may not see
/// python3-libnbd) and a neutral working directory.
pub fn command(program: &Path) -> Command {
    let mut c = Command::new(program);
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/bin:{path}"));
    c.current_dir("/");
    c
}

/// Runs and requires success; the panic carries stdout and stderr.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a Python `script` in nbdsh with the NBD URI `uri` in its environment as `DISK`, and
/// checks that it printed `passed` (its last line, once every assertion held).
pub fn nbdsh_script(uri: &str, script: &str, passed: &str) {
    let out = run(command(&nbdsh()).arg("-c").arg(script).env("DISK", uri));
    assert!(
        stdout(&out).contains(passed),
        "nbdsh did not print {passed:?}:\n{}",
        stdout(&out)
    );
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), enough to catch misplaced data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}

/// Peak resident set size of this process, in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

fn proc_status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
