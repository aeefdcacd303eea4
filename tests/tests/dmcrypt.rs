//! `open VOLUME --dm-crypt NAME` / `close NAME` against the real daemon and the real
//! cryptsetup, on a host without device-mapper (docs/cli.md, "open").
//!
//! What is proven here:
//! - The bytes the daemon writes into the pipe passed with `open-dm-crypt` are the volume key:
//!   they equal an independent unwrap through the real local KMS, and the real cryptsetup
//!   accepts them against the header's digest (`luksAddKey --key-size 512 --volume-key-file`,
//!   rc 0; one byte off: rc 2), on a copy of the volume file. The request is sent over the
//!   control socket by this test itself, with a pipe, exactly as `cryptnbdctl` sends it.
//! - The whole CLI path up to cryptsetup: in a private mount namespace where
//!   `/dev/mapper/control` is `/dev/null` (so the CLI's device-mapper check passes) and
//!   `CRYPTNBD_CRYPTSETUP` names a stand-in, the stand-in gets the documented command line
//!   and, on its standard input, a key the real cryptsetup verifies; it then fails as
//!   cryptsetup fails without device-mapper, and the CLI shows its message and reports it.
//! - Refusals: attached through NBD (both ways round: the volume is held while the key is
//!   out), wrong SID or directory, a changed context (the KMS refuses), a descriptor that is
//!   not a pipe, no descriptor, bad names, a mapping that does not exist; the CLI's own
//!   checks (no device-mapper, no cryptsetup, not root), each naming what is missing, before
//!   any key is handed out.
//! - The audit trail: `open-dm-crypt` with the key id, the context and the caller, then
//!   `dm-crypt-opened` with cryptsetup's outcome; never the key.
//!
//! What is not proven here: a real mapping. This kernel has no device-mapper, so `cryptsetup
//! open` cannot map anything, and the refusal of an attach while a mapping exists (and
//! `close`) are covered by the daemon's unit tests on a fake sysfs; the VM rig (a Debian
//! kernel under qemu) runs the real round trip.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use control_api::{
    ApiError, DmCryptMapping, Envelope, ErrorCode, OpenDmCryptRequest, Request, Response,
    ResponseEnvelope, decode_line, encode_line,
};
use e2e_tests::daemon::Daemon;
use e2e_tests::{
    Ctl, TEST_DIRECTORY, TEST_SID, TestDir, Zeroizing, cryptsetup, cryptsetup_add_key,
    flip_one_byte, run, set_context_pair, unwrap_volume_key,
};
use serde_json::Value;

/// A raw control connection: requests sent as `cryptnbdctl` sends them, with a descriptor
/// alongside (SCM_RIGHTS).
struct Control {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Control {
    #[track_caller]
    fn connect(d: &Daemon) -> Self {
        let path = d.runtime_dir.join("control.sock");
        let stream = UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    #[track_caller]
    fn call(&mut self, request: Request, fd: Option<BorrowedFd<'_>>) -> Result<Response, ApiError> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let line = encode_line(&Envelope::new(request));
        let mut sent = 0;
        if let Some(fd) = fd {
            let fds = [fd];
            let mut space =
                [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut cmsg = SendAncillaryBuffer::new(&mut space);
            assert!(cmsg.push(SendAncillaryMessage::ScmRights(&fds)));
            sent = rustix::net::sendmsg(
                &self.stream,
                &[std::io::IoSlice::new(&line)],
                &mut cmsg,
                SendFlags::empty(),
            )
            .expect("sendmsg");
        }
        self.stream.write_all(&line[sent..]).expect("send");
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(r) = decode_line::<ResponseEnvelope>(&mut self.buf).expect("decode") {
                return match r.outcome {
                    control_api::Outcome::Ok { result } => Ok(result),
                    control_api::Outcome::Error(e) => Err(e),
                    control_api::Outcome::Progress(p) => panic!("unexpected progress {p:?}"),
                };
            }
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "the daemon closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// `open-dm-crypt` with a new pipe; returns the answer and everything the daemon wrote
    /// into the pipe (read to its end: the daemon has closed its write end, and ours is
    /// closed after sending).
    #[track_caller]
    fn open(&mut self, r: OpenDmCryptRequest) -> (Result<Response, ApiError>, Zeroizing<Vec<u8>>) {
        let (mut reader, writer) = std::io::pipe().expect("pipe");
        let answer = self.call(Request::OpenDmCrypt(r), Some(writer.as_fd()));
        drop(writer);
        let mut bytes = Zeroizing::new(Vec::new());
        reader.read_to_end(&mut bytes).expect("read the pipe");
        (answer, bytes)
    }
}

fn open_request(volume: &str, name: &str) -> OpenDmCryptRequest {
    OpenDmCryptRequest {
        volume: volume.into(),
        name: name.into(),
        ..OpenDmCryptRequest::default()
    }
}

#[track_caller]
fn expect_error(r: Result<Response, ApiError>, code: ErrorCode, needle: &str) -> ApiError {
    let e = r.expect_err("refused");
    assert_eq!(e.code, code, "{e:?}");
    assert!(
        e.message.contains(needle),
        "{needle:?} not in: {}",
        e.message
    );
    e
}

/// A daemon with one 16 MiB volume `v` (4096-byte sectors); returns it with the key id.
fn daemon_with_volume(dir: &TestDir) -> (Daemon, String) {
    let d = Daemon::start(dir, "");
    let key = d.ctl.create_key("dm");
    d.ctl.create_volume("v", "16M", "alias/dm", 4096, &[]);
    (d, key)
}

fn volume_path(dir: &TestDir) -> PathBuf {
    dir.volumes_dir().join("v.luks")
}

/// `cryptsetup luksAddKey --key-size 512 --volume-key-file KEY` on a fresh copy of the
/// volume file: rc 0 when KEY matches the header's digest, 2 when it does not.
#[track_caller]
fn cryptsetup_checks_key(dir: &TestDir, volume: &Path, key: &[u8], label: &str) -> i32 {
    let copy = dir.join(&format!("{label}.copy.luks"));
    std::fs::copy(volume, &copy).expect("copy the volume");
    let key_file = dir.write_secret(&format!("{label}.key"), key);
    let pass = dir.write_secret(&format!("{label}.pass"), b"a new passphrase for the copy");
    let out = cryptsetup_add_key(&copy, &key_file, &pass);
    let _ = std::fs::remove_file(&key_file);
    out.code.unwrap_or(-1)
}

fn audit_records(ctl: &Ctl) -> Vec<Value> {
    ctl.run(&["--json", "audit", "--volume", "v"])
        .assert_success()
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn records_of<'a>(records: &'a [Value], operation: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["operation"] == operation)
        .collect()
}

fn luks_uuid(volume: &Path) -> String {
    run(Command::new(cryptsetup()).arg("luksUUID").arg(volume))
        .assert_success()
        .stdout_text()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn the_daemon_writes_the_volume_key_into_the_pipe() {
    let dir = TestDir::new("dm-key");
    let (d, key_id) = daemon_with_volume(&dir);
    let path = volume_path(&dir);
    let mut c = Control::connect(&d);
    let (answer, key) = c.open(OpenDmCryptRequest {
        sid: Some(TEST_SID.into()),
        directory: Some(TEST_DIRECTORY.into()),
        ..open_request("v", "v-dm")
    });
    let m = match answer {
        Ok(Response::DmCryptKeySent(m)) => m,
        other => panic!("expected dm-crypt-key-sent, got {other:?}"),
    };
    assert_eq!(
        m,
        DmCryptMapping {
            volume: "v".into(),
            name: "v-dm".into(),
            device: "/dev/mapper/v-dm".into(),
            path: path.display().to_string(),
            uuid: luks_uuid(&path),
            sector_size: 4096,
            size: 16 << 20,
            read_only: false,
        }
    );

    // Exactly 64 bytes, and they are the volume key: the same as an independent unwrap
    // through the real local KMS, and accepted by cryptsetup against the header's digest.
    assert_eq!(key.len(), 64, "the pipe held {} bytes", key.len());
    let unwrapped = unwrap_volume_key(&d.ctl.local_kms(), &path).await;
    assert!(
        key[..] == unwrapped[..],
        "the pipe's bytes are not the key the KMS unwraps"
    );
    assert_eq!(cryptsetup_checks_key(&dir, &path, &key, "right"), 0);
    assert_eq!(
        cryptsetup_checks_key(&dir, &path, &flip_one_byte(&key, 9), "wrong"),
        2,
        "cryptsetup must refuse a key one byte off"
    );

    // While the key is out and no mapping exists, the volume is held: no attach.
    d.ctl
        .run(&["attach", "v"])
        .assert_code(4)
        .assert_stderr_contains("open-dm-crypt");
    let ops = d.ctl.run(&["--json", "operations"]).assert_success().json();
    assert_eq!(ops["operations"][0]["operation"], "open-dm-crypt", "{ops}");

    // The client reports cryptsetup's failure: audited, and the volume is free again.
    expect_error(
        c.call(
            Request::DmCryptOpened {
                volume: "v".into(),
                name: "v-dm".into(),
                error: Some("test: no device-mapper".into()),
            },
            None,
        ),
        ErrorCode::Io,
        "cryptsetup open failed: test: no device-mapper; the volume is free again",
    );
    d.ctl.run(&["attach", "v", "--transient"]).assert_success();
    d.ctl.run(&["detach", "v"]).assert_success();

    // A second report has nothing to end.
    expect_error(
        c.call(
            Request::DmCryptOpened {
                volume: "v".into(),
                name: "v-dm".into(),
                error: None,
            },
            None,
        ),
        ErrorCode::NotFound,
        "no open of volume v as v-dm is under way",
    );

    let records = audit_records(&d.ctl);
    let opened = records_of(&records, "open-dm-crypt");
    assert_eq!(opened.len(), 1, "{records:?}");
    assert_eq!(opened[0]["outcome"], "ok");
    assert_eq!(opened[0]["caller_uid"], 0);
    assert_eq!(opened[0]["key_id"], key_id.as_str());
    assert!(
        opened[0]["context"][e2e_tests::SID_DIRECTORY_KEY]
            .as_str()
            .is_some_and(|v| v.contains(TEST_SID)),
        "{}",
        opened[0]
    );
    let reported = records_of(&records, "dm-crypt-opened");
    assert_eq!(reported.len(), 1, "{records:?}");
    assert_eq!(
        reported[0]["outcome"],
        "cryptsetup open failed: test: no device-mapper"
    );
    // Never the key, in any form the audit trail could hold it.
    let trail = std::fs::read(d.state_dir.join("audit/audit.jsonl")).expect("audit trail");
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let trail_text = String::from_utf8_lossy(&trail);
    assert!(!trail_text.contains(&hex), "the audit trail holds the key");
    assert!(
        !trail.windows(key.len()).any(|w| w == &key[..]),
        "the audit trail holds the key"
    );
}

#[test]
fn the_daemon_refuses_and_hands_out_nothing() {
    let dir = TestDir::new("dm-refuse");
    let (d, _) = daemon_with_volume(&dir);
    let path = volume_path(&dir);
    let mut c = Control::connect(&d);

    // Attached through NBD: refused, and nothing in the pipe.
    d.ctl.run(&["attach", "v", "--transient"]).assert_success();
    let (r, bytes) = c.open(open_request("v", "v-dm"));
    expect_error(
        r,
        ErrorCode::Conflict,
        "volume v is attached through NBD (export v): detach it first ('cryptnbdctl detach v')",
    );
    assert!(bytes.is_empty());
    d.ctl.run(&["detach", "v"]).assert_success();

    // Another user's volume: refused before any KMS call.
    for (r, needle) in [
        (
            OpenDmCryptRequest {
                sid: Some("S-1-5-21-1-2-3-1000".into()),
                ..open_request("v", "v-dm")
            },
            "belongs to SID",
        ),
        (
            OpenDmCryptRequest {
                directory: Some("d-0000000000".into()),
                ..open_request("v", "v-dm")
            },
            "belongs to directory",
        ),
    ] {
        let (r, bytes) = c.open(r);
        expect_error(r, ErrorCode::KmsRefused, needle);
        assert!(bytes.is_empty());
    }

    // Bad names, no such volume, no pipe, a file instead of a pipe.
    let (r, _) = c.open(open_request("v", "-v"));
    expect_error(r, ErrorCode::InvalidRequest, "invalid dm-crypt name '-v'");
    let (r, _) = c.open(open_request("nope", "v-dm"));
    expect_error(r, ErrorCode::NotFound, "no volume nope");
    expect_error(
        c.call(Request::OpenDmCrypt(open_request("v", "v-dm")), None),
        ErrorCode::InvalidRequest,
        "needs the write end of a pipe",
    );
    let file = std::fs::File::create(dir.join("not-a-pipe")).expect("create");
    expect_error(
        c.call(
            Request::OpenDmCrypt(open_request("v", "v-dm")),
            Some(file.as_fd()),
        ),
        ErrorCode::InvalidRequest,
        "never into a file",
    );
    assert_eq!(file.metadata().expect("stat").len(), 0);

    // A changed context: the KMS refuses to unwrap (audited like a refused attach).
    set_context_pair(&path, "classification", "secret");
    let (r, bytes) = c.open(open_request("v", "v-dm"));
    expect_error(r, ErrorCode::KmsRefused, "unwrap the volume key");
    assert!(bytes.is_empty());

    // Close of a mapping that does not exist.
    expect_error(
        c.call(
            Request::CloseDmCrypt {
                name: "v-dm".into(),
            },
            None,
        ),
        ErrorCode::NotFound,
        "there is no device-mapper device v-dm",
    );

    let records = audit_records(&d.ctl);
    let opened = records_of(&records, "open-dm-crypt");
    assert_eq!(opened.len(), 3, "{records:?}");
    assert!(opened.iter().all(|r| r["outcome"] != "ok"), "{records:?}");
    // The volume is not held after a refusal.
    let ops = d.ctl.run(&["--json", "operations"]).assert_success().json();
    assert_eq!(ops["operations"], serde_json::json!([]), "{ops}");
}

/// A stand-in for cryptsetup on a host without device-mapper: it records its arguments,
/// checks the key it reads on its standard input against the volume's header with the real
/// cryptsetup (on a copy), and exits with `STANDIN_EXIT` (default 1) and a message, as
/// cryptsetup does when it cannot map.
fn stand_in(dir: &TestDir) -> PathBuf {
    let script = dir.join("cryptsetup-stand-in");
    let out = dir.path().display().to_string();
    std::fs::write(dir.join("new.pass"), "a passphrase for the copy").expect("write");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             printf '%s\\n' \"$@\" > '{out}/args'\n\
             for a; do path=\"${{last:-}}\"; last=\"$a\"; done\n\
             cp \"$path\" '{out}/standin.copy.luks'\n\
             '{cs}' luksAddKey --key-size 512 --volume-key-file /proc/self/fd/0 --pbkdf pbkdf2 \
             --pbkdf-force-iterations 1000 --batch-mode '{out}/standin.copy.luks' '{out}/new.pass'\n\
             echo $? > '{out}/verified'\n\
             rm -f '{out}/standin.copy.luks'\n\
             echo 'stand-in: Cannot initialize device-mapper.' >&2\n\
             exit \"${{STANDIN_EXIT:-1}}\"\n",
            cs = cryptsetup().display()
        ),
    )
    .expect("write the stand-in");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    script
}

/// `cryptnbdctl ARGS` in a private mount namespace whose `/dev/mapper/control` is
/// `/dev/null` (so the CLI's device-mapper check passes on this kernel), with `env`.
fn ctl_in_dm_namespace(ctl: &Ctl, args: &[&str], env: &[(&str, &Path)]) -> e2e_tests::Outcome {
    let mut unshare = Command::new("unshare");
    unshare.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind /dev/null /dev/mapper/control && exec \"$@\"",
        "sh",
    ]);
    let mut outer = e2e_tests::wrapped(unshare, &ctl.command(args));
    for (k, v) in env {
        outer.env(k, v);
    }
    run(&mut outer)
}

#[test]
fn the_cli_hands_the_key_to_cryptsetup_on_its_stdin() {
    let dir = TestDir::new("dm-cli");
    let (d, _) = daemon_with_volume(&dir);
    let path = volume_path(&dir);
    let script = stand_in(&dir);
    let env = [("CRYPTNBD_CRYPTSETUP", script.as_path())];
    let args_file = dir.join("args");
    let verified = dir.join("verified");

    let out = ctl_in_dm_namespace(&d.ctl, &["open", "v", "--dm-crypt", "v-dm"], &env);
    out.assert_code(1).assert_stderr_contains(
        "cryptsetup open failed (exit 1: stand-in: Cannot initialize device-mapper.); v was \
             not opened",
    );
    let args = std::fs::read_to_string(&args_file).expect("the stand-in ran");
    assert_eq!(
        args.lines().collect::<Vec<_>>(),
        [
            "open",
            "--type",
            "luks2",
            "--key-size",
            "512",
            "--volume-key-file",
            "/proc/self/fd/0",
            path.to_str().expect("utf-8"),
            "v-dm"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(&verified).expect("verified").trim(),
        "0",
        "the real cryptsetup refused the key the stand-in read on its stdin"
    );
    // Reported, audited, and the volume is free again at once.
    let records = audit_records(&d.ctl);
    assert_eq!(records_of(&records, "open-dm-crypt")[0]["outcome"], "ok");
    assert_eq!(
        records_of(&records, "dm-crypt-opened")[0]["outcome"],
        "cryptsetup open failed: exit 1: stand-in: Cannot initialize device-mapper."
    );
    d.ctl.run(&["attach", "v", "--transient"]).assert_success();

    // Attached through NBD: refused before cryptsetup runs.
    let _ = std::fs::remove_file(&args_file);
    ctl_in_dm_namespace(&d.ctl, &["open", "v", "--dm-crypt", "v-dm"], &env)
        .assert_code(4)
        .assert_stderr_contains("volume v is attached through NBD");
    assert!(!args_file.exists());
    d.ctl.run(&["detach", "v"]).assert_success();

    // Another user's volume: the KMS exit code, before cryptsetup runs.
    ctl_in_dm_namespace(
        &d.ctl,
        &[
            "open",
            "v",
            "--dm-crypt",
            "v-dm",
            "--sid",
            "S-1-5-21-1-2-3-1000",
        ],
        &env,
    )
    .assert_code(5)
    .assert_stderr_contains("belongs to SID");
    assert!(!args_file.exists());

    // Read-only; cryptsetup's "device exists or is busy" (exit 5) is a conflict.
    let busy = [
        ("CRYPTNBD_CRYPTSETUP", script.as_path()),
        ("STANDIN_EXIT", Path::new("5")),
    ];
    ctl_in_dm_namespace(
        &d.ctl,
        &["open", "v", "--dm-crypt", "v-dm", "--read-only"],
        &busy,
    )
    .assert_code(4);
    let args = std::fs::read_to_string(&args_file).expect("the stand-in ran");
    assert!(args.lines().any(|l| l == "--readonly"), "{args}");
    assert_eq!(
        std::fs::read_to_string(&verified).expect("verified").trim(),
        "0"
    );
}

#[test]
fn the_cli_says_what_is_missing_before_any_key_is_handed_out() {
    let dir = TestDir::new("dm-missing");
    let (d, _) = daemon_with_volume(&dir);

    // This kernel has no device-mapper.
    d.ctl
        .run(&["open", "v", "--dm-crypt", "v-dm"])
        .assert_code(11)
        .assert_stderr_contains(
            "dm-crypt is not available on this host: the kernel has no device-mapper \
             (/dev/mapper/control: ",
        )
        .assert_stderr_contains("modprobe dm_crypt")
        .assert_stderr_contains("cryptnbdctl attach");

    // No cryptsetup.
    let missing = dir.join("no-cryptsetup");
    let out = run(d
        .ctl
        .command(&["open", "v", "--dm-crypt", "v-dm"])
        .env("CRYPTNBD_CRYPTSETUP", &missing));
    out.assert_code(11).assert_stderr_contains(&format!(
        "CRYPTNBD_CRYPTSETUP names {}, which is not an executable file",
        missing.display()
    ));

    // Not root (the daemon refuses too: see the unit test `only_root_may_hand_out_keys`;
    // a non-root caller cannot reach it here without a control socket it may open).
    let out = run(Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&d.ctl.bin)
        .args(["open", "v", "--dm-crypt", "v-dm"]));
    out.assert_code(10)
        .assert_stderr_contains("only root may open a volume with dm-crypt");

    // Bad names are usage errors.
    d.ctl
        .run(&["open", "v", "--dm-crypt", "a/b"])
        .assert_code(2)
        .assert_stderr_contains("invalid dm-crypt name 'a/b'");

    // No key was handed out.
    assert!(
        records_of(&audit_records(&d.ctl), "open-dm-crypt").is_empty(),
        "a key was handed out"
    );

    // `close` of a name that is not a mapping.
    d.ctl
        .run(&["close", "v-dm"])
        .assert_code(3)
        .assert_stderr_contains("there is no device-mapper device v-dm");
}

#[test]
fn a_volume_held_for_a_client_that_never_reports_is_freed_by_cancel() {
    let dir = TestDir::new("dm-cancel");
    let (d, _) = daemon_with_volume(&dir);
    let mut c = Control::connect(&d);
    let (r, key) = c.open(open_request("v", "v-dm"));
    assert!(matches!(r, Ok(Response::DmCryptKeySent(_))), "{r:?}");
    assert_eq!(key.len(), 64);
    // The name is taken while the key is out, for any volume.
    d.ctl.create_volume("w", "16M", "alias/dm", 4096, &[]);
    let (r, bytes) = c.open(open_request("w", "v-dm"));
    expect_error(
        r,
        ErrorCode::Conflict,
        "the device-mapper name v-dm is being given to volume v now",
    );
    assert!(bytes.is_empty());
    drop(c);
    // Held (the client went away without reporting; no mapping can appear on this kernel)
    // until cancelled, as the refusal says.
    d.ctl
        .run(&["delete", "v", "--yes"])
        .assert_code(4)
        .assert_stderr_contains("'cryptnbdctl cancel v'");
    d.ctl.run(&["cancel", "v"]).assert_success();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ops = d.ctl.run(&["--json", "operations"]).assert_success().json();
        if ops["operations"] == serde_json::json!([]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still held: {ops}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let records = audit_records(&d.ctl);
    let reported = records_of(&records, "dm-crypt-opened");
    assert_eq!(reported.len(), 1, "{records:?}");
    assert_eq!(
        reported[0]["outcome"],
        "no mapping v-dm appeared (cancelled)"
    );
    // The record's latency is how long the volume was held, not the whole hold period.
    assert!(
        reported[0]["latency_ms"]
            .as_u64()
            .is_some_and(|ms| ms < 60_000),
        "{}",
        reported[0]
    );
    d.ctl.run(&["attach", "v", "--transient"]).assert_success();
}
