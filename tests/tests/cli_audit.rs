//! Offline verbs (no daemon running) write the same audit trail the daemon writes:
//! every local-KMS key operation and every volume create/delete, with key id and outcome,
//! never key material; `cryptnbdctl audit` reads it back and filters it.

use e2e_tests::{Ctl, TestDir};
use serde_json::Value;

#[test]
fn offline_kms_and_volume_operations_are_audited() {
    let dir = TestDir::new("audit");
    let ctl = Ctl::new(&dir.state_dir());
    let key = ctl.create_key("audited");
    ctl.run(&["kms", "disable-key", &key]).assert_success();
    ctl.run(&["kms", "enable-key", &key]).assert_success();
    ctl.run(&["kms", "rotate-key", &key]).assert_success();
    // A refused operation is audited with its error.
    ctl.run(&["kms", "schedule-key-deletion", &key, "--days", "3"])
        .assert_code(2);
    ctl.create_volume("v", "16M", "alias/audited", 4096, &[]);
    ctl.run(&["delete", "v", "--yes"]).assert_success();

    let all = ctl.run(&["--json", "audit"]).assert_success().json();
    let records = all.as_array().expect("records");
    let ops: Vec<&str> = records
        .iter()
        .filter_map(|r| r["operation"].as_str())
        .collect();
    assert_eq!(
        ops,
        [
            "kms-create-key",
            "kms-disable-key",
            "kms-enable-key",
            "kms-rotate-key",
            "kms-schedule-key-deletion",
            "create",
            "delete"
        ],
        "{all}"
    );
    assert!(
        records[..5].iter().all(|r| r["key_id"] == key.as_str()),
        "{all}"
    );
    assert!(
        records[4]["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("7")),
        "{all}"
    );
    let create = &records[5];
    assert_eq!(create["volume"], "v");
    assert_eq!(create["outcome"], "ok");
    assert!(
        create["context"][e2e_tests::SID_DIRECTORY_KEY]
            .as_str()
            .is_some_and(|v| v.contains(e2e_tests::TEST_SID))
    );
    // Filters.
    let only_v = ctl
        .run(&["--json", "audit", "--volume", "v"])
        .assert_success()
        .json();
    assert_eq!(only_v.as_array().map_or(0, Vec::len), 2, "{only_v}");
    let last = ctl
        .run(&["--json", "audit", "--limit", "1"])
        .assert_success()
        .json();
    assert_eq!(last[0]["operation"], "delete");
    ctl.run(&["audit", "--since", "yesterday"]).assert_code(2);
    // Never key material: no field holds a long base64 or hex string.
    let text =
        std::fs::read_to_string(dir.state_dir().join("audit/audit.jsonl")).expect("audit file");
    for rec in text.lines() {
        let v: Value = serde_json::from_str(rec).expect("json line");
        assert!(v.get("wrapped_key").is_none());
    }
    assert!(!text.contains("wrapped_key"));

    // Backup and restore are audited too, in the keystore each one touches.
    let pass = dir.write_secret("backup.pass", b"correct horse battery staple");
    let backup = dir.join("keystore.bak");
    let (pass_s, backup_s) = (
        pass.to_str().expect("utf-8"),
        backup.to_str().expect("utf-8"),
    );
    ctl.run(&[
        "kms",
        "backup",
        "--to",
        backup_s,
        "--passphrase-file",
        pass_s,
    ])
    .assert_success();
    let last = ctl
        .run(&["--json", "audit", "--limit", "1"])
        .assert_success()
        .json();
    assert_eq!(last[0]["operation"], "kms-backup", "{last}");
    assert_eq!(last[0]["outcome"], "ok", "{last}");
    let other = Ctl::new(&dir.join("other-state"));
    other
        .run(&[
            "kms",
            "restore",
            "--from",
            backup_s,
            "--passphrase-file",
            pass_s,
        ])
        .assert_success();
    let restored = other.run(&["--json", "audit"]).assert_success().json();
    assert_eq!(restored[0]["operation"], "kms-restore", "{restored}");
    assert_eq!(restored[0]["outcome"], "ok", "{restored}");
}
