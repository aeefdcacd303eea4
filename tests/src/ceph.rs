//! A real, throwaway Ceph cluster for the RBD tests and the benchmark (issue 15): one
//! ceph-mon and one or more memstore ceph-osd on loopback, from Debian's packages, in the
//! style of go-ceph's `micro-osd.sh`. The test starts it and it ends when dropped.
//!
//! - Everything lives in the test's directory: `ceph.conf`, the mon's and OSDs' data, logs,
//!   admin sockets and pid files. The mon listens on a free loopback port, so clusters of
//!   several tests can run at once.
//! - `auth` none, pool size 1 by default, and a short `osd_client_watch_timeout` so that a
//!   dead client's watch lapses in seconds (fencing tests wait for it).
//! - memstore keeps objects in the OSD's memory, about 2.6 GB of RSS per GiB written: use
//!   small images.
//! - The daemons are ended by PID with SIGKILL: a memstore OSD that gets SIGTERM first writes
//!   its whole store to disk, and nothing of a throwaway cluster needs to survive.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{TestDir, require_tool};

/// How a [`Cluster`] is made.
#[derive(Debug, Clone)]
pub struct Options {
    /// OSDs to start.
    pub osds: usize,
    /// Copies a pool keeps (at most `osds`).
    pub pool_size: usize,
    /// Seconds before a dead client's watch lapses (`osd_client_watch_timeout`).
    pub watch_timeout_secs: u32,
    /// The pool made for the test.
    pub pool: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            osds: 1,
            pool_size: 1,
            watch_timeout_secs: 5,
            pool: "rbd".into(),
        }
    }
}

/// A running cluster.
pub struct Cluster {
    /// Where its files are.
    pub dir: PathBuf,
    /// Its `ceph.conf`, for clients (`-c`, librados's `rados_conf_read_file`).
    pub conf: PathBuf,
    /// The pool made for the test, initialised for RBD.
    pub pool: String,
    /// How long it took from nothing to a pool that stores objects.
    pub started_in: Duration,
    daemons: Vec<(String, Child)>,
}

/// The Debian packages a cluster needs, with a program of each (scripts/test-deps.sh
/// installs them).
const TOOLS: [(&str, &str); 5] = [
    ("ceph-mon", "ceph-mon"),
    ("ceph-osd", "ceph-osd"),
    ("ceph", "ceph-common"),
    ("rados", "ceph-common"),
    ("rbd", "ceph-common"),
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("a uuid from the kernel")
        .trim()
        .to_owned()
}

impl Cluster {
    /// One mon, one memstore OSD, pool `rbd` of size 1.
    pub fn start(dir: &TestDir) -> Self {
        Self::start_with(dir, Options::default())
    }

    /// A cluster as `options` say.
    pub fn start_with(dir: &TestDir, options: Options) -> Self {
        for (tool, package) in TOOLS {
            require_tool(tool, package);
        }
        let started = Instant::now();
        let root = dir.path().join("ceph");
        for sub in ["run", "log", "mon.a"] {
            std::fs::create_dir_all(root.join(sub)).expect("ceph directories");
        }
        let port = free_port();
        let conf = root.join("ceph.conf");
        let r = root.display();
        std::fs::write(
            &conf,
            format!(
                "[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{port}
mon initial members = a
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = {size}
osd pool default min size = 1
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {bytes}
osd max object name len = 256
osd max object namespace len = 64
osd client watch timeout = {watch}
mon allow pool delete = true
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail crit = 0
run dir = {r}/run
pid file = {r}/run/$name.pid
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
mon cluster log file = {r}/log/cluster.log
chdir = {r}
[mon.a]
mon data = {r}/mon.a
mon addr = v1:127.0.0.1:{port}
[osd]
osd data = {r}/osd.$id
",
                fsid = uuid(),
                size = options.pool_size,
                bytes = 8u64 << 30,
                watch = options.watch_timeout_secs,
            ),
        )
        .expect("write ceph.conf");
        let mut cluster = Cluster {
            dir: root.clone(),
            conf,
            pool: options.pool.clone(),
            started_in: Duration::ZERO,
            daemons: Vec::new(),
        };
        cluster.tool(
            "ceph-mon",
            &["--id", "a", "--mkfs", "--keyring", "/dev/null"],
        );
        cluster.spawn("mon.a", "ceph-mon", &["--id", "a"]);
        for _ in 0..options.osds {
            let id = cluster.ceph_ok(&["osd", "create"]);
            let id = String::from_utf8_lossy(&id.stdout).trim().to_owned();
            std::fs::create_dir_all(root.join(format!("osd.{id}"))).expect("osd directory");
            cluster.ceph_ok(&[
                "osd",
                "crush",
                "add",
                &format!("osd.{id}"),
                "1",
                "root=default",
            ]);
            cluster.tool("ceph-osd", &["--id", &id, "--mkfs"]);
            cluster.spawn(&format!("osd.{id}"), "ceph-osd", &["--id", &id]);
        }
        cluster.ceph_ok(&["osd", "pool", "create", &options.pool, "8"]);
        cluster.ceph_ok(&[
            "osd",
            "pool",
            "set",
            &options.pool,
            "size",
            &options.pool_size.to_string(),
            "--yes-i-really-mean-it",
        ]);
        cluster.rbd_ok(&["pool", "init", &options.pool]);
        // Ready when an object goes in and comes back.
        let probe = root.join("probe");
        std::fs::write(&probe, b"probe").expect("probe object");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let put = cluster.rados(&[
                "-p",
                &options.pool,
                "put",
                "probe",
                &probe.to_string_lossy(),
            ]);
            if put.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the test's Ceph cluster stores no object after 90 s: {}\n{}",
                String::from_utf8_lossy(&put.stderr),
                cluster.logs()
            );
            cluster.check_alive();
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster.rados_ok(&["-p", &options.pool, "rm", "probe"]);
        cluster.started_in = started.elapsed();
        cluster
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.arg("-c").arg(&self.conf).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs a Ceph program that must succeed.
    fn tool(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program, args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out
    }

    fn spawn(&mut self, name: &str, program: &str, args: &[&str]) {
        let child = self
            .command(program, args)
            .arg("-f")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.daemons.push((name.to_owned(), child));
    }

    /// Fails the test, with the logs, if a daemon has exited.
    fn check_alive(&mut self) {
        for (name, child) in &mut self.daemons {
            if let Ok(Some(status)) = child.try_wait() {
                let logs =
                    std::fs::read_to_string(self.dir.join("log").join(format!("{name}.log")))
                        .unwrap_or_default();
                panic!(
                    "the test's Ceph {name} exited ({status}); its log ends:\n{}",
                    tail(&logs, 40)
                );
            }
        }
    }

    /// The end of every daemon's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.daemons {
            let log = std::fs::read_to_string(self.dir.join("log").join(format!("{name}.log")))
                .unwrap_or_default();
            out.push_str(&format!("--- {name}.log (end)\n{}\n", tail(&log, 20)));
        }
        out
    }

    /// `ceph ARGS` against this cluster.
    pub fn ceph(&self, args: &[&str]) -> Output {
        self.command("ceph", args).output().expect("run ceph")
    }

    /// `ceph ARGS`, which must succeed.
    pub fn ceph_ok(&self, args: &[&str]) -> Output {
        self.tool("ceph", args)
    }

    /// `rados ARGS` against this cluster.
    pub fn rados(&self, args: &[&str]) -> Output {
        self.command("rados", args).output().expect("run rados")
    }

    /// `rados ARGS`, which must succeed.
    pub fn rados_ok(&self, args: &[&str]) -> Output {
        self.tool("rados", args)
    }

    /// `rbd ARGS` against this cluster.
    pub fn rbd(&self, args: &[&str]) -> Output {
        self.command("rbd", args).output().expect("run rbd")
    }

    /// `rbd ARGS`, which must succeed.
    pub fn rbd_ok(&self, args: &[&str]) -> Output {
        self.tool("rbd", args)
    }

    /// The PIDs of its daemons, by name (`mon.a`, `osd.0`, …).
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.daemons
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGKILL by PID (never by name: other tests' clusters run beside this one).
        for (_, child) in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
