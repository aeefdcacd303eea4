//! The real `cryptnbd` daemon as a child process on temporary sockets, and helpers for the
//! real NBD clients that talk to it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Ctl, Outcome, TestDir, require_tool, run, target_dir};

/// The built `cryptnbd` binary.
pub fn cryptnbd_bin() -> PathBuf {
    let bin = target_dir().join("debug").join("cryptnbd");
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Socket directory.
    pub runtime_dir: PathBuf,
    /// The config file it was started with.
    pub config: PathBuf,
    /// Its stderr log.
    pub log: PathBuf,
    /// `cryptnbdctl` bound to this daemon.
    pub ctl: Ctl,
}

impl Daemon {
    /// Starts a daemon with state in `dir/state`, sockets in `dir/run`, and `extra` appended
    /// to its TOML config; returns once its control socket answers.
    #[track_caller]
    pub fn start(dir: &TestDir, extra: &str) -> Self {
        Self::start_env(dir, extra, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables (e.g. `CRYPTNBD_CRASH_AT`).
    #[track_caller]
    pub fn start_env(dir: &TestDir, extra: &str, env: &[(&str, &str)]) -> Self {
        Self::start_logging_to(dir, extra, env, &dir.join("cryptnbd.log"))
    }

    /// Like [`Daemon::start_env`], its standard error appended to `log` (a file on a small
    /// filesystem, say).
    #[track_caller]
    pub fn start_logging_to(
        dir: &TestDir,
        extra: &str,
        env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> Self {
        let state_dir = dir.state_dir();
        let runtime_dir = dir.join("run");
        let config = dir.join("cryptnbd.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nruntime_dir = \"{}\"\n{extra}\n",
                state_dir.display(),
                runtime_dir.display()
            ),
        )
        .expect("write config");
        Self::start_with(state_dir, runtime_dir, config, log.to_path_buf(), env)
    }

    #[track_caller]
    fn start_with(
        state_dir: PathBuf,
        runtime_dir: PathBuf,
        config: PathBuf,
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(cryptnbd_bin())
            .arg("--config")
            .arg(&config)
            .arg("-v")
            .env_remove("CRYPTNBD_STATE_DIR")
            .env_remove("CRYPTNBD_RUNTIME_DIR")
            .env_remove("CRYPTNBD_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("CRYPTNBD_CRASH_AT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start cryptnbd");
        let mut ctl = Ctl::new(&state_dir);
        ctl.socket = Some(runtime_dir.join("control.sock"));
        let mut d = Self {
            child: Some(child),
            state_dir,
            runtime_dir,
            config,
            log,
            ctl,
        };
        d.wait_ready();
        d
    }

    #[track_caller]
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "cryptnbd exited during start-up ({status}); its log:\n{}",
                    self.log_text()
                );
            }
            let out = self.ctl.run_quiet(&["status"]);
            if out.code == Some(0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cryptnbd did not answer on its control socket within 30 s; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The NBD unix socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.runtime_dir.join("nbd.sock")
    }

    /// The export's whole content, read with nbdcopy (through `scratch`).
    #[track_caller]
    pub fn read_export(&self, export: &str, scratch: &std::path::Path) -> Vec<u8> {
        let _ = std::fs::remove_file(scratch);
        run(Command::new(nbdcopy()).arg(self.uri(export)).arg(scratch)).assert_success();
        std::fs::read(scratch).expect("read the copy")
    }

    /// Writes `data` over the start of the export with nbdcopy (through `scratch`).
    #[track_caller]
    pub fn write_export(&self, export: &str, data: &[u8], scratch: &std::path::Path) {
        std::fs::write(scratch, data).expect("write scratch");
        run(Command::new(nbdcopy()).arg(scratch).arg(self.uri(export))).assert_success();
    }

    /// The NBD URI of `export`.
    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }

    /// The address of the metrics endpoint (`[metrics] listen`), as the daemon's log says it
    /// serves it (an ephemeral port when the config says `:0`). Waits up to 10 s.
    #[track_caller]
    pub fn metrics_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log_text();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("metrics served at /metrics"))
            {
                let at = line.find("listen=").expect("listen= in the log line") + "listen=".len();
                return line[at..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never said where it serves its metrics:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then waits; asserts a clean exit and returns its log.
    #[track_caller]
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        run(Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string()))
        .assert_success();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(
                    status.success(),
                    "cryptnbd exited with {status}; log:\n{}",
                    self.log_text()
                );
                return self.log_text();
            }
            assert!(
                Instant::now() < deadline,
                "cryptnbd did not stop within 60 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the same daemon again (same config), e.g. after `stop`.
    #[track_caller]
    pub fn restart(self) -> Self {
        let (state_dir, runtime_dir, config, log) = (
            self.state_dir.clone(),
            self.runtime_dir.clone(),
            self.config.clone(),
            self.log.clone(),
        );
        self.stop();
        Self::start_with(state_dir, runtime_dir, config, log, &[])
    }

    /// Waits (up to 60 s) for the daemon to die of SIGKILL by itself (a crash point); returns
    /// whether it did.
    pub fn wait_killed(mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.signal() == Some(9);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash), then waits.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Ctl {
    /// Runs `cryptnbdctl ARGS...` without asserting anything.
    pub fn run_quiet(&self, args: &[&str]) -> Outcome {
        run(&mut self.command(args))
    }
}

/// `nbdinfo` (libnbd-bin).
pub fn nbdinfo() -> PathBuf {
    require_tool("nbdinfo", "libnbd-bin")
}

/// `nbdcopy` (libnbd-bin).
pub fn nbdcopy() -> PathBuf {
    require_tool("nbdcopy", "libnbd-bin")
}

/// nbdsh, with Debian's python3 (which has python3-libnbd) first on PATH.
pub fn nbdsh() -> Command {
    let nbdsh = require_tool("nbdsh", "libnbd-bin");
    assert!(
        run(Command::new("/usr/bin/python3").args(["-c", "import nbd"])).code == Some(0),
        "nbdsh needs python3-libnbd for /usr/bin/python3: apt-get install python3-libnbd"
    );
    let mut c = Command::new(nbdsh);
    c.env("PATH", "/usr/bin:/bin");
    c
}

/// An nbdsh process that connects and then holds the connection open until killed. The URI
/// may name local files (`tls-certificates=DIR`), which nbdsh must be told to allow.
pub fn hold_connection(uri: &str) -> std::process::Child {
    nbdsh()
        .args([
            "-c",
            &format!(
                "h.set_uri_allow_local_file(True)\nh.connect_uri({uri:?})\nimport time\nwhile True: time.sleep(1)"
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdsh")
}

/// `METHOD PATH` over HTTP/1.1 to `addr` (the metrics endpoint): the status line and the
/// body.
#[track_caller]
pub fn http(addr: &str, method: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// Waits until `volume` has `n` NBD connections; returns them as `status --json` shows them.
#[track_caller]
pub fn wait_connections(d: &Daemon, volume: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = d
            .ctl
            .run(&["--json", "status", volume])
            .assert_success()
            .json();
        let connections = s["attachments"][0]["connections"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let got = connections.len();
        if got == n {
            return connections;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} connections, have {got}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
