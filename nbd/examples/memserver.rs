//! Serves one in-memory export over NBD on a unix socket: for benchmarks and manual tests.
//!
//! ```text
//! cargo run --release -p nbd --example memserver -- SOCKET [SIZE_MIB]
//! ```
//! The export is named `mem` and is also the default export. Environment: `NBD_IO_THREADS`
//! (device threads), `NBD_WORKERS` (tokio worker threads, default 2), `RUST_LOG`.

#![allow(clippy::unwrap_used)] // a tool for tests: fail loudly

#[path = "../tests/support/memdev.rs"]
#[allow(dead_code)]
mod memdev;

use std::sync::Arc;

use nbd::{Export, ExportRegistry, Limits, Peer, Server};

struct One(Arc<Export>);

impl ExportRegistry for One {
    fn lookup(&self, name: &str, _: &Peer) -> Option<Arc<Export>> {
        (name == self.0.name).then(|| self.0.clone())
    }
    fn list(&self, _: &Peer) -> Vec<(String, String)> {
        vec![(self.0.name.clone(), self.0.description.clone())]
    }
    fn default_export(&self) -> Option<String> {
        Some(self.0.name.clone())
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let mut args = std::env::args().skip(1);
    let socket = args.next().expect("usage: memserver SOCKET [SIZE_MIB]");
    let mib: u64 = args
        .next()
        .map_or(1024, |v| v.parse().expect("size in MiB"));
    let device = Arc::new(memdev::MemDevice::new(mib << 20));
    let export = Arc::new(Export {
        name: "mem".into(),
        description: format!("{mib} MiB in memory"),
        device,
        tls_only: false,
        observer: None,
    });
    let mut limits = Limits::default();
    if let Some(n) = env_usize("NBD_IO_THREADS") {
        limits.io_threads = n;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_usize("NBD_WORKERS").unwrap_or(2))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = Server::new(Arc::new(One(export)), limits);
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        server.serve_unix(listener, stop).await.unwrap();
        server.drain_all().await;
    });
}
