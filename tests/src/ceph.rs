//! A real, throwaway Ceph cluster for the RBD tests and the benchmark (issue 15): one
//! ceph-mon and one or more ceph-osd on loopback, from Debian's packages, in the style of
//! go-ceph's `micro-osd.sh`. The test starts it and it ends when dropped.
//!
//! - Everything lives in the test's directory: `ceph.conf`, the mon's and OSDs' data, logs,
//!   admin sockets and pid files. The mon listens on a free loopback port, so clusters of
//!   several tests can run at once.
//! - `auth` none, pool size 1 by default, and a short `osd_client_watch_timeout` so that a
//!   dead client's watch lapses in seconds (fencing tests wait for it).
//! - memstore (the default) keeps objects in the OSD's memory, about 2.6 GB of RSS per GiB
//!   written: use small images. It loses everything when its OSD is killed, so a test that
//!   restarts an OSD uses [`ObjectStore::BluestoreFile`]: bluestore on a sparse file in the
//!   OSD's directory, which keeps what it acknowledged ([`Cluster::restart_osd`]).
//! - The daemons are ended by PID with SIGKILL: a memstore OSD that gets SIGTERM first writes
//!   its whole store to disk, and nothing of a throwaway cluster needs to survive.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
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
    /// The size each memstore OSD reports (its fullness follows it).
    pub osd_bytes: u64,
    /// The pool made for the test.
    pub pool: String,
    /// Where the OSDs keep objects.
    pub objectstore: ObjectStore,
}

/// Where an OSD keeps objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectStore {
    /// In memory: fast, gone when the OSD dies.
    Memstore,
    /// bluestore on a sparse file of `osd_bytes` in the OSD's directory: survives a restart.
    BluestoreFile,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            osds: 1,
            pool_size: 1,
            watch_timeout_secs: 5,
            osd_bytes: 8 << 30,
            pool: "rbd".into(),
            objectstore: ObjectStore::Memstore,
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
    /// How long it took from nothing to a pool that stores objects (for a pool of the
    /// shared cluster: to that pool, including the cluster's start if this test started it).
    pub started_in: Duration,
    daemons: Vec<(String, Child)>,
    /// A pool of the shared cluster ([`Cluster::shared`]): removed when dropped.
    pool_of_shared: bool,
}

/// The cluster the tests of one process share ([`Cluster::shared`]).
struct Shared {
    dir: PathBuf,
    conf: PathBuf,
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

/// A loopback port for a monitor. Each test of a process gets its own (a counter, so two
/// clusters starting at once never share one; the kernel's ephemeral ports could hand the
/// same one out twice), checked free right now (another process, or a cluster a killed test
/// left behind, may hold it).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Below the kernel's ephemeral ports (32768 and up), which outgoing connections take,
    // and above the OSDs' 6800-7300.
    let base = 10_000 + (std::process::id() % 200) as u16 * 100;
    for _ in 0..1000 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 2_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port for a Ceph monitor from {base}");
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("a uuid from the kernel")
        .trim()
        .to_owned()
}

impl Cluster {
    /// A pool of its own (`LABEL-N`, size 1, initialised for RBD) on the one default
    /// cluster that every test of this process which calls this shares: for tests that do
    /// not stop, fill, restart or reconfigure the cluster. The first caller starts the
    /// cluster (on a thread that lives as long as the process, so its daemons die with the
    /// process); the pool is deleted when the value is dropped.
    pub fn shared(label: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let started = Instant::now();
        let shared = SHARED.get_or_init(start_shared);
        let mut view = Cluster {
            dir: shared.dir.clone(),
            conf: shared.conf.clone(),
            pool: format!("{label}-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            started_in: Duration::ZERO,
            daemons: Vec::new(),
            pool_of_shared: true,
        };
        view.make_pool(1);
        view.started_in = started.elapsed();
        view
    }

    /// One mon, one memstore OSD, pool `rbd` of size 1.
    pub fn start(dir: &TestDir) -> Self {
        Self::start_with(dir, Options::default())
    }

    /// A cluster as `options` say.
    pub fn start_with(dir: &TestDir, options: Options) -> Self {
        Self::start_in(dir.path(), options)
    }

    fn start_in(dir: &Path, options: Options) -> Self {
        for (tool, package) in TOOLS {
            require_tool(tool, package);
        }
        let started = Instant::now();
        let root = dir.join("ceph");
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
{objectstore}
osd max object name len = 256
osd max object namespace len = 64
osd client watch timeout = {watch}
osd heartbeat interval = 1
osd heartbeat grace = 5
mon osd min down reporters = 1
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
[client]
rados osd op timeout = 60
rados mon op timeout = 60
client mount timeout = 60
[mon.a]
mon data = {r}/mon.a
mon addr = v1:127.0.0.1:{port}
[osd]
osd data = {r}/osd.$id
debug monc = 10
",
                fsid = uuid(),
                size = options.pool_size,
                watch = options.watch_timeout_secs,
                objectstore = match options.objectstore {
                    ObjectStore::Memstore => format!(
                        "osd objectstore = memstore\nmemstore device bytes = {}",
                        options.osd_bytes
                    ),
                    // Small caches: the test machine runs several clusters at once.
                    ObjectStore::BluestoreFile => format!(
                        "osd objectstore = bluestore\nbluestore block create = true\n\
                         bluestore block size = {}\nbluestore fsck on mount = false\n\
                         bluestore cache autotune = false\nbluestore cache size = 134217728\n\
                         osd memory target = 939524096",
                        options.osd_bytes
                    ),
                },
            ),
        )
        .expect("write ceph.conf");
        let mut cluster = Cluster {
            dir: root.clone(),
            conf,
            pool: options.pool.clone(),
            started_in: Duration::ZERO,
            daemons: Vec::new(),
            pool_of_shared: false,
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
        // Every OSD up before anything waits on one (a pool's first write would wait forever
        // for an OSD that died).
        cluster.wait_osds_up(options.osds);
        cluster.make_pool(options.pool_size);
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

    /// Runs a Ceph program, killed if it takes over 90 s (a cluster that lost its OSD makes
    /// some of them wait forever).
    fn run(&self, program: &str, args: &[&str]) -> Output {
        // coreutils' timeout ends it; `output` reads both pipes while it runs, so a long
        // answer cannot fill a pipe and stall it.
        let out = Command::new("timeout")
            .arg("90")
            .arg(program)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert_ne!(
            out.status.code(),
            Some(124),
            "{program} {args:?} did not finish in 90 s against the test's Ceph cluster\n{}",
            self.logs()
        );
        out
    }

    /// Runs a Ceph program that must succeed.
    fn tool(&self, program: &str, args: &[&str]) -> Output {
        let mut out = self.run(program, args);
        // Ceph 16's monitor client can send a command before the monitor's map reached it,
        // under a blank cluster id: the monitor refuses it ("wrong fsid", or for the `ceph`
        // tool "problem getting command descriptions"). Nothing was done; ask again.
        for _ in 0..3 {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success()
                || !(stderr.contains("wrong fsid")
                    || stderr.contains("problem getting command descriptions"))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            out = self.run(program, args);
        }
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out
    }

    fn spawn(&mut self, name: &str, program: &str, args: &[&str]) {
        let mut command = self.command(program, args);
        command.arg("-f");
        die_with_the_test(&mut command);
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.daemons.push((name.to_owned(), child));
    }

    /// Makes the pool [`Cluster::pool`] with `size` copies, initialised for RBD.
    fn make_pool(&self, size: usize) {
        self.ceph_ok(&["osd", "pool", "create", &self.pool, "8"]);
        self.ceph_ok(&[
            "osd",
            "pool",
            "set",
            &self.pool,
            "size",
            &size.to_string(),
            "--yes-i-really-mean-it",
        ]);
        self.rbd_ok(&["pool", "init", &self.pool]);
    }

    /// Waits (60 s at most) until `n` OSDs are up.
    fn wait_osds_up(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut restarts = 0;
        loop {
            // An OSD sometimes has a command refused at init for the same reason as `tool`
            // retries ("wrong fsid"), and exits; go-ceph's micro-osd.sh starts it up to three
            // times too. Start it again, twice at most.
            if restarts < 2 && self.restart_exited_osds() {
                restarts += 1;
            }
            self.check_alive();
            let stat = self.ceph_ok(&["osd", "stat", "--format", "json"]);
            let stat: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap_or_default();
            if stat["num_up_osds"].as_u64() == Some(n as u64) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the test's Ceph OSDs are not up after 60 s: {stat}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills OSD `id` with SIGKILL, as a crash would, starts it again after `down`, and
    /// waits until the cluster has it up. Only a bluestore OSD keeps its objects across this.
    pub fn restart_osd(&mut self, id: u32, down: Duration) {
        let name = format!("osd.{id}");
        let at = self
            .daemons
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no {name} in the test's cluster"));
        let before = self.osd_up_from(id);
        let (_, mut child) = self.daemons.remove(at);
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(down);
        self.spawn(&name, "ceph-osd", &["--id", &id.to_string()]);
        // Up again in a later map than before the kill (the monitor may still count the
        // killed one as up until its heartbeats are missed).
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut restarts = 0;
        while self.osd_up_from(id).is_none_or(|e| Some(e) <= before) {
            // As at the cluster's start (`wait_osds_up`): an OSD whose command is refused at
            // init exits, and is started again, twice at most. Seen once under a loaded CI
            // run: the second restart of `an_osd_restarted_under_a_writer...` exited after
            // `osd crush set-device-class`.
            if restarts < 2 && self.restart_exited_osds() {
                restarts += 1;
                continue;
            }
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{name} did not come back within 60 s of its restart\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The map epoch from which OSD `id` is up; None while it is down.
    fn osd_up_from(&self, id: u32) -> Option<u64> {
        let dump = self.ceph_ok(&["osd", "dump", "--format", "json"]);
        let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap_or_default();
        let osd = dump["osds"]
            .as_array()?
            .iter()
            .find(|o| o["osd"].as_u64() == Some(u64::from(id)))?;
        (osd["up"].as_u64() == Some(1)).then(|| osd["up_from"].as_u64())?
    }

    /// Starts again every OSD that has exited; true if there was one.
    fn restart_exited_osds(&mut self) -> bool {
        let mut exited = Vec::new();
        for (name, child) in &mut self.daemons {
            if name.starts_with("osd.") && matches!(child.try_wait(), Ok(Some(_))) {
                exited.push(name.clone());
            }
        }
        for name in &exited {
            self.daemons.retain(|(n, _)| n != name);
            let id = name.trim_start_matches("osd.").to_owned();
            self.spawn(name, "ceph-osd", &["--id", &id]);
        }
        !exited.is_empty()
    }

    /// Fails the test, with the logs, if a daemon has exited.
    fn check_alive(&mut self) {
        for (name, child) in &mut self.daemons {
            if let Ok(Some(status)) = child.try_wait() {
                let logs =
                    std::fs::read_to_string(self.dir.join("log").join(format!("{name}.log")))
                        .unwrap_or_default();
                let monc: Vec<&str> = logs
                    .lines()
                    .filter(|l| {
                        l.contains("monclient") && (l.contains("mon.") || l.contains("fsid"))
                    })
                    .take(30)
                    .collect();
                panic!(
                    "the test's Ceph {name} exited ({status}); its monitor client said:\n{}\nits log ends:\n{}",
                    monc.join("\n"),
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
        self.run("ceph", args)
    }

    /// `ceph ARGS`, which must succeed.
    pub fn ceph_ok(&self, args: &[&str]) -> Output {
        self.tool("ceph", args)
    }

    /// `rados ARGS` against this cluster.
    pub fn rados(&self, args: &[&str]) -> Output {
        self.run("rados", args)
    }

    /// `rados ARGS`, which must succeed.
    pub fn rados_ok(&self, args: &[&str]) -> Output {
        self.tool("rados", args)
    }

    /// `rbd ARGS` against this cluster.
    pub fn rbd(&self, args: &[&str]) -> Output {
        self.run("rbd", args)
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

/// The daemon gets SIGKILL when the thread that started it ends, so that a test that dies
/// (a panic in another thread, a crash) leaves no cluster behind; `Drop` covers the rest.
#[allow(unsafe_code)]
fn die_with_the_test(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl, an
    // async-signal-safe system call, with constant arguments; it touches no memory of the
    // parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.pool_of_shared {
            // Frees the pool's memory in the shared OSD. Never panics (this may run while a
            // failed test unwinds): a pool left behind goes with the cluster.
            let _ = Command::new("timeout")
                .arg("30")
                .arg("ceph")
                .arg("-c")
                .arg(&self.conf)
                .args(["osd", "pool", "delete", &self.pool, &self.pool])
                .arg("--yes-i-really-really-mean-it")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // SIGKILL by PID (never by name: other tests' clusters run beside this one).
        for (_, child) in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the shared cluster on a thread that holds it for the rest of the process (its
/// daemons get SIGKILL when that thread ends, which is when the process does). Directories
/// of shared clusters whose process is gone are removed first.
fn start_shared() -> Shared {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("cryptnbd-e2e-ceph-shared-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = tmp.join(format!("cryptnbd-e2e-ceph-shared-{}", std::process::id()));
    let (tx, rx) = std::sync::mpsc::channel();
    let holder_dir = dir.clone();
    std::thread::Builder::new()
        .name("ceph-shared".into())
        .spawn(move || {
            std::fs::create_dir_all(&holder_dir).expect("shared cluster directory");
            let started =
                std::panic::catch_unwind(|| Cluster::start_in(&holder_dir, Options::default()));
            match started {
                Ok(cluster) => {
                    let _ = tx.send(Ok((cluster.dir.clone(), cluster.conf.clone())));
                    // Holds the cluster until the process exits.
                    loop {
                        std::thread::park();
                    }
                }
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    let _ = tx.send(Err(why));
                }
            }
        })
        .expect("a thread for the shared cluster");
    match rx.recv() {
        Ok(Ok((dir, conf))) => Shared { dir, conf },
        Ok(Err(why)) => panic!("the shared test cluster did not start: {why}"),
        Err(_) => panic!("the shared test cluster's thread died"),
    }
}
