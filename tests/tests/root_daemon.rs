//! The root storage daemon on the host (issue 16): started as `@cryptnbd`, as the initramfs
//! starts it for the NBD way, it is passed over by the OOM killer and stops at SIGTERM only
//! while it serves no kernel device. (Serving the root through the switch to the real root,
//! and refusing to detach it, is booted in tests/tests/vm.rs.)

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::TestDir;
use e2e_tests::daemon::cryptnbd_bin;

#[test]
fn started_as_at_cryptnbd_it_is_the_root_storage_daemon() {
    let dir = TestDir::new("root-daemon");
    let config = dir.join("root.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nruntime_dir = \"{}\"\n",
            dir.state_dir().display(),
            dir.join("run").display()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("daemon.log")).expect("log");
    let mut child = Command::new(cryptnbd_bin())
        .arg0("@cryptnbd")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the daemon");
    let socket = dir.join("run/control.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the daemon stopped: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the daemon did not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
    let proc = format!("/proc/{}", child.id());
    let cmdline = std::fs::read(format!("{proc}/cmdline")).expect("cmdline");
    assert!(cmdline.starts_with(b"@cryptnbd\0"), "{cmdline:?}");
    // -1000 needs CAP_SYS_RESOURCE, which a container's root may lack (the initramfs has
    // it): then the log says so.
    let adj = std::fs::read_to_string(format!("{proc}/oom_score_adj")).expect("oom_score_adj");
    let said = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(
        adj.trim() == "-1000" || said.contains("cannot set oom_score_adj to -1000"),
        "oom_score_adj {adj}; log: {said}"
    );
    // Serving no kernel device: SIGTERM stops it.
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop it");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(dir.join("daemon.log")).expect("log");
    assert!(log.contains("running as the root storage daemon"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}
