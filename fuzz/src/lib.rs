//! What the fuzz targets share: the NBD session targets' memory export and their server on a
//! unix socket, one per TLS mode, started once per fuzzing process.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nbd::device::{BlockSizes, DeviceError, Extent};
use nbd::server::{TlsMode, TlsSettings};
use nbd::{BlockDevice, Export, ExportRegistry, Limits, Peer, Server};

const SIZE: u64 = 1 << 20;

struct Memory(Mutex<Vec<u8>>);

impl Memory {
    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }
}

impl BlockDevice for Memory {
    fn size(&self) -> u64 {
        SIZE
    }
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 1 << 20,
        }
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let m = self.0.lock().unwrap();
        buf.copy_from_slice(&m[Self::range(offset, buf.len() as u64)]);
        Ok(())
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, DeviceError> {
        // Half the reads on the spot, half on the I/O threads.
        if offset.is_multiple_of(8192) {
            self.read(offset, buf)?;
            return Ok(true);
        }
        Ok(false)
    }
    fn write(&self, offset: u64, data: &mut [u8], _fua: bool) -> Result<(), DeviceError> {
        self.0.lock().unwrap()[Self::range(offset, data.len() as u64)].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64, _fua: bool) -> Result<(), DeviceError> {
        self.0.lock().unwrap()[Self::range(offset, length)].fill(0);
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        _t: bool,
        _fua: bool,
    ) -> Result<(), DeviceError> {
        self.trim(offset, length, false)
    }
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, DeviceError> {
        Ok(vec![Extent {
            length,
            flags: if offset.is_multiple_of(65536) { 3 } else { 0 },
        }])
    }
}

/// "disk", also the default export, and "secret", served only over TLS.
struct Registry(Vec<Arc<Export>>);

impl ExportRegistry for Registry {
    fn lookup(&self, name: &str, _peer: &Peer) -> Option<Arc<Export>> {
        self.0.iter().find(|e| e.name == name).cloned()
    }
    fn list(&self, _peer: &Peer) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
    fn default_export(&self) -> Option<String> {
        Some("disk".into())
    }
}

/// Which server a session talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No TLS configured at all (the `nbd_session` target).
    Plain,
    /// A certificate, and the unix listener in this TLS mode.
    Tls(TlsMode),
}

/// A throwaway self-signed certificate for the TLS servers (fuzz/tls/, made with openssl).
fn tls_config() -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = CertificateDer::from_pem_slice(include_bytes!("../tls/server-cert.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_slice(include_bytes!("../tls/server-key.pem")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    Arc::new(config)
}

fn start(mode: Mode) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cryptnbd-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("nbd-{mode:?}.sock"));
    let _ = std::fs::remove_file(&path);
    let export = |name: &str, tls_only: bool| {
        Arc::new(Export {
            name: name.into(),
            description: "fuzz".into(),
            device: Arc::new(Memory(Mutex::new(vec![0; SIZE as usize]))),
            tls_only,
            observer: None,
        })
    };
    let registry = Registry(vec![export("disk", false), export("secret", true)]);
    let server = Server::new(Arc::new(registry), Limits::default());
    if let Mode::Tls(unix) = mode {
        server.set_tls(TlsSettings {
            config: Some(tls_config()),
            tcp: TlsMode::Off,
            unix,
        });
    }
    // One thread for the server's tasks: with two workers, perf showed a quarter of the
    // time in the kernel, switching between the fuzzer's thread and the workers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&path).unwrap()
    };
    std::thread::spawn(move || {
        rt.block_on(server.serve_unix(listener, std::future::pending()))
            .unwrap();
    });
    path
}

/// The socket of the server for `mode`, started on first use.
pub fn socket(mode: Mode) -> &'static PathBuf {
    static SOCKETS: OnceLock<Mutex<Vec<(Mode, &'static PathBuf)>>> = OnceLock::new();
    let sockets = SOCKETS.get_or_init(Mutex::default);
    let mut sockets = sockets.lock().unwrap();
    if let Some((_, p)) = sockets.iter().find(|(m, _)| *m == mode) {
        return p;
    }
    let path: &'static PathBuf = Box::leak(Box::new(start(mode)));
    sockets.push((mode, path));
    path
}

/// The client's runtime: one thread, the fuzzer's own, which sends and reads at once.
fn client() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// One session: `data` is everything the client sends after the server's greeting. The
/// server must answer what it read and then close; the connection is read to its end.
///
/// The replies are read while the requests are sent, as a client must: a client that reads
/// nothing until it has sent everything deadlocks with the server once the replies fill the
/// socket (the server stops reading when its budget is spent on replies the client does not
/// take). An `nbd_session` campaign hung that way after 4 million inputs, which is how the
/// server's reply timeout came about. Both directions run on the fuzzer's thread: a thread
/// per input for the sending cost a third of the executions a second.
pub fn session(mode: Mode, data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const QUIET: Duration = Duration::from_secs(10);
    let started = std::time::Instant::now();
    client().block_on(async {
        let s = tokio::net::UnixStream::connect(socket(mode))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the {mode:?} server: {e}"));
        let (mut rd, mut wr) = s.into_split();
        // The greeting: 18 bytes.
        let mut greeting = [0u8; 18];
        match tokio::time::timeout(QUIET, rd.read_exact(&mut greeting)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("no greeting from the {mode:?} server: {e}"),
            Err(_) => panic!("no greeting from the {mode:?} server within {QUIET:?}"),
        }
        let send = async {
            // The server may close before it has read everything: a failed write is fine.
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let receive = async {
            let mut sink = vec![0u8; 65536];
            let mut answered = 0usize;
            loop {
                let r = tokio::time::timeout(QUIET, rd.read(&mut sink)).await;
                let e = match r {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        answered += n;
                        continue;
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                    // No read here blocks in the kernel, so libFuzzer's SIGALRM (its timeout
                    // watch, every 601 s) cannot interrupt one: the runtime's epoll_wait
                    // restarts. A blocking read in an earlier harness took that EINTR for a
                    // failure and stopped a campaign after 2.2 million sessions.
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("nothing for {QUIET:?}"),
                };
                panic!(
                    "the {mode:?} server neither answered nor closed: {e} ({} bytes sent, \
                     {answered} read back, {:?} since the connection)",
                    data.len(),
                    started.elapsed()
                );
            }
        };
        tokio::join!(send, receive);
    });
}
