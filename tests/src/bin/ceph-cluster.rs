//! A throwaway Ceph cluster for the benchmark (benches/nbd-peers.sh), the same fixture the
//! tests start (tests/src/ceph.rs): one monitor and one memstore OSD of `OSD_GIB` GiB
//! (default 8) on loopback. Prints `conf=PATH pool=NAME dir=DIR` once the pool answers, then
//! runs until killed; its Ceph daemons die with it (SIGKILL), and the caller removes DIR.
//!
//!     ceph-cluster [OSD_GIB]

use std::io::Write;

use e2e_tests::TestDir;
use e2e_tests::ceph::{Cluster, Options};

fn main() {
    let osd_gib = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<u64>().ok())
        .unwrap_or(8);
    let dir = TestDir::new("bench-ceph");
    let c = Cluster::start_with(
        &dir,
        Options {
            osd_bytes: osd_gib << 30,
            ..Options::default()
        },
    );
    println!(
        "conf={} pool={} dir={}",
        c.conf.display(),
        c.pool,
        dir.path().display()
    );
    let _ = std::io::stdout().flush();
    eprintln!("ceph-cluster: up in {:?}", c.started_in);
    loop {
        std::thread::park();
    }
}
