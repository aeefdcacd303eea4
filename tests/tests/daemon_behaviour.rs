//! The daemon's behaviour around the data path: TCP opt-in, access control by peer
//! credentials, key custody (locked memory, no core dumps), systemd notification, graceful
//! shutdown, and failures under it (a full disk, a volume file removed, a neighbour whose
//! store hangs).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_tests::daemon::{Daemon, cryptnbd_bin, nbdinfo};
use e2e_tests::{TestDir, require_tool, run};

#[test]
fn tcp_exports_are_opt_in_per_volume() {
    let dir = TestDir::new("tcp");
    let d = Daemon::start(&dir, "[nbd]\ntcp = \"127.0.0.1:0\"\n");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("open", "16M", "alias/e2e", 4096, &[]);
    d.ctl
        .create_volume("private", "16M", "alias/e2e", 4096, &[]);
    let attached = d
        .ctl
        .run(&["--json", "attach", "open", "--tcp"])
        .assert_success()
        .json();
    d.ctl.run(&["attach", "private"]).assert_success();
    let tcp_uri = attached["uris"][1].as_str().expect("tcp uri").to_string();
    assert!(tcp_uri.starts_with("nbd://127.0.0.1:"), "{tcp_uri}");
    run(Command::new(nbdinfo()).arg(&tcp_uri)).assert_success();
    let private_uri = tcp_uri.replace("/open", "/private");
    assert_ne!(
        run(Command::new(nbdinfo()).arg(&private_uri)).code,
        Some(0),
        "private volume reachable over TCP"
    );
    let listing = run(Command::new(nbdinfo())
        .args(["--list", "--json"])
        .arg(tcp_uri.replace("/open", "/")))
    .assert_success()
    .json();
    let names: Vec<&str> = listing["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, ["open"]);
    d.stop();
}

/// Lets an unprivileged client reach the sockets under `dir` through its directories.
fn open_to_all(dir: &TestDir) {
    let mut p = dir.path().to_path_buf();
    loop {
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
        if !p.pop() || p.as_os_str() == "/tmp" || p.as_os_str() == "/" {
            break;
        }
    }
}

/// `program` run as nobody (uid and gid 65534, no groups), by `setpriv`.
fn as_nobody(program: &Path) -> Command {
    let mut c = Command::new(require_tool("setpriv", "util-linux"));
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(program);
    c
}

#[test]
fn only_allowed_users_see_and_open_an_export() {
    let dir = TestDir::new("acl");
    open_to_all(&dir);
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "16M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "vol"]).assert_success();
    let nbdinfo_as_nobody = |args: &[&str]| run(as_nobody(&nbdinfo()).args(args));
    let socket_uri = format!("nbd+unix:///?socket={}", d.nbd_socket().display());
    let list = nbdinfo_as_nobody(&["--list", "--json", &socket_uri]);
    list.assert_success();
    assert_eq!(
        list.json()["exports"].as_array().map_or(0, Vec::len),
        0,
        "nobody sees the export"
    );
    assert_ne!(
        nbdinfo_as_nobody(&[&d.uri("vol")]).code,
        Some(0),
        "nobody opened the export"
    );
    // Allowed by uid: visible and readable.
    d.ctl.run(&["detach", "vol"]).assert_success();
    d.ctl
        .run(&["attach", "vol", "--allow-uid", "65534"])
        .assert_success();
    nbdinfo_as_nobody(&[&d.uri("vol")]).assert_success();
    // The control socket (0660, root's) refuses nobody even if it could connect.
    let ctl_as_nobody = run(as_nobody(&d.ctl.bin)
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--socket")
        .arg(d.runtime_dir.join("control.sock"))
        .arg("status"));
    assert!(
        matches!(ctl_as_nobody.code, Some(9) | Some(10) | Some(1)),
        "{:?}",
        ctl_as_nobody.code
    );
    d.stop();
}

#[test]
fn an_allowed_user_who_is_not_root_may_not_manage_master_keys() {
    let dir = TestDir::new("kms-acl");
    open_to_all(&dir);
    let d = Daemon::start(&dir, "[control]\nallow_uids = [65534]\n");
    d.ctl.create_key("e2e");
    let socket = d.runtime_dir.join("control.sock");
    // Past the socket's mode: the daemon's own check is what is tested.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let ctl_as_nobody = |args: &[&str]| {
        run(as_nobody(&d.ctl.bin)
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--socket")
            .arg(&socket)
            .args(args))
    };
    // Allowed on the control socket: status works.
    ctl_as_nobody(&["status"]).assert_success();
    // But the master keys are root's: every key verb is refused with exit 10, naming why.
    for verb in [
        &["kms", "create-key", "--alias", "alias/mine"][..],
        &["kms", "list-keys"],
        &["kms", "disable-key", "alias/e2e"],
    ] {
        let out = ctl_as_nobody(verb);
        assert_eq!(out.code, Some(10), "{verb:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("only root or the daemon's own user"),
            "{verb:?}: {}",
            out.stderr
        );
    }
    // Nothing changed: the key is still enabled and no key `mine` exists.
    let keys = d
        .ctl
        .run(&["--json", "kms", "list-keys"])
        .assert_success()
        .json();
    let text = keys.to_string();
    assert!(!text.contains("alias/mine"), "{text}");
    assert!(text.contains("alias/e2e"), "{text}");
    assert!(!text.to_lowercase().contains("disabled"), "{text}");
    d.stop();
}

fn proc_status_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_default()
}

#[test]
fn key_custody_memory_locked_no_core_dumps() {
    let dir = TestDir::new("custody");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "16M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "vol"]).assert_success();
    let pid = d.pid();
    // As root, memory locking is required by default, so the daemon would not have started
    // without it; VmLck shows the locked pages.
    let locked = proc_status_field(pid, "VmLck:");
    let kb: u64 = locked
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(kb > 0, "VmLck is {locked}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    // The log never shows key material: no 128-hex-digit runs, no base64 of 64 bytes.
    let log = d.stop();
    assert!(
        !log.contains("wrapped_key"),
        "the log mentions the wrapped key"
    );
    let hexrun = log
        .as_bytes()
        .split(|b| !b.is_ascii_hexdigit())
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0);
    assert!(hexrun < 64, "a {hexrun}-digit hex run in the log");
}

#[test]
fn notifies_systemd_and_shuts_down_gracefully() {
    let dir = TestDir::new("notify");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let state = dir.state_dir();
    let runtime = dir.join("run");
    let mut child = Command::new(cryptnbd_bin())
        .arg("--state-dir")
        .arg(&state)
        .arg("--runtime-dir")
        .arg(&runtime)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("CRYPTNBD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means the control socket answers.
    let mut ctl = e2e_tests::Ctl::new(&state);
    ctl.socket = Some(runtime.join("control.sock"));
    ctl.run(&["status"]).assert_success();
    run(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string()))
    .assert_success();
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(
        !runtime.join("control.sock").exists() && !runtime.join("nbd.sock").exists(),
        "sockets left behind"
    );
}

/// A tmpfs of `size` mounted on a directory, unmounted (lazily) when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    #[track_caller]
    fn mount(dir: &Path, size: &str) -> Self {
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir))
        .assert_success();
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_gives_enospc_to_the_client_and_the_daemon_lives_on() {
    let dir = TestDir::new("enospc");
    let small = dir.join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let _unmount = Tmpfs::mount(&small, "24m");
    // The volumes directory lives on the small tmpfs: a 64 MiB volume cannot be filled.
    std::fs::create_dir_all(dir.state_dir()).expect("mkdir");
    std::os::unix::fs::symlink(&small, dir.state_dir().join("volumes")).expect("symlink");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("full", "64M", "alias/e2e", 4096, &[]);
    d.ctl.create_volume("other", "1M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "full"]).assert_success();
    d.ctl.run(&["attach", "other"]).assert_success();
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let out = run(Command::new(&qemu_io).args([
        "-f",
        "raw",
        &d.uri("full"),
        "-c",
        "write -P 0x5a 0 48M",
    ]));
    let text = format!("{}{}", out.stdout_text(), out.stderr);
    assert!(
        text.contains("No space left on device"),
        "expected ENOSPC, got: {text}"
    );
    // The daemon is alive and the other volume serves.
    d.ctl.run(&["status"]).assert_success();
    run(Command::new(&qemu_io).args(["-f", "raw", &d.uri("other"), "-c", "read 0 4096"]))
        .assert_success();
    d.stop();
}

#[test]
fn a_volume_file_removed_under_the_daemon() {
    let dir = TestDir::new("removed");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "16M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "vol"]).assert_success();
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    std::fs::remove_file(d.state_dir.join("volumes/vol.luks")).expect("rm");
    // The open file still serves (POSIX keeps the inode); the daemon does not crash.
    run(Command::new(&qemu_io).args([
        "-f",
        "raw",
        &d.uri("vol"),
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "read -P 0x11 0 64k",
    ]))
    .assert_success();
    d.ctl.run(&["detach", "vol"]).assert_success();
    // Now it is gone: attach says so precisely.
    let out = d.ctl.run(&["attach", "vol"]);
    out.assert_code(3);
    out.assert_stderr_contains("vol.luks");
    d.stop();
}

/// Threads of `pid` named `nbd-io-*` that sleep uninterruptibly (state `D`): blocked in the
/// kernel on a store.
fn io_threads_blocked(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            comm.starts_with("nbd-io-") && state.is_some_and(|s| s.starts_with('D'))
        })
        .count()
}

/// An nbdsh running `script` in the background, its output captured.
fn spawn_nbdsh(script: &str) -> std::process::Child {
    e2e_tests::daemon::nbdsh()
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh")
}

#[test]
fn a_volume_whose_store_hangs_does_not_stall_the_others() {
    use e2e_tests::loopdev::Loop;
    let dir = TestDir::new("hung-neighbour");
    // The hung volume's file lives on an ext4 filesystem of its own, which is then frozen
    // (fsfreeze): every write to it blocks in the kernel until it is thawed, as on a disk
    // that stops answering.
    let lo = Loop::new(&dir, "fs.img", 64 << 20);
    run(Command::new(require_tool("mkfs.ext4", "e2fsprogs"))
        .arg("-q")
        .arg(&lo.dev))
    .assert_success();
    let fs = dir.join("hung-fs");
    std::fs::create_dir_all(&fs).expect("mkdir");
    run(Command::new("mount").arg(&lo.dev).arg(&fs)).assert_success();
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.0)
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _mounted = Mounted(fs.clone());
    let d = Daemon::start(&dir, "[limits]\nio_threads = 4\n");
    d.ctl.create_key("e2e");
    d.ctl.create_volume("fast", "16M", "alias/e2e", 4096, &[]);
    // Made where volumes are made, then moved onto the filesystem that will hang, with a
    // symbolic link left in its place.
    d.ctl.create_volume("hung", "16M", "alias/e2e", 4096, &[]);
    let made = dir.volumes_dir().join("hung.luks");
    let hung_file = fs.join("hung.luks");
    std::fs::copy(&made, &hung_file).expect("copy the volume");
    std::fs::remove_file(&made).expect("rm");
    std::os::unix::fs::symlink(&hung_file, &made).expect("symlink");
    d.ctl.run(&["attach", "fast"]).assert_success();
    d.ctl.run(&["attach", "hung"]).assert_success();

    let fsfreeze = require_tool("fsfreeze", "util-linux");
    run(Command::new(&fsfreeze).arg("-f").arg(&fs)).assert_success();
    // Thawed on every way out of the test, before the daemon is stopped (its blocked threads
    // could not end otherwise).
    struct Frozen(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Frozen {
        fn drop(&mut self) {
            let _ = Command::new(&self.0).arg("-u").arg(&self.1).status();
        }
    }
    let frozen = Frozen(fsfreeze, fs.clone());

    // Eight writes to the hung volume, all in flight at once: more than the I/O threads.
    let mut hung_client = spawn_nbdsh(&format!(
        "h.connect_uri({:?})\n\
                 cookies = [h.aio_pwrite(bytes([0x48]) * 4096, i * 4096) for i in range(8)]\n\
                 while h.aio_in_flight() > 0: h.poll(-1)\n\
                 assert all(h.aio_command_completed(c) for c in cookies)\n\
                 print('written', flush=True)",
        d.uri("hung")
    ));
    // The first write blocks in the kernel on the frozen filesystem; the others queue behind
    // it (the file takes one buffered writer at a time) and hold their I/O threads as well.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while io_threads_blocked(d.pid()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the hung volume's writes never blocked in the kernel"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));

    // Meanwhile the other volume serves reads and writes, on the thread left to it.
    let started = std::time::Instant::now();
    let mut fast_client = spawn_nbdsh(&format!(
        "h.connect_uri({:?})\n\
                 for i in range(200):\n    \
                     h.pwrite(bytes([i % 251 + 1]) * 4096, (i % 64) * 4096)\n    \
                     assert h.pread(4096, (i % 64) * 4096) == bytes([i % 251 + 1]) * 4096\n\
                 h.flush()\n\
                 print('served', flush=True)",
        d.uri("fast")
    ));
    let fast_deadline = started + Duration::from_secs(30);
    let fast_status = loop {
        if let Some(status) = fast_client.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > fast_deadline {
            let _ = fast_client.kill();
            let _ = fast_client.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let fast_took = started.elapsed();
    let fast_out = fast_client.wait_with_output().expect("output");
    let hung_still_waiting = hung_client.try_wait().expect("wait").is_none();
    // Thaw, then judge: the hung writes complete and read back.
    drop(frozen);
    let hung_out = hung_client.wait_with_output().expect("nbdsh");
    assert!(
        fast_status.is_some_and(|s| s.success()),
        "the other volume stalled behind the hung one ({fast_took:?}): {}{}",
        String::from_utf8_lossy(&fast_out.stdout),
        String::from_utf8_lossy(&fast_out.stderr)
    );
    eprintln!("200 writes and reads on the other volume took {fast_took:?} beside the hung one");
    assert!(
        hung_still_waiting,
        "the hung volume's writes finished while its filesystem was frozen"
    );
    assert!(
        String::from_utf8_lossy(&hung_out.stdout).contains("written"),
        "the hung writes failed after the thaw: {}",
        String::from_utf8_lossy(&hung_out.stderr)
    );
    let back = d.read_export("hung", &dir.join("hung.read"));
    assert!(back[..8 * 4096].iter().all(|&b| b == 0x48));
    d.ctl.run(&["status"]).assert_success();
    d.stop();
}

#[test]
fn a_full_log_disk_does_not_stop_the_daemon() {
    let dir = TestDir::new("full-log");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).expect("mkdir");
    // Standard error goes to a file on a 4 KiB tmpfs: the verbose daemon fills it while it
    // starts, and every line after that fails with ENOSPC.
    let _unmount = Tmpfs::mount(&logs, "4k");
    let log = logs.join("cryptnbd.log");
    let d = Daemon::start_logging_to(&dir, "", &[], &log);
    d.ctl.create_key("e2e");
    d.ctl.create_volume("vol", "16M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "vol"]).assert_success();
    // Refused requests are logged as warnings; so are refused control calls.
    d.ctl.run(&["attach", "missing"]).assert_code(3);
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    d.write_export("vol", &data, &dir.join("scratch"));
    d.ctl.run(&["detach", "vol"]).assert_success();
    d.ctl.run(&["attach", "vol"]).assert_success();
    assert_eq!(
        d.read_export("vol", &dir.join("scratch"))[..data.len()],
        data[..]
    );
    let logged = std::fs::metadata(&log).expect("log").len();
    assert_eq!(logged, 4096, "the log did not fill");
    // Still alive and serving.
    d.ctl.run(&["status"]).assert_success();
    d.stop();
}
