//! A whole server session: the input is everything a client sends after the server's
//! greeting (flags, options, requests, payloads), over a real unix socket to the NBD server
//! with a 1 MiB memory export named "disk" (also the default export). The server must answer
//! or close, never panic; the connection is checked to end.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd::device::{BlockSizes, DeviceError, Extent};
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

struct Registry(Arc<Export>);

impl ExportRegistry for Registry {
    fn lookup(&self, name: &str, _peer: &Peer) -> Option<Arc<Export>> {
        (name == "disk").then(|| Arc::clone(&self.0))
    }
    fn list(&self, _peer: &Peer) -> Vec<(String, String)> {
        vec![(self.0.name.clone(), self.0.description.clone())]
    }
    fn default_export(&self) -> Option<String> {
        Some("disk".into())
    }
}

/// The server, started once per fuzzing process on its own runtime.
fn socket() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cryptnbd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&path);
        let export = Arc::new(Export {
            name: "disk".into(),
            description: "fuzz".into(),
            device: Arc::new(Memory(Mutex::new(vec![0; SIZE as usize]))),
            tls_only: false,
            observer: None,
        });
        let server = Server::new(Arc::new(Registry(export)), Limits::default());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
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
    })
}

fuzz_target!(|data: &[u8]| {
    let mut s = UnixStream::connect(socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The greeting: 18 bytes.
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    // The server may close before it has read everything: a failed write is fine.
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    // It must answer what it read and then close: read to the end.
    let mut sink = [0u8; 65536];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
    }
});
