//! The daemon with a real KMS API over HTTP (moto, behind the scripted endpoint of
//! `e2e_tests::kms_proxy` for what moto does not enforce), driven by the real `cryptnbdctl`,
//! data checked through nbdcopy:
//! - the volume lifecycle on AWS KMS: create with a per-volume grant (EBS context keys),
//!   attach, I/O, detach, re-attach, snapshot, rebuild, rekey under a second key (the grant
//!   follows), a changed context refused, the KMS down in the middle of a rebuild, delete
//!   (the grant retired), and the audit trail carrying every call's request id;
//! - key states while attached: a disabled or pending-deletion key keeps the attached volume
//!   working, refuses new attaches and rebuilds, shows in `status`; `on_unusable_key =
//!   "detach"` detaches at once;
//! - `revoke --kms-key`, the kill switch, on both backends (AWS by bare key id, local by
//!   alias).

use std::time::{Duration, Instant};

use e2e_tests::daemon::{Daemon, hold_connection, wait_connections};
use e2e_tests::kms_proxy::{KmsProxy, Reply, Rule};
use e2e_tests::moto::{Moto, bare, daemon_aws_config};
use e2e_tests::{TEST_DIRECTORY, TEST_SID, TestDir, TestRng};
use serde_json::Value;

const MIB: usize = 1 << 20;

/// The daemon's `[kms]` config for AWS KMS at `endpoint` (2 s per attempt, 5 s in all).
fn aws_config(dir: &TestDir, endpoint: &str, extra_kms: &str, extra_aws: &str) -> String {
    daemon_aws_config(dir.path(), endpoint, extra_kms, extra_aws, (2.0, 5.0))
}

/// No credentials from the test's own environment, no instance metadata lookups.
const ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", ""),
    ("AWS_SECRET_ACCESS_KEY", ""),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

fn create(d: &Daemon, name: &str, key: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "--json",
        "create",
        name,
        "--size",
        "32M",
        "--kms-key",
        key,
        "--sid",
        TEST_SID,
        "--directory",
        TEST_DIRECTORY,
    ];
    args.extend_from_slice(extra);
    d.ctl.run(&args).assert_success().json()
}

fn token(d: &Daemon, name: &str) -> serde_json::Map<String, Value> {
    let vol = d.state_dir.join("volumes").join(format!("{name}.luks"));
    e2e_tests::kms_token(&e2e_tests::read_primary_metadata(&vol))
}

fn status(d: &Daemon, name: &str) -> Value {
    d.ctl
        .run(&["--json", "status", name])
        .assert_success()
        .json()
}

/// Waits until `status` of `name` satisfies `cond`.
#[track_caller]
fn wait_status(d: &Daemon, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(d, name);
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} never happened: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The records of `audit --json` (an array, or an object with `records`).
fn audit_records(audit: &Value) -> Vec<Value> {
    audit
        .as_array()
        .or_else(|| audit["records"].as_array())
        .cloned()
        .unwrap_or_else(|| panic!("no audit records in {audit}"))
}

fn attachment(s: &Value) -> &Value {
    s.get("attachments")
        .and_then(|a| a.get(0))
        .or_else(|| s.get("attachment"))
        .unwrap_or(s)
}

#[test]
fn volume_lifecycle_on_aws_kms_with_grants_and_request_ids() {
    let dir = TestDir::new("kmsd-aws");
    let moto = Moto::start();
    let proxy = KmsProxy::start(Some(moto.addr));
    let key1 = moto.create_key("cryptnbd volumes");
    let key2 = moto.create_key("cryptnbd volumes, rotated");
    // Without a configured grantee, the daemon asks STS who it is (moto answers on the same
    // endpoint): moto's caller ARN cannot be a grantee, so the create is refused with what
    // to set, and nothing is left behind.
    let d = Daemon::start_env(
        &dir,
        &aws_config(
            &dir,
            &proxy.url(),
            "",
            &format!("grants = true\nsts_endpoint_url = \"{}\"", proxy.url()),
        ),
        ENV,
    );
    d.ctl
        .run(&[
            "create",
            "v",
            "--size",
            "32M",
            "--kms-key",
            &key1,
            "--sid",
            TEST_SID,
            "--directory",
            TEST_DIRECTORY,
        ])
        .assert_code(2)
        .assert_stderr_contains("set kms.aws.grantee_principal");
    assert!(!d.state_dir.join("volumes/v.luks").exists());
    assert!(moto.grant_ids(&key1).is_empty());
    drop(d);
    let dir = TestDir::new("kmsd-aws-grantee");
    let grantee = "arn:aws:iam::123456789012:role/cryptnbd-host";
    let d = Daemon::start_env(
        &dir,
        &aws_config(
            &dir,
            &proxy.url(),
            "",
            &format!("grants = true\ngrantee_principal = \"{grantee}\""),
        ),
        ENV,
    );
    let scratch = dir.join("scratch");
    let before = proxy.log().len();

    // Create: EBS's context keys, a grant on key1 for this volume only, used at once.
    let created = create(&d, "v", &key1, &["--ebs-context"]);
    assert_eq!(created["name"], "v", "{created}");
    let t = token(&d, "v");
    assert_eq!(t["backend"], "aws");
    assert_eq!(t["key_id"], key1.as_str());
    let volume_id = t["volume_id"].as_str().expect("volume id").to_owned();
    assert_eq!(t["context"]["aws:ebs:id"], volume_id.as_str());
    assert_eq!(
        t["context"]["aws:workspaces:sid-directoryid"],
        format!("[{TEST_SID}]@[{TEST_DIRECTORY}]")
    );
    let grants = moto.grants(&key1);
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(t["grant"]["grant_id"], grants[0]["GrantId"]);
    assert_eq!(
        grants[0]["Constraints"]["EncryptionContextSubset"]["aws:ebs:id"],
        volume_id.as_str()
    );
    assert_eq!(grants[0]["GranteePrincipal"], grantee);
    assert_eq!(grants[0]["RetiringPrincipal"], grantee);
    let decrypts: Vec<usize> = proxy.log()[before..]
        .iter()
        .filter(|r| r.action == "Decrypt")
        .map(|r| r.grant_tokens.len())
        .collect();
    assert_eq!(decrypts, [1], "the grant token was not used at once");

    // Attach, write, read back; detach and re-attach: same data.
    let mut rng = TestRng::new(7);
    let first = rng.bytes(8 * MIB);
    d.ctl.run(&["attach", "v"]).assert_success();
    d.write_export("v", &first, &scratch);
    assert!(d.read_export("v", &scratch)[..8 * MIB] == first[..]);
    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch)[..8 * MIB] == first[..]);

    // Snapshot, overwrite, then rebuild from the snapshot while attached.
    d.ctl.run(&["snapshot", "v", "s1"]).assert_success();
    let second = rng.bytes(8 * MIB);
    d.write_export("v", &second, &scratch);

    // The KMS goes down mid-operation: the rebuild's key check fails with a precise error,
    // the volume is untouched and still served.
    proxy.set_down(true);
    d.ctl
        .run(&["rebuild", "v", "--from-snapshot", "s1", "--force"])
        .assert_code(6)
        .assert_stderr_contains(&proxy.url());
    proxy.set_down(false);
    assert!(d.read_export("v", &scratch)[..8 * MIB] == second[..]);
    d.ctl
        .run(&["rebuild", "v", "--from-snapshot", "s1", "--force"])
        .assert_success();
    assert!(d.read_export("v", &scratch)[..8 * MIB] == first[..]);

    // Rekey under key2 (ReEncrypt): the grant moves to key2, the old one is retired, the
    // data is untouched.
    let r = d
        .ctl
        .run(&["--json", "rekey", "v", "--kms-key", &key2])
        .assert_success()
        .json();
    assert_eq!(r["key_id"], key2.as_str(), "{r}");
    assert!(
        moto.grant_ids(&key1).is_empty(),
        "the old grant was not retired"
    );
    let g2 = moto.grant_ids(&key2);
    assert_eq!(g2.len(), 1);
    assert_eq!(token(&d, "v")["grant"]["grant_id"], g2[0].as_str());
    assert!(d.read_export("v", &scratch)[..8 * MIB] == first[..]);
    d.ctl.run(&["detach", "v"]).assert_success();
    d.ctl.run(&["attach", "v"]).assert_success();
    assert!(d.read_export("v", &scratch)[..8 * MIB] == first[..]);
    d.ctl.run(&["detach", "v"]).assert_success();

    // A changed context is refused by the KMS, and the volume opens again once put back.
    let vol = d.state_dir.join("volumes/v.luks");
    let set_id = |id: &str| e2e_tests::set_context_pair(&vol, "aws:workspaces:sid-directoryid", id);
    set_id(&format!("[{TEST_SID}]@[d-9999abcd99]"));
    d.ctl
        .run(&["attach", "v"])
        .assert_code(5)
        .assert_stderr_contains("encryption context");
    set_id(&format!("[{TEST_SID}]@[{TEST_DIRECTORY}]"));
    d.ctl.run(&["attach", "v"]).assert_success();
    d.ctl.run(&["detach", "v"]).assert_success();

    // The audit trail has one record per KMS call with the id the KMS gave, naming the
    // volume: the ids are those moto answered with (CloudTrail's requestID on AWS).
    let audit = d
        .ctl
        .run(&["--json", "audit", "--volume", "v"])
        .assert_success()
        .json();
    let records = audit_records(&audit);
    let kms_records: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["operation"]
                .as_str()
                .is_some_and(|o| o.starts_with("kms:"))
        })
        .collect();
    let answered: Vec<String> = proxy
        .log()
        .iter()
        .filter(|r| r.handled == "forwarded" && !r.action.is_empty())
        .filter_map(|r| r.request_id.clone())
        .collect();
    for op in [
        "kms:GenerateDataKey",
        "kms:CreateGrant",
        "kms:Decrypt",
        "kms:ReEncrypt",
        "kms:RetireGrant",
    ] {
        let rec = kms_records
            .iter()
            .find(|r| r["operation"] == op)
            .unwrap_or_else(|| panic!("no {op} record in {kms_records:?}"));
        let id = rec["request_id"].as_str().expect("request_id");
        assert!(
            answered.iter().any(|a| a == id),
            "{op}: {id} not among {answered:?}"
        );
        assert_eq!(rec["volume"], "v", "{rec}");
    }
    let refused = kms_records
        .iter()
        .find(|r| {
            r["operation"] == "kms:Decrypt"
                && r["outcome"]
                    .as_str()
                    .is_some_and(|o| o.contains("encryption context"))
        })
        .expect("the refused Decrypt is audited");
    let unreachable = kms_records
        .iter()
        .find(|r| {
            r["operation"] == "kms:Decrypt"
                && r["outcome"]
                    .as_str()
                    .is_some_and(|o| o.contains("cannot reach"))
        })
        .expect("the Decrypt that found the KMS down is audited");
    assert!(unreachable.get("request_id").is_none(), "{unreachable}");
    assert!(refused["request_id"].is_string(), "{refused}");
    let text = d
        .ctl
        .run(&["audit", "--volume", "v"])
        .assert_success()
        .stdout_text();
    assert!(text.contains("request "), "{text}");

    // Delete: the volume, its snapshot, and its grant.
    d.ctl
        .run(&["delete", "v", "--with-snapshots", "--yes"])
        .assert_success();
    assert!(
        moto.grant_ids(&key2).is_empty(),
        "the grant outlived the volume"
    );
    assert!(!vol.exists());
}

#[test]
fn key_states_while_attached_follow_ebs_and_detach_when_configured() {
    let dir = TestDir::new("kmsd-states");
    let moto = Moto::start();
    let proxy = KmsProxy::start(Some(moto.addr));
    let key = moto.create_key("states");
    let d = Daemon::start_env(
        &dir,
        &aws_config(&dir, &proxy.url(), "key_check_interval_secs = 1", ""),
        ENV,
    );
    let scratch = dir.join("scratch");
    create(&d, "a", &key, &[]);
    create(&d, "b", &key, &[]);
    let data = TestRng::new(3).bytes(4 * MIB);
    d.ctl.run(&["attach", "a"]).assert_success();
    d.write_export("a", &data, &scratch);
    wait_status(&d, "a", "first key check", |s| {
        attachment(s)["key_state"] == "Enabled"
    });

    // Disabled, as AWS does it: DescribeKey says so (moto), crypto calls get
    // DisabledException (the scripted endpoint; moto would still decrypt).
    moto.admin("disable_key", &key);
    proxy.push(
        Rule::on(
            &["Decrypt", "GenerateDataKey", "ReEncrypt"],
            Reply::error(409, "DisabledException", &format!("{key} is disabled.")),
        )
        .for_key(bare(&key)),
    );
    let s = wait_status(&d, "a", "the disabled key seen", |s| {
        attachment(s)["key_state"] == "Disabled"
    });
    assert_eq!(attachment(&s)["kms_key"], key.as_str());
    // The attached volume keeps working (its key is in memory).
    assert!(d.read_export("a", &scratch)[..4 * MIB] == data[..]);
    d.write_export("a", &data, &scratch);
    let text = d.ctl.run(&["status", "a"]).assert_success().stdout_text();
    assert!(text.contains("Disabled"), "{text}");
    // New attaches and rebuilds are refused with what to do.
    d.ctl
        .run(&["attach", "b"])
        .assert_code(5)
        .assert_stderr_contains("is disabled")
        .assert_stderr_contains("aws kms enable-key");
    d.ctl.run(&["snapshot", "a", "s"]).assert_success();
    d.ctl
        .run(&["rebuild", "a", "--from-snapshot", "s", "--force"])
        .assert_code(5);
    assert!(d.log_text().contains("not usable"), "no warning in the log");

    // Pending deletion: refused with how to cancel it.
    proxy.clear();
    moto.admin("enable_key", &key);
    moto.admin("schedule_key_deletion", &key);
    proxy.push(
        Rule::on(
            &["Decrypt"],
            Reply::error(
                409,
                "KMSInvalidStateException",
                &format!("{key} is pending deletion."),
            ),
        )
        .for_key(bare(&key)),
    );
    wait_status(&d, "a", "pending deletion seen", |s| {
        attachment(s)["key_state"] == "PendingDeletion"
    });
    d.ctl
        .run(&["attach", "b"])
        .assert_code(5)
        .assert_stderr_contains("aws kms cancel-key-deletion");

    // Usable again: attaches work.
    proxy.clear();
    moto.admin("cancel_key_deletion", &key);
    moto.admin("enable_key", &key);
    wait_status(&d, "a", "the key usable again", |s| {
        attachment(s)["key_state"] == "Enabled"
    });
    d.ctl.run(&["attach", "b"]).assert_success();

    // Revoke on AWS KMS, by the bare key id (the tokens hold the ARN): both detached.
    let r = d
        .ctl
        .run(&["--json", "revoke", "--kms-key", bare(&key)])
        .assert_success()
        .json();
    assert_eq!(r["key_id"], key.as_str(), "{r}");
    assert_eq!(r["detached"].as_array().map(Vec::len), Some(2), "{r}");
    let s = d.ctl.run(&["--json", "status"]).assert_success().json();
    assert!(!s.to_string().contains("\"volume\":\"a\""), "{s}");
    drop(d);

    // With on_unusable_key = "detach", a disabled key detaches its volumes at once.
    let dir2 = TestDir::new("kmsd-states-detach");
    std::fs::create_dir_all(dir2.state_dir()).expect("state");
    let d = Daemon::start_env(
        &dir2,
        &aws_config(
            &dir2,
            &proxy.url(),
            "key_check_interval_secs = 1\non_unusable_key = \"detach\"",
            "",
        ),
        ENV,
    );
    create(&d, "c", &key, &[]);
    d.ctl.run(&["attach", "c"]).assert_success();
    moto.admin("disable_key", &key);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = d.ctl.run(&["--json", "list"]).assert_success().json();
        let attached = list.to_string().contains("\"attached\":true");
        if !attached {
            break;
        }
        assert!(Instant::now() < deadline, "c was not detached: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let audit = d
        .ctl
        .run(&["--json", "audit", "--volume", "c"])
        .assert_success()
        .json();
    assert!(
        audit.to_string().contains("key-unusable-detach"),
        "the detach is not audited: {audit}"
    );
}

#[test]
fn revoke_detaches_every_volume_under_a_key_on_the_local_kms() {
    let dir = TestDir::new("kmsd-revoke");
    let d = Daemon::start(&dir, "");
    let scratch = dir.join("scratch");
    let compromised = d.ctl.create_key("compromised");
    d.ctl.create_key("other");
    for (name, key) in [
        ("a", "alias/compromised"),
        ("b", "alias/compromised"),
        ("c", "alias/other"),
    ] {
        create(&d, name, key, &[]);
        d.ctl.run(&["attach", name]).assert_success();
    }
    let data = TestRng::new(11).bytes(MIB);
    d.write_export("a", &data, &scratch);

    // A client holding a connection to `a` is cut off.
    let mut holder = hold_connection(&d.uri("a"));
    wait_connections(&d, "a", 1);

    let r = d
        .ctl
        .run(&["--json", "revoke", "--kms-key", "alias/compromised"])
        .assert_success()
        .json();
    assert_eq!(r["key_id"], compromised.as_str(), "{r}");
    let mut detached: Vec<&str> = r["detached"]
        .as_array()
        .expect("detached")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    detached.sort_unstable();
    assert_eq!(detached, ["a", "b"], "{r}");
    let list = d.ctl.run(&["--json", "list"]).assert_success().json();
    let attached: Vec<String> = list
        .as_array()
        .expect("volumes")
        .iter()
        .filter(|v| v["attached"] == true)
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(attached, ["c"], "{list}");
    let _ = holder.kill();
    let _ = holder.wait();
    // The audit trail names the key and the volumes.
    let audit = d.ctl.run(&["--json", "audit"]).assert_success().json();
    let revoke = audit_records(&audit)
        .iter()
        .find(|r| r["operation"] == "revoke")
        .expect("revoke record")
        .clone();
    assert_eq!(revoke["key_id"], compromised.as_str());
    assert!(
        revoke["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("a, b")),
        "{revoke}"
    );
    // Nothing to revoke: says so, exit 0.
    let out = d
        .ctl
        .run(&["revoke", "--kms-key", "alias/compromised"])
        .assert_success()
        .stdout_text();
    assert!(out.contains("no attached volume"), "{out}");
    // The volumes are intact: attached again (the key is still enabled), same data.
    d.ctl.run(&["attach", "a"]).assert_success();
    assert!(d.read_export("a", &scratch)[..MIB] == data[..]);
}

/// A slow KMS call holds up only its own volume: while volume A's Decrypt is held 5 s by the
/// endpoint, volume B attaches, detaches and a new volume is created, each in under 1 s, and
/// A's attach is still in flight when each of them has finished.
#[test]
fn a_slow_kms_call_for_one_volume_does_not_stall_the_others() {
    let dir = TestDir::new("kmsd-slow");
    let moto = Moto::start();
    let proxy = KmsProxy::start(Some(moto.addr));
    let key_a = moto.create_key("slow");
    let key_b = moto.create_key("fast");
    // 10 s per attempt: the 5 s delay is an answer that comes late, not a timeout.
    let config = daemon_aws_config(dir.path(), &proxy.url(), "", "", (10.0, 20.0));
    let d = Daemon::start_env(&dir, &config, ENV);
    create(&d, "a", &key_a, &[]);
    create(&d, "b", &key_b, &[]);

    proxy.push(
        Rule::on(&["Decrypt"], Reply::Delay(Duration::from_secs(5)))
            .for_key(bare(&key_a))
            .times(1),
    );
    let slow = {
        let mut cmd = d.ctl.command(&["attach", "a"]);
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = cmd.output().expect("run cryptnbdctl attach a");
            (out, started.elapsed())
        })
    };
    // Only once the endpoint holds A's Decrypt do the others start.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.log().iter().any(|r| {
        r.action == "Decrypt" && r.key.as_deref().is_some_and(|k| k.contains(bare(&key_a)))
    }) {
        assert!(
            Instant::now() < deadline,
            "the endpoint never received A's Decrypt"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let timed = |what: &str, args: &[&str]| {
        let started = Instant::now();
        d.ctl.run(args).assert_success();
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{what} took {took:?} while volume a's Decrypt was held: one lock for all volumes?"
        );
        assert!(
            !slow.is_finished(),
            "volume a's attach finished before {what} did: the test proved nothing"
        );
        took
    };
    let attach_b = timed("attach b", &["attach", "b"]);
    let detach_b = timed("detach b", &["detach", "b"]);
    let create_c = timed(
        "create c",
        &[
            "create",
            "c",
            "--size",
            "32M",
            "--kms-key",
            &key_b,
            "--sid",
            TEST_SID,
            "--directory",
            TEST_DIRECTORY,
        ],
    );
    eprintln!(
        "while a's Decrypt was held: attach b {attach_b:?}, detach b {detach_b:?}, create c {create_c:?}"
    );

    let (out, took) = slow.join().expect("the attach thread");
    assert!(
        out.status.success(),
        "attach a failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= Duration::from_secs(5),
        "attach a took {took:?}: the delay did not apply"
    );
    assert_eq!(attachment(&status(&d, "a"))["volume"], "a");
    d.stop();
}

/// `cryptnbdctl kms` manages the keystore of the daemon that answers on `--socket`: never a
/// keystore of its own default state directory beside it. A `--state-dir` that is not that
/// daemon's is refused (the user pointed at two places), and without a daemon the keystore
/// used is named.
#[test]
fn kms_verbs_use_the_keystore_of_the_daemon_that_answers() {
    let dir = TestDir::new("kms-target");
    let d = Daemon::start(&dir, "");
    let socket = d.ctl.socket.clone().expect("the daemon's socket");

    // --socket to the daemon, --state-dir elsewhere: refused, nothing created there.
    let elsewhere = dir.join("elsewhere");
    let other = e2e_tests::Ctl {
        socket: Some(socket.clone()),
        ..e2e_tests::Ctl::new(&elsewhere)
    };
    other
        .run(&["kms", "create-key", "--alias", "alias/x"])
        .assert_code(4)
        .assert_stderr_contains("is not the state directory of the daemon");
    assert!(
        !elsewhere.exists(),
        "a keystore was made beside the daemon's"
    );

    // --socket alone: the daemon's keystore, named on stderr when it is not the default one.
    let default_keystore = std::path::Path::new("/var/lib/cryptnbd/keystore");
    let had_default = default_keystore.exists();
    let out = std::process::Command::new(&d.ctl.bin)
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "kms", "create-key", "--alias", "alias/via-socket"])
        .env_remove("CRYPTNBD_STATE_DIR")
        .env_remove("CRYPTNBD_SOCKET")
        .env("XDG_STATE_HOME", dir.join("xdg"))
        .output()
        .expect("run cryptnbdctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The CLI's default state directory (/var/lib/cryptnbd as root, else under
    // XDG_STATE_HOME) is never the test daemon's, so the daemon's keystore is named.
    assert!(
        stderr.contains("using the keystore of the daemon"),
        "the keystore used was not named: {stderr}"
    );
    assert_eq!(
        default_keystore.exists(),
        had_default,
        "a default keystore was made"
    );
    assert!(
        !dir.join("xdg").exists(),
        "a keystore was made under XDG_STATE_HOME"
    );
    let listed = d
        .ctl
        .run(&["kms", "list-keys"])
        .assert_success()
        .stdout_text();
    assert!(listed.contains("alias/via-socket"), "{listed}");
    d.stop();

    // No daemon: the state directory's keystore, named.
    let offline = e2e_tests::Ctl::new(&dir.state_dir());
    let out = offline.run(&["kms", "list-keys"]);
    out.assert_success();
    assert!(out.stdout_text().contains("alias/via-socket"));
    out.assert_stderr_contains("no daemon answers")
        .assert_stderr_contains(&dir.state_dir().join("keystore").display().to_string());
}

/// A daemon on AWS KMS has no local keystore: `cryptnbdctl kms` says where its keys are
/// managed instead of making a local keystore nobody uses.
#[test]
fn kms_verbs_are_refused_for_a_daemon_on_aws_kms() {
    let dir = TestDir::new("kms-target-aws");
    let moto = Moto::start();
    let d = Daemon::start_env(&dir, &aws_config(&dir, &moto.url(), "", ""), ENV);
    d.ctl
        .run(&["kms", "create-key", "--alias", "alias/x"])
        .assert_code(4)
        .assert_stderr_contains("uses the aws KMS");
    assert!(
        !d.state_dir.join("keystore").exists(),
        "a local keystore was made"
    );
    d.stop();
}

/// With a daemon running, the key verbs run in the daemon, on its open KMS: a sealed keystore
/// is managed without giving the CLI its passphrase, and each change is audited by the daemon
/// with the caller. Without the daemon the same verbs need the passphrase.
#[test]
fn kms_key_verbs_run_in_the_daemon_that_answers() {
    let dir = TestDir::new("kms-via-daemon");
    let offline = e2e_tests::Ctl::new(&dir.state_dir());
    offline.create_key("first");
    let pass = dir.write_secret("keystore.pass", b"keystore passphrase for the daemon");
    let pass_arg = pass.display().to_string();
    offline
        .run(&["kms", "seal", "--new-passphrase-file", &pass_arg])
        .assert_success();
    // Sealed: the CLI alone cannot use it without the passphrase.
    offline
        .run(&["kms", "list-keys"])
        .assert_code(5)
        .assert_stderr_contains("sealed");

    let d = Daemon::start(&dir, &format!("[kms]\npassphrase_file = \"{pass_arg}\"\n"));
    let created = d
        .ctl
        .run(&[
            "--json",
            "kms",
            "create-key",
            "--alias",
            "alias/through-daemon",
        ])
        .assert_success()
        .json();
    let key_id = created["key_id"].as_str().expect("key id").to_owned();
    d.ctl
        .run(&["kms", "disable-key", "alias/through-daemon"])
        .assert_success();
    let described = d
        .ctl
        .run(&["--json", "kms", "describe-key", &key_id])
        .assert_success()
        .json();
    assert_eq!(described["state"], "Disabled", "{described}");
    let listed = d
        .ctl
        .run(&["kms", "list-keys"])
        .assert_success()
        .stdout_text();
    assert!(
        listed.contains("alias/first") && listed.contains("alias/through-daemon"),
        "{listed}"
    );
    let audit = d.ctl.run(&["--json", "audit"]).assert_success().json();
    let records = audit_records(&audit);
    for op in ["kms-create-key", "kms-disable-key"] {
        let r = records
            .iter()
            .find(|r| r["operation"] == op && r["key_id"] == key_id.as_str())
            .unwrap_or_else(|| panic!("no {op} record of {key_id} in {audit}"));
        assert_eq!(r["outcome"], "ok", "{r}");
        assert!(
            r["caller_uid"].is_u64(),
            "the daemon's record names no caller: {r}"
        );
    }
    d.stop();
}
