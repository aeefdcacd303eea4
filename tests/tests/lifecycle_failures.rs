//! Bad input and failures of the volume lifecycle, through the running daemon and the real
//! CLI, no mocks: a full filesystem in the middle of an import, a rebuild, a snapshot copy, a
//! re-encryption and an export (tmpfs with a size limit, so the kernel says ENOSPC); `--json`
//! progress events; a source image that shrinks or grows while it is read; missing, wrong
//! and oversized images; an existing snapshot name; a block device and a relative path as
//! the image.
//!
//! After every failure: the exit code (docs/cli.md, "Exit codes"), an error on stderr that
//! names the thing and says what to do, nothing on stdout with `--json`, no hidden temporary
//! left in the state directory, and the volume holding exactly its old content, read back
//! through a real NBD client (nbdcopy). Needs root for the tmpfs and loop-device tests.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::daemon::Daemon;
use e2e_tests::{Outcome, TEST_DIRECTORY, TEST_SID, TestDir, TestRng, require_tool, run};
use serde_json::Value;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Writes a `len`-byte image: a 1 MiB random block repeated, each copy stamped with its index
/// (cheap to make at 256 MiB, and no two MiB alike). Returns its bytes.
#[track_caller]
fn write_image(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let block = TestRng::new(seed).bytes(MIB as usize);
    let mut data = Vec::with_capacity(len as usize + MIB as usize);
    let mut i = 0u64;
    while (data.len() as u64) < len {
        let at = data.len();
        data.extend_from_slice(&block);
        data[at..at + 8].copy_from_slice(&i.to_le_bytes());
        i += 1;
    }
    data.truncate(len as usize);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    data
}

/// Asserts that `export` holds `head` followed by zeros up to `size` (its whole content).
#[track_caller]
fn assert_content(d: &Daemon, export: &str, head: &[u8], size: u64, scratch: &Path, when: &str) {
    let got = d.read_export(export, scratch);
    assert_eq!(
        got.len() as u64,
        size,
        "{when}: export {export} changed size"
    );
    let (a, b) = got.split_at(head.len());
    e2e_tests::assert_bytes_eq(a, head, &format!("{when}: the content of {export}"));
    assert!(
        b.iter().all(|&x| x == 0),
        "{when}: {export} has data after its old content"
    );
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `create NAME --from-image IMAGE ...` through the daemon, not asserted.
fn import(d: &Daemon, name: &str, image: &Path, extra: &[&str]) -> Outcome {
    let img = s(image);
    let mut args = vec![
        "--json",
        "create",
        name,
        "--from-image",
        &img,
        "--kms-key",
        "alias/e2e",
        "--sid",
        TEST_SID,
        "--directory",
        TEST_DIRECTORY,
    ];
    args.extend_from_slice(extra);
    d.ctl.run(&args)
}

/// The same as a command, to run in the background.
fn import_command(d: &Daemon, name: &str, image: &Path) -> Command {
    let img = s(image);
    d.ctl.command(&[
        "--json",
        "create",
        name,
        "--from-image",
        &img,
        "--kms-key",
        "alias/e2e",
        "--sid",
        TEST_SID,
        "--directory",
        TEST_DIRECTORY,
    ])
}

/// `list --json`, by name.
fn volumes(d: &Daemon) -> Vec<Value> {
    let list = d.ctl.run(&["--json", "list"]).assert_success().json();
    list.as_array()
        .or_else(|| list["volumes"].as_array())
        .cloned()
        .unwrap_or_else(|| panic!("list --json has no volumes: {list}"))
}

fn entry(d: &Daemon, name: &str) -> Option<Value> {
    volumes(d).into_iter().find(|v| v["name"] == name)
}

#[track_caller]
fn assert_no_volume(d: &Daemon, name: &str) {
    assert!(
        entry(d, name).is_none(),
        "a volume {name} was left behind: {:?}",
        entry(d, name)
    );
    let file = d.state_dir.join("volumes").join(format!("{name}.luks"));
    assert!(!file.exists(), "{} was left behind", file.display());
}

#[track_caller]
fn assert_attached(d: &Daemon, name: &str, attached: bool) {
    let e = entry(d, name).unwrap_or_else(|| panic!("volume {name} is gone"));
    assert_eq!(e["attached"], attached, "{e}");
}

/// Hidden files (an operation's temporaries) in the volume and snapshot directories.
fn leftovers(state: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![state.join("volumes")];
    if let Ok(rd) = std::fs::read_dir(state.join("snapshots")) {
        dirs.extend(rd.flatten().map(|e| e.path()));
    }
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect()
}

#[track_caller]
fn assert_no_leftovers(d: &Daemon, when: &str) {
    let l = leftovers(&d.state_dir);
    assert!(l.is_empty(), "{when}: temporaries left behind: {l:?}");
}

/// The JSON progress events a `--json` command wrote on stderr; every other stderr line must
/// be the error (`cryptnbdctl: error: ...` and its `caused by:` lines).
#[track_caller]
fn progress_events(out: &Outcome) -> Vec<Value> {
    let mut events = Vec::new();
    for line in out.stderr.lines() {
        if line.starts_with('{') {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("stderr line of `{}` is not JSON ({e}): {line}", out.command)
            });
            assert_eq!(v["event"], "progress", "{line}");
            events.push(v);
        } else {
            assert!(
                line.starts_with("cryptnbdctl: error: ") || line.starts_with("  caused by: "),
                "unexpected stderr line of `{}`: {line:?}\n{}",
                out.command,
                out.stderr
            );
        }
    }
    events
}

/// Asserts a failure: the exit code, nothing on stdout (with `--json` only the answer goes
/// there), one `cryptnbdctl: error:` line, and every needle somewhere in the error. Returns
/// the error text.
#[track_caller]
fn assert_failed(out: &Outcome, code: i32, needles: &[&str]) -> String {
    out.assert_code(code);
    assert!(
        out.stdout.is_empty(),
        "`{}` failed but wrote on stdout: {}",
        out.command,
        out.stdout_text()
    );
    progress_events(out);
    let errors = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("cryptnbdctl: error: "))
        .count();
    assert_eq!(errors, 1, "one error line expected:\n{}", out.stderr);
    let text: String = out
        .stderr
        .lines()
        .filter(|l| !l.starts_with('{'))
        .collect::<Vec<_>>()
        .join("\n");
    for n in needles {
        assert!(
            text.contains(n),
            "the error of `{}` lacks {n:?}:\n{text}",
            out.command
        );
    }
    text
}

/// Waits until `operation` on `volume` is copying with some bytes done (and not all), as
/// `operations` shows it; fails if `child` ends first.
#[track_caller]
fn wait_copying(d: &Daemon, volume: &str, operation: &str, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ops = d.ctl.run(&["--json", "operations"]).assert_success().json();
        let running = ops["operations"].as_array().and_then(|a| {
            a.iter()
                .find(|o| o["volume"] == volume && o["operation"] == operation)
                .cloned()
        });
        if let Some(o) = running
            && o["phase"] == "copying"
        {
            let (done, total) = (o["done"].as_u64(), o["total"].as_u64());
            if let (Some(done), Some(total)) = (done, total)
                && done > 0
                && done < total
            {
                return;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{operation} of {volume} ended ({status}) before it was seen copying");
        }
        assert!(
            Instant::now() < deadline,
            "{operation} of {volume} was not seen copying within 30 s: {ops}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(child: std::process::Child, what: &str) -> Outcome {
    let out = child.wait_with_output().expect("wait");
    Outcome {
        command: what.into(),
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn spawn(mut cmd: Command) -> std::process::Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cryptnbdctl")
}

// Root-only helpers: a size-limited tmpfs and loop devices, undone when dropped.

#[track_caller]
fn require_root() {
    let uid = run(Command::new("id").arg("-u")).stdout_text();
    assert_eq!(
        uid.trim(),
        "0",
        "this test needs root (it mounts a tmpfs or uses a loop device); run the suite as root"
    );
}

/// Unmounts / detaches in reverse order when dropped, even when the test fails.
struct Cleanup(Vec<(&'static str, Vec<String>)>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (cmd, args) in self.0.iter().rev() {
            let _ = Command::new(cmd).args(args).status();
        }
    }
}

#[track_caller]
fn mount_tmpfs(dir: &Path, size: &str, cleanup: &mut Cleanup) {
    std::fs::create_dir_all(dir).expect("mkdir");
    run(Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir))
    .assert_success();
    cleanup.0.push(("umount", vec!["-l".into(), s(dir)]));
}

/// Bytes free on the filesystem holding `dir`.
#[track_caller]
fn free_bytes(dir: &Path) -> u64 {
    let out = run(Command::new("stat").args(["-f", "-c", "%a %S"]).arg(dir));
    let text = out.assert_success().stdout_text();
    let mut it = text
        .split_whitespace()
        .map(|n| n.parse::<u64>().expect("number"));
    it.next().expect("blocks") * it.next().expect("block size")
}

/// Fills the filesystem of `dir` with a file `dir/filler` until `leave` bytes are free.
#[track_caller]
fn fill_until(dir: &Path, leave: u64) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0x5au8; MIB as usize];
    let mut left = free_bytes(dir).saturating_sub(leave);
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&chunk[..n]).expect("write filler");
        left -= n as u64;
    }
    f.sync_all().expect("sync filler");
    let free = free_bytes(dir);
    assert!(
        free.abs_diff(leave) < MIB,
        "{free} bytes free, wanted {leave}"
    );
    filler
}

// ---------------------------------------------------------------------------------------------
// 1. A full filesystem in the middle of an operation
// ---------------------------------------------------------------------------------------------

/// The state directory is a 64 MiB tmpfs with 8 MiB left free: a rebuild, an import, a
/// snapshot copy and a re-encryption of a 24 MiB volume all run out of space partway, and an
/// export runs out on a 4 MiB tmpfs. Each is refused with ENOSPC in words that say which
/// operation, where, and that nothing changed (exit 8); each leaves no temporary and frees
/// its space; the volume keeps its content and its attachment; another volume is served
/// throughout. Once space is freed the same rebuild succeeds.
#[test]
fn full_filesystem_stops_each_operation_and_changes_nothing() {
    require_root();
    let dir = TestDir::new("lcf-enospc");
    let mut cleanup = Cleanup(Vec::new());
    mount_tmpfs(&dir.state_dir(), "64m", &mut cleanup);
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");
    let volumes_dir = s(&d.state_dir.join("volumes"));

    d.ctl.create_volume("v", "24M", "alias/e2e", 4096, &[]);
    d.ctl.create_volume("w", "4M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    d.ctl.run(&["attach", "w"]).assert_success();
    let old_v = TestRng::new(1).bytes((24 * MIB) as usize);
    let old_w = TestRng::new(2).bytes((4 * MIB) as usize);
    d.write_export("v", &old_v, &scratch);
    d.write_export("w", &old_w, &scratch);
    // The new content lives outside the tmpfs.
    let image = dir.join("new.img");
    let new_v = write_image(&image, 24 * MIB, 3);
    let filler = fill_until(&d.state_dir, 8 * MIB);
    let free_before = free_bytes(&d.state_dir);

    let check = |when: &str| {
        assert_no_leftovers(&d, when);
        // The failed operation gave back every byte it took (no temporary still open).
        let free = free_bytes(&d.state_dir);
        assert!(
            free + 256 * 1024 >= free_before,
            "{when}: {free} bytes free, {free_before} before: space was not given back"
        );
        assert_attached(&d, "v", true);
        assert_content(&d, "v", &old_v, 24 * MIB, &scratch, when);
        assert_content(&d, "w", &old_w, 4 * MIB, &scratch, when);
    };

    // Rebuild of the attached volume (--force): the new copy is built while attached, so
    // the volume is never detached.
    let img = s(&image);
    let out = d
        .ctl
        .run(&["--json", "rebuild", "v", "--from-image", &img, "--force"]);
    assert_failed(
        &out,
        8,
        &[
            "rebuilding volume v needs room for a second copy of it",
            &volumes_dir,
            "is full: free space there and retry",
            "volume v is unchanged",
            "No space left on device",
        ],
    );
    check("after the rebuild ran out of space");

    // Import into a new volume.
    let out = import(&d, "x", &image, &[]);
    assert_failed(
        &out,
        8,
        &[
            &format!("importing {img} into the new volume x"),
            &volumes_dir,
            "is full",
            "nothing was created",
            "No space left on device",
        ],
    );
    assert_no_volume(&d, "x");
    check("after the import ran out of space");

    // A snapshot (tmpfs cannot reflink: a copy).
    let out = d.ctl.run(&["--json", "snapshot", "v", "s1"]);
    assert_failed(
        &out,
        8,
        &[
            "snapshot s1 of volume v needs up to",
            "is full",
            "no snapshot was made and the volume is unchanged",
            "No space left on device",
        ],
    );
    let snaps = d
        .ctl
        .run(&["--json", "snapshots", "v"])
        .assert_success()
        .json();
    assert_eq!(snaps["snapshots"], serde_json::json!([]), "{snaps}");
    check("after the snapshot ran out of space");

    // Re-encryption (--force: detached for it, re-attached after the failure).
    let out = d.ctl.run(&["--json", "reencrypt", "v", "--force"]);
    assert_failed(
        &out,
        8,
        &[
            "re-encrypting volume v needs room for a second copy of it",
            &volumes_dir,
            "volume v is unchanged",
            "No space left on device",
        ],
    );
    check("after the re-encryption ran out of space");

    // A plaintext export onto a small filesystem: the partial file is removed.
    let out_dir = dir.join("out");
    mount_tmpfs(&out_dir, "4m", &mut cleanup);
    let target = out_dir.join("v.raw");
    let t = s(&target);
    d.ctl.run(&["detach", "v"]).assert_success();
    let out = d
        .ctl
        .run(&["--json", "export", "v", "--to", &t, "--plaintext"]);
    assert_failed(
        &out,
        8,
        &[
            &format!("exporting volume v needs 24.0 MiB at {t}"),
            "is full",
            "the partial file is removed",
        ],
    );
    assert!(!target.exists(), "the partial export was left behind");
    d.ctl.run(&["attach", "v"]).assert_success();
    check("after the export ran out of space");

    // Every failure is in the audit trail with its reason.
    let audit = d
        .ctl
        .run(&["--json", "audit", "--volume", "v"])
        .assert_success()
        .json();
    for op in ["rebuild", "snapshot", "reencrypt", "export-plaintext"] {
        let rec = audit
            .as_array()
            .expect("records")
            .iter()
            .rev()
            .find(|r| r["operation"] == op)
            .unwrap_or_else(|| panic!("no {op} record: {audit}"));
        let outcome = rec["outcome"].as_str().unwrap_or_default();
        assert!(outcome.contains("full"), "{op}: {rec}");
    }

    // With room again, the same rebuild goes through.
    std::fs::remove_file(&filler).expect("remove filler");
    d.ctl
        .run(&["--json", "rebuild", "v", "--from-image", &img, "--force"])
        .assert_success();
    assert_content(&d, "v", &new_v, 24 * MIB, &scratch, "after the rebuild");
    assert_content(&d, "w", &old_w, 4 * MIB, &scratch, "after the rebuild");
    assert_no_leftovers(&d, "after the rebuild");
    drop(d);
}

// ---------------------------------------------------------------------------------------------
// 2. --json progress events
// ---------------------------------------------------------------------------------------------

/// Checks the events of one operation: well-formed, for this operation and volume, phases in
/// `phases` order, within a phase the same total and `done` never going back (nor past the
/// total), time never going back. Returns the events.
#[track_caller]
fn check_progress(out: &Outcome, operation: &str, volume: &str, phases: &[&str]) -> Vec<Value> {
    let events = progress_events(out);
    assert!(
        !events.is_empty(),
        "`{}` wrote no progress event:\n{}",
        out.command,
        out.stderr
    );
    let mut prev: Option<(usize, u64, u64, f64)> = None;
    for e in &events {
        assert_eq!(e["operation"], operation, "{e}");
        assert_eq!(e["volume"], volume, "{e}");
        let phase = e["phase"].as_str().expect("phase");
        let at = phases.iter().position(|p| *p == phase).unwrap_or_else(|| {
            panic!("unexpected phase {phase:?} (expected one of {phases:?}): {e}")
        });
        let done = e["done"].as_u64().expect("done");
        let total = e["total"].as_u64().expect("total");
        let elapsed = e["elapsed_s"].as_f64().expect("elapsed_s");
        if total > 0 {
            assert!(done <= total, "done past total: {e}");
        } else {
            assert_eq!(done, 0, "done without a total: {e}");
        }
        if let Some((p_at, p_done, p_total, p_elapsed)) = prev {
            assert!(at >= p_at, "phase went back: {events:?}");
            assert!(elapsed >= p_elapsed, "time went back: {events:?}");
            if at == p_at {
                assert_eq!(total, p_total, "total changed within a phase: {events:?}");
                assert!(done >= p_done, "done went back: {events:?}");
            }
        }
        prev = Some((at, done, total, elapsed));
    }
    // The daemon sends the state the operation ended in before its answer.
    let last = events.last().expect("events");
    assert_eq!(
        last["phase"].as_str(),
        phases.last().copied(),
        "the last event is not the final phase: {events:?}"
    );
    events
}

/// A 256 MiB import, export and re-encryption with `--json`: each writes well-formed
/// progress events on stderr (one when the operation starts, then every 500 ms when it moved,
/// and the final state before the answer) and exactly one JSON document, the answer, on
/// stdout.
#[test]
fn json_progress_events_are_well_formed_and_stdout_is_one_document() {
    let dir = TestDir::new("lcf-progress");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let size = 256 * MIB;
    let image = dir.join("big.img");
    let data = write_image(&image, size, 4);

    let out = import(&d, "p", &image, &[]);
    out.assert_success();
    let created = out.json();
    assert_eq!(created["name"], "p", "{created}");
    assert_eq!(created["size"], size, "{created}");
    let mut events = check_progress(&out, "import", "p", &["starting", "copying", "syncing"]);

    let target = dir.join("p.raw");
    let t = s(&target);
    let out = d
        .ctl
        .run(&["--json", "export", "p", "--to", &t, "--plaintext"]);
    out.assert_success();
    let exported = out.json();
    assert_eq!(exported["bytes"], size, "{exported}");
    events.extend(check_progress(
        &out,
        "export",
        "p",
        &["starting", "copying"],
    ));
    assert!(
        std::fs::read(&target).expect("export") == data,
        "the export differs from the image"
    );
    std::fs::remove_file(&target).expect("rm");

    let out = d.ctl.run(&["--json", "reencrypt", "p"]);
    out.assert_success();
    let re = out.json();
    assert_eq!(re["bytes"], size, "{re}");
    events.extend(check_progress(
        &out,
        "reencrypt",
        "p",
        &["starting", "re-encrypting", "syncing"],
    ));

    // Every sized phase counts the whole volume; at least one event caught one mid-way.
    let sized: Vec<&Value> = events
        .iter()
        .filter(|e| e["phase"] == "copying" || e["phase"] == "re-encrypting")
        .collect();
    for e in &sized {
        assert_eq!(e["total"], size, "{e}");
    }
    assert!(
        sized.iter().any(|e| e["done"].as_u64() > Some(0)),
        "no event showed a copy under way: {events:?}"
    );
    d.ctl.run(&["attach", "p"]).assert_success();
    assert!(
        d.read_export("p", &dir.join("scratch")) == data,
        "content changed by the re-encryption"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A source image that changes while it is read
// ---------------------------------------------------------------------------------------------

/// A 256 MiB image truncated, then one appended to, while `create --from-image` and
/// `rebuild --from-image` read it: refused (exit 2) with "changed while it was read", no
/// volume or temporary left behind, the rebuilt volume unchanged (detached, and attached with
/// --force: it stays attached).
#[test]
fn image_that_shrinks_or_grows_while_read_is_refused() {
    let dir = TestDir::new("lcf-changing");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");
    let size = 256 * MIB;
    let image = dir.join("changing.img");
    let img = s(&image);
    let shrink = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .and_then(|f| f.set_len(MIB))
            .expect("truncate");
    };
    let grow = || {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&image)
            .and_then(|mut f| f.write_all(&vec![0x77u8; MIB as usize]))
            .expect("append");
    };

    // create --from-image, shrinking.
    write_image(&image, size, 5);
    let mut child = spawn(import_command(&d, "c1", &image));
    wait_copying(&d, "c1", "import", &mut child);
    shrink();
    let out = finish(child, "create c1 --from-image (shrinking)");
    assert_failed(
        &out,
        2,
        &[
            &format!("the image {img} ended after"),
            &format!("but {size} were expected"),
            "changed while it was read",
            "nothing was changed",
        ],
    );
    assert_no_volume(&d, "c1");
    assert_no_leftovers(&d, "after a shrinking import");

    // create --from-image, growing.
    write_image(&image, size, 5);
    let mut child = spawn(import_command(&d, "c2", &image));
    wait_copying(&d, "c2", "import", &mut child);
    grow();
    let out = finish(child, "create c2 --from-image (growing)");
    assert_failed(
        &out,
        2,
        &[
            &format!("the image {img} is longer than the {size} bytes expected"),
            "changed while it was read",
        ],
    );
    assert_no_volume(&d, "c2");
    assert_no_leftovers(&d, "after a growing import");

    // rebuild --from-image of a detached volume, shrinking.
    d.ctl.create_volume("r", "256M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "r"]).assert_success();
    let old = TestRng::new(6).bytes((2 * MIB) as usize);
    d.write_export("r", &old, &scratch);
    d.ctl.run(&["detach", "r"]).assert_success();
    write_image(&image, size, 7);
    let mut child = spawn(
        d.ctl
            .command(&["--json", "rebuild", "r", "--from-image", &img]),
    );
    wait_copying(&d, "r", "rebuild", &mut child);
    shrink();
    let out = finish(child, "rebuild r --from-image (shrinking)");
    assert_failed(
        &out,
        2,
        &[
            &format!("the image {img} ended after"),
            "changed while it was read",
            "nothing was changed",
        ],
    );
    assert_no_leftovers(&d, "after a shrinking rebuild");
    assert_attached(&d, "r", false);
    d.ctl.run(&["attach", "r"]).assert_success();
    assert_content(&d, "r", &old, size, &scratch, "after a shrinking rebuild");

    // rebuild --from-image --force of the attached volume, growing.
    write_image(&image, size, 7);
    let mut child =
        spawn(
            d.ctl
                .command(&["--json", "rebuild", "r", "--from-image", &img, "--force"]),
        );
    wait_copying(&d, "r", "rebuild", &mut child);
    grow();
    let out = finish(child, "rebuild r --from-image --force (growing)");
    assert_failed(
        &out,
        2,
        &[
            &format!("the image {img} is longer than the {size} bytes expected"),
            "changed while it was read",
        ],
    );
    assert_no_leftovers(&d, "after a growing rebuild");
    assert_attached(&d, "r", true);
    assert_content(&d, "r", &old, size, &scratch, "after a growing rebuild");
}

// ---------------------------------------------------------------------------------------------
// 4. Missing, wrong and oversized images
// ---------------------------------------------------------------------------------------------

/// A missing image (exit 3, the path named), a directory (exit 2), `--size` smaller than the
/// image (exit 2, before any KMS call or file), an image larger than the volume on rebuild
/// (exit 2, no advice to give a --size that rebuild does not have), a rebuild of an attached
/// volume without --force (exit 4, refused before the image is even sized), a recorded base
/// image that is gone (exit 3, how to go on), an unknown snapshot (exit 3). Nothing is
/// created, the volume keeps its content and stays attached.
#[test]
fn bad_images_are_refused_and_the_volume_is_untouched() {
    let dir = TestDir::new("lcf-badimg");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");
    let base = dir.join("base.img");
    let base_len = 3 * MIB + 1000;
    write_image(&base, base_len, 8);
    import(&d, "v", &base, &["--record-base"]).assert_success();
    let size = base_len.div_ceil(4096) * 4096;
    d.ctl.run(&["attach", "v"]).assert_success();
    let content = TestRng::new(9).bytes(size as usize);
    d.write_export("v", &content, &scratch);
    let untouched = |when: &str| {
        assert_no_leftovers(&d, when);
        assert_attached(&d, "v", true);
        assert_content(&d, "v", &content, size, &scratch, when);
    };
    let missing = dir.join("no-such.img");
    let m = s(&missing);
    let a_dir = dir.join("a-directory");
    std::fs::create_dir(&a_dir).expect("mkdir");
    let ad = s(&a_dir);

    // create --from-image.
    let out = import(&d, "x", &missing, &[]);
    assert_failed(
        &out,
        3,
        &[&format!("cannot open the image {m}"), "No such file"],
    );
    let out = import(&d, "x", &a_dir, &[]);
    assert_failed(
        &out,
        2,
        &[
            &format!("the image {ad} is a directory"),
            "give the path of an image file",
        ],
    );
    let out = import(&d, "x", &base, &["--size", "1M"]);
    assert_failed(
        &out,
        2,
        &[
            &format!(
                "the image {} is {base_len} bytes, larger than the --size of 1048576 bytes",
                s(&base)
            ),
            &format!("give --size {size} or more"),
            "nothing was created",
        ],
    );
    assert_no_volume(&d, "x");
    untouched("after the refused imports");

    // rebuild --from-image.
    let out = d
        .ctl
        .run(&["--json", "rebuild", "v", "--from-image", &m, "--force"]);
    assert_failed(
        &out,
        3,
        &[&format!("cannot open the image {m}"), "No such file"],
    );
    let out = d
        .ctl
        .run(&["--json", "rebuild", "v", "--from-image", &ad, "--force"]);
    assert_failed(&out, 2, &[&format!("the image {ad} is a directory")]);
    let larger = dir.join("larger.img");
    let l = s(&larger);
    write_image(&larger, size + 4096, 10);
    let out = d
        .ctl
        .run(&["--json", "rebuild", "v", "--from-image", &l, "--force"]);
    let text = assert_failed(
        &out,
        2,
        &[
            &format!(
                "the image {l} is {} bytes, larger than volume v ({size} bytes)",
                size + 4096
            ),
            &format!("use an image of at most {size} bytes"),
            "nothing was changed",
        ],
    );
    assert!(
        !text.contains("--size"),
        "rebuild has no --size to give: {text}"
    );
    // Attached, no --force: refused first, whatever the image.
    let out = d.ctl.run(&["--json", "rebuild", "v", "--from-image", &l]);
    assert_failed(
        &out,
        4,
        &["volume v is attached", "--force", "nothing was changed"],
    );
    untouched("after the refused rebuilds from images");

    // The recorded base image is gone.
    std::fs::remove_file(&base).expect("rm base");
    let out = d.ctl.run(&["--json", "rebuild", "v", "--force"]);
    assert_failed(
        &out,
        3,
        &[
            &format!(
                "cannot read the recorded base image {} of volume v",
                s(&base)
            ),
            "--from-image PATH or --from-snapshot NAME",
            "No such file",
        ],
    );
    // An unknown snapshot.
    let out = d.ctl.run(&[
        "--json",
        "rebuild",
        "v",
        "--from-snapshot",
        "nope",
        "--force",
    ]);
    assert_failed(
        &out,
        3,
        &["volume v has no snapshot nope", "cryptnbdctl snapshots v"],
    );
    untouched("after the refused rebuilds");
}

// ---------------------------------------------------------------------------------------------
// 5. A snapshot name that exists
// ---------------------------------------------------------------------------------------------

/// Taking a snapshot under an existing name is refused (exit 4) with the name and what to do;
/// the existing snapshot file is byte for byte the same and still restores its content.
/// Malformed names are refused (exit 2).
#[test]
fn existing_snapshot_name_is_refused_and_the_snapshot_kept() {
    let dir = TestDir::new("lcf-snapname");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");
    let size = 4 * MIB;
    d.ctl.create_volume("v", "4M", "alias/e2e", 4096, &[]);
    d.ctl.run(&["attach", "v"]).assert_success();
    let a = TestRng::new(11).bytes(size as usize);
    d.write_export("v", &a, &scratch);
    let taken = d
        .ctl
        .run(&["--json", "snapshot", "v", "s1"])
        .assert_success()
        .json();
    let snap = PathBuf::from(taken["path"].as_str().expect("path"));
    let snap_bytes = std::fs::read(&snap).expect("read snapshot");
    let snap_mtime = std::fs::metadata(&snap)
        .and_then(|m| m.modified())
        .expect("mtime");

    let b = TestRng::new(12).bytes(size as usize);
    d.write_export("v", &b, &scratch);
    let out = d.ctl.run(&["--json", "snapshot", "v", "s1"]);
    assert_failed(
        &out,
        4,
        &[
            "volume v already has a snapshot s1",
            "choose another name or delete it first",
        ],
    );
    for bad in [".hidden", "a/b", "-x"] {
        let out = d.ctl.run(&["--json", "snapshot", "v", "--", bad]);
        assert_failed(&out, 2, &["snapshot name"]);
    }
    assert!(
        std::fs::read(&snap).expect("read snapshot") == snap_bytes,
        "the existing snapshot's file changed"
    );
    assert_eq!(
        std::fs::metadata(&snap)
            .and_then(|m| m.modified())
            .expect("mtime"),
        snap_mtime
    );
    let listed = d
        .ctl
        .run(&["--json", "snapshots", "v"])
        .assert_success()
        .json();
    let names: Vec<&str> = listed["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["s1"], "{listed}");
    assert_no_leftovers(&d, "after the refused snapshots");
    assert_content(&d, "v", &b, size, &scratch, "after the refused snapshots");
    d.ctl
        .run(&["rebuild", "v", "--from-snapshot", "s1", "--force"])
        .assert_success();
    assert_content(&d, "v", &a, size, &scratch, "after restoring s1");
}

// ---------------------------------------------------------------------------------------------
// Other image sources: a block device, a relative path
// ---------------------------------------------------------------------------------------------

/// A block device (a loop device) as the image of `create --from-image` and of
/// `rebuild --from-image`: its size is not in `st_size`, so the CLI must find it and send it.
#[test]
fn block_device_image_is_imported_with_its_size() {
    require_root();
    let losetup = require_tool("losetup", "mount");
    let dir = TestDir::new("lcf-blockdev");
    let mut cleanup = Cleanup(Vec::new());
    let backing = dir.join("backing.img");
    let data = write_image(&backing, 6 * MIB, 13);
    let out = run(Command::new(&losetup)
        .args(["--find", "--show", "--read-only"])
        .arg(&backing));
    out.assert_success();
    let dev = out.stdout_text().trim().to_owned();
    cleanup.0.push(("losetup", vec!["-d".into(), dev.clone()]));
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");

    let created = import(&d, "b", Path::new(&dev), &[])
        .assert_success()
        .json();
    assert_eq!(created["size"], 6 * MIB, "{created}");
    d.ctl.run(&["attach", "b"]).assert_success();
    assert_content(&d, "b", &data, 6 * MIB, &scratch, "after the import");
    d.write_export("b", &TestRng::new(14).bytes(MIB as usize), &scratch);
    d.ctl
        .run(&["--json", "rebuild", "b", "--from-image", &dev, "--force"])
        .assert_success();
    assert_content(&d, "b", &data, 6 * MIB, &scratch, "after the rebuild");
    drop(d);
}

/// `--record-base` with a relative image path records the absolute path, so a later
/// `rebuild` from another working directory finds the image.
#[test]
fn relative_base_image_path_is_recorded_absolute() {
    let dir = TestDir::new("lcf-relative");
    let d = Daemon::start(&dir, "");
    d.ctl.create_key("e2e");
    let scratch = dir.join("scratch.bin");
    let base = dir.join("base.img");
    let data = write_image(&base, 2 * MIB, 15);
    let out = run(d
        .ctl
        .command(&[
            "--json",
            "create",
            "v",
            "--from-image",
            "base.img",
            "--record-base",
            "--kms-key",
            "alias/e2e",
            "--sid",
            TEST_SID,
            "--directory",
            TEST_DIRECTORY,
        ])
        .current_dir(dir.path()));
    out.assert_success();
    let e = entry(&d, "v").expect("v listed");
    assert_eq!(e["base_image"]["path"], s(&base), "{e}");

    d.ctl.run(&["attach", "v"]).assert_success();
    d.write_export("v", &TestRng::new(16).bytes(MIB as usize), &scratch);
    run(d
        .ctl
        .command(&["--json", "rebuild", "v", "--force"])
        .current_dir("/"))
    .assert_success();
    assert_content(&d, "v", &data, 2 * MIB, &scratch, "after the rebuild");
}
