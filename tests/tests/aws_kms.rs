//! The AWS KMS backend (`kms_client::aws::AwsKms`, the official SDK) over real HTTP:
//! - against moto (an AWS KMS API server on loopback): GenerateDataKey of 64 bytes, Decrypt
//!   bound to key and context, ReEncrypt, DescribeKey, grants, request ids;
//! - through the scripted endpoint of `e2e_tests::kms_proxy` for what moto does not do: the
//!   real AWS error shapes (DisabledException, KMSInvalidStateException, IncorrectKey,
//!   AccessDenied, NotFound), throttling and server errors (retried with backoff, then a
//!   clear error), slow and dropped connections, an endpoint that is down;
//! - `credential_process`: a profile whose process prints temporary credentials; the
//!   requests are signed with its access key id.
//!
//! Credentials are test strings in files of the test's own directory; nothing reaches the
//! internet.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::TestDir;
use e2e_tests::kms_proxy::{KmsProxy, Reply, Rule};
use e2e_tests::moto::{Moto, REGION, write_aws_files};
use kms_client::aws::{AwsKms, AwsKmsConfig, GrantOp, GrantSpec};
use kms_client::{EncryptionContext, KeyState, Kms, KmsCall, KmsErrorKind};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn settings(endpoint: &str, files: &(std::path::PathBuf, std::path::PathBuf)) -> AwsKmsConfig {
    AwsKmsConfig {
        region: Some(REGION.into()),
        endpoint_url: Some(endpoint.into()),
        config_file: Some(files.0.clone()),
        credentials_file: Some(files.1.clone()),
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        attempt_timeout: Duration::from_secs(2),
        operation_timeout: Duration::from_secs(8),
        ..AwsKmsConfig::default()
    }
}

fn context(volume_id: &str) -> EncryptionContext {
    EncryptionContext::from_pairs([
        (
            "aws:workspaces:sid-directoryid",
            "[S-1-5-21-277731876-1789304096-451871588-1107]@[d-1234abcd01]",
        ),
        ("aws:ebs:id", volume_id),
    ])
    .expect("context")
}

type Calls = Arc<Mutex<Vec<KmsCall>>>;

fn connect(rt: &tokio::runtime::Runtime, cfg: AwsKmsConfig) -> (AwsKms, Calls) {
    let calls: Calls = Arc::default();
    let sink = calls.clone();
    let kms = rt
        .block_on(AwsKms::connect(cfg))
        .expect("connect")
        .with_observer(Arc::new(move |c: &KmsCall| {
            sink.lock().expect("calls").push(c.clone())
        }));
    (kms, calls)
}

#[test]
fn generate_decrypt_reencrypt_describe_and_grants_against_moto() {
    let dir = TestDir::new("aws-moto");
    let moto = Moto::start();
    let proxy = KmsProxy::start(Some(moto.addr));
    let rt = rt();
    let (kms, calls) = connect(&rt, settings(&proxy.url(), &write_aws_files(dir.path())));
    let key1 = moto.create_key("cryptnbd test 1");
    let key2 = moto.create_key("cryptnbd test 2");
    let ctx = context("vol-0123456789abcdef0");

    // 64 bytes: AES-256-XTS needs two AES-256 keys (KeySpec AES_256 would give 32).
    let generated = rt
        .block_on(kms.generate_data_key(&key1, &ctx, 64))
        .expect("GenerateDataKey");
    assert_eq!(generated.plaintext.len(), 64);
    assert_eq!(generated.key_id, key1);
    let debug = format!("{generated:?}");
    assert!(debug.contains("redacted"), "{debug}");

    let back = rt
        .block_on(kms.decrypt(&generated.wrapped, &ctx, &key1))
        .expect("Decrypt");
    assert_eq!(back.expose(), generated.plaintext.expose());

    // Another context: refused as AWS does (InvalidCiphertextException).
    let other = context("vol-0fedcba9876543210");
    let err = rt
        .block_on(kms.decrypt(&generated.wrapped, &other, &key1))
        .expect_err("other context");
    assert_eq!(err.kind(), KmsErrorKind::InvalidCiphertext, "{err}");
    assert!(err.to_string().contains("encryption context"), "{err}");
    assert!(err.request_id().is_some(), "no request id in {err:?}");

    // ReEncrypt to key2 under a new context, then it decrypts there only.
    let mut pairs = ctx.pairs().clone();
    pairs.insert("tenant".into(), "acme".into());
    let ctx2 = EncryptionContext::new(pairs).expect("ctx2");
    let rewrapped = rt
        .block_on(kms.re_encrypt(&generated.wrapped, &ctx, &key1, &key2, &ctx2))
        .expect("ReEncrypt");
    assert_eq!(rewrapped.key_id, key2);
    let again = rt
        .block_on(kms.decrypt(&rewrapped.wrapped, &ctx2, &key2))
        .expect("Decrypt after ReEncrypt");
    assert_eq!(again.expose(), generated.plaintext.expose());
    rt.block_on(kms.decrypt(&rewrapped.wrapped, &ctx, &key2))
        .expect_err("old context after ReEncrypt");

    // DescribeKey follows the key's state.
    let meta = rt.block_on(kms.describe_key(&key1)).expect("DescribeKey");
    assert_eq!(meta.state, KeyState::Enabled);
    assert_eq!(meta.key_id, key1);
    moto.admin("disable_key", &key1);
    let meta = rt.block_on(kms.describe_key(&key1)).expect("DescribeKey");
    assert_eq!(meta.state, KeyState::Disabled);
    moto.admin("schedule_key_deletion", &key2);
    let meta = rt.block_on(kms.describe_key(&key2)).expect("DescribeKey");
    assert_eq!(meta.state, KeyState::PendingDeletion);
    assert!(meta.deletion_date.is_some(), "{meta:?}");
    moto.admin("cancel_key_deletion", &key2);
    moto.admin("enable_key", &key2);
    moto.admin("enable_key", &key1);

    // A grant for one volume: created, used at once with its token, listed, retired.
    let subset =
        EncryptionContext::from_pairs([("aws:ebs:id", "vol-0123456789abcdef0")]).expect("subset");
    let grantee = "arn:aws:iam::123456789012:role/cryptnbd-host";
    let grant = rt
        .block_on(kms.create_grant(&GrantSpec {
            key_id: &key1,
            grantee_principal: grantee,
            retiring_principal: grantee,
            operations: &[GrantOp::Decrypt, GrantOp::ReEncryptFrom],
            context_subset: &subset,
            name: "cryptnbd-vol-0123456789abcdef0",
        }))
        .expect("CreateGrant");
    assert!(!format!("{grant:?}").contains(&grant.grant_token));
    let listed = moto.grants(&key1);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["GrantId"], grant.grant_id.as_str());
    assert_eq!(listed[0]["GranteePrincipal"], grantee);
    assert_eq!(
        listed[0]["Constraints"]["EncryptionContextSubset"]["aws:ebs:id"],
        "vol-0123456789abcdef0"
    );
    let ops: Vec<&str> = listed[0]["Operations"]
        .as_array()
        .expect("ops")
        .iter()
        .filter_map(|o| o.as_str())
        .collect();
    assert_eq!(ops, ["Decrypt", "ReEncryptFrom"]);
    let with_token = rt
        .block_on(kms.decrypt_with_grant_tokens(
            &generated.wrapped,
            &ctx,
            &key1,
            std::slice::from_ref(&grant.grant_token),
        ))
        .expect("Decrypt with the grant token");
    assert_eq!(with_token.expose(), generated.plaintext.expose());
    let last_decrypt = proxy
        .log()
        .into_iter()
        .rfind(|r| r.action == "Decrypt")
        .expect("a Decrypt");
    assert_eq!(
        last_decrypt.grant_tokens,
        std::slice::from_ref(&grant.grant_token)
    );
    assert_eq!(
        rt.block_on(kms.list_grant_ids(&key1)).expect("ListGrants"),
        vec![grant.grant_id.clone()]
    );
    rt.block_on(kms.retire_grant(&key1, &grant.grant_id))
        .expect("RetireGrant");
    assert!(moto.grant_ids(&key1).is_empty());

    // Every call was reported with the request id the server sent, and never a key byte.
    let calls = calls.lock().expect("calls").clone();
    let log = proxy.log();
    assert_eq!(calls.len(), log.len(), "{calls:?}\n{log:?}");
    for (call, seen) in calls.iter().zip(&log) {
        assert_eq!(call.operation, seen.action);
        assert!(call.request_id.is_some(), "{call:?}");
        assert_eq!(call.request_id, seen.request_id, "{call:?} {seen:?}");
    }
}

/// Runs a Decrypt that the endpoint answers with `reply`; returns the error.
fn decrypt_error(rt: &tokio::runtime::Runtime, kms: &AwsKms, key: &str) -> kms_client::KmsError {
    rt.block_on(kms.decrypt(b"wrapped", &context("vol-0123456789abcdef0"), key))
        .expect_err("scripted error")
}

#[test]
fn aws_error_shapes_become_precise_errors() {
    let dir = TestDir::new("aws-errors");
    let proxy = KmsProxy::start(None);
    let rt = rt();
    let (kms, _) = connect(&rt, settings(&proxy.url(), &write_aws_files(dir.path())));
    let key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let cases: &[(u16, &str, &str, KmsErrorKind, &[&str])] = &[
        (
            409,
            "DisabledException",
            &format!("{key} is disabled."),
            KmsErrorKind::KeyDisabled,
            &["is disabled", "aws kms enable-key --key-id"],
        ),
        (
            409,
            "KMSInvalidStateException",
            &format!("{key} is pending deletion."),
            KmsErrorKind::KeyPendingDeletion,
            &[
                "scheduled for deletion",
                "aws kms cancel-key-deletion --key-id",
            ],
        ),
        (
            400,
            "InvalidCiphertextException",
            "",
            KmsErrorKind::InvalidCiphertext,
            &[
                "does not match this key and encryption context",
                "aws:ebs:id",
            ],
        ),
        (
            400,
            "IncorrectKeyException",
            "The key ID in the request does not identify a CMK that can perform this operation.",
            KmsErrorKind::WrongKey,
            &["was not wrapped by KMS key"],
        ),
        (
            400,
            "AccessDeniedException",
            &format!(
                "User: arn:aws:iam::111122223333:user/ops is not authorized to perform: \
                 kms:Decrypt on resource: {key}"
            ),
            KmsErrorKind::AccessDenied,
            &["denied kms:Decrypt on key", "key policy", "user/ops"],
        ),
        (
            404,
            "NotFoundException",
            &format!("Key '{key}' does not exist"),
            KmsErrorKind::KeyNotFound,
            &["has no key", "region eu-west-1"],
        ),
        (
            409,
            "DisabledException",
            &format!("{key} is pending deletion."),
            KmsErrorKind::KeyPendingDeletion,
            &["aws kms cancel-key-deletion --key-id"],
        ),
        (
            409,
            "KMSInvalidStateException",
            &format!("{key} is pending import."),
            KmsErrorKind::KeyDisabled,
            &["not in a state that allows Decrypt", "aws kms describe-key"],
        ),
        (
            400,
            "LimitExceededException",
            "grant quota",
            KmsErrorKind::InvalidRequest,
            &["quota", "list-grants"],
        ),
        (
            400,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
            KmsErrorKind::AccessDenied,
            &["rejected the credentials"],
        ),
        (
            400,
            "com.amazonaws.kms#InvalidGrantTokenException",
            "",
            KmsErrorKind::InvalidRequest,
            &["grant token"],
        ),
    ];
    for (status, code, message, kind, needles) in cases {
        proxy.clear();
        proxy.push(Rule::on(&["Decrypt"], Reply::error(*status, code, message)));
        let before = proxy.count("Decrypt");
        let err = decrypt_error(&rt, &kms, key);
        let text = err.to_string();
        assert_eq!(err.kind(), *kind, "{code}: {text}");
        assert!(text.contains(key), "{code}: the key is not named: {text}");
        for n in *needles {
            assert!(text.contains(n), "{code}: {n:?} missing from: {text}");
        }
        let id = err.request_id().expect("request id");
        assert!(id.starts_with("proxy-"), "{id}");
        assert!(text.contains(id), "{text}");
        // Client errors are not retried; the SDK counts LimitExceeded as throttling and
        // retries it up to max_attempts (3 here).
        let attempts = if *code == "LimitExceededException" {
            3
        } else {
            1
        };
        assert_eq!(proxy.count("Decrypt") - before, attempts, "{code}");
    }
}

#[test]
fn throttling_and_server_errors_are_retried_with_backoff_then_reported() {
    let dir = TestDir::new("aws-retry");
    let moto = Moto::start();
    let proxy = KmsProxy::start(Some(moto.addr));
    let rt = rt();
    let (kms, _) = connect(&rt, settings(&proxy.url(), &write_aws_files(dir.path())));
    let key = moto.create_key("retries");

    // Throttled twice, then served: the third attempt succeeds.
    proxy.push(
        Rule::on(
            &["DescribeKey"],
            Reply::error(400, "ThrottlingException", "Rate exceeded"),
        )
        .times(2),
    );
    let meta = rt
        .block_on(kms.describe_key(&key))
        .expect("after throttling");
    assert_eq!(meta.state, KeyState::Enabled);
    assert_eq!(proxy.count("DescribeKey"), 3);

    // A server error once, then served.
    proxy.clear();
    proxy.push(
        Rule::on(
            &["DescribeKey"],
            Reply::error(500, "KMSInternalException", "internal"),
        )
        .times(1),
    );
    rt.block_on(kms.describe_key(&key)).expect("after a 500");
    assert_eq!(proxy.count("DescribeKey"), 5);

    // Throttled for good: exactly max_attempts tries, then a clear error.
    proxy.clear();
    proxy.push(Rule::on(
        &["DescribeKey"],
        Reply::error(400, "ThrottlingException", "Rate exceeded"),
    ));
    let started = Instant::now();
    let err = rt.block_on(kms.describe_key(&key)).expect_err("throttled");
    assert_eq!(proxy.count("DescribeKey"), 8);
    assert_eq!(err.kind(), KmsErrorKind::Unavailable);
    let text = err.to_string();
    assert!(text.contains("throttled DescribeKey"), "{text}");
    assert!(text.contains("3 attempts"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Dependency timeout (503) for good: retried, then reported as unavailable.
    proxy.clear();
    proxy.push(Rule::on(
        &["DescribeKey"],
        Reply::error(503, "DependencyTimeoutException", "timeout"),
    ));
    let err = rt.block_on(kms.describe_key(&key)).expect_err("503");
    assert_eq!(err.kind(), KmsErrorKind::Unavailable);
    assert!(
        err.to_string().contains("DependencyTimeoutException"),
        "{err}"
    );
    assert_eq!(proxy.count("DescribeKey"), 11);
}

#[test]
fn slow_dropped_and_unreachable_endpoints_fail_within_the_timeouts() {
    let dir = TestDir::new("aws-timeouts");
    let moto = Moto::start();
    let proxy = KmsProxy::start(Some(moto.addr));
    let rt = rt();
    let files = write_aws_files(dir.path());
    let cfg = AwsKmsConfig {
        attempt_timeout: Duration::from_millis(500),
        operation_timeout: Duration::from_secs(3),
        ..settings(&proxy.url(), &files)
    };
    let (kms, calls) = connect(&rt, cfg);
    let key = moto.create_key("timeouts");

    // Slow once: the attempt times out, the retry is served.
    proxy.push(Rule::on(&["DescribeKey"], Reply::Delay(Duration::from_secs(2))).times(1));
    rt.block_on(kms.describe_key(&key))
        .expect("after one slow answer");
    assert_eq!(proxy.count("DescribeKey"), 2);

    // Always slow: an error within the operation timeout, naming what to do.
    proxy.clear();
    proxy.push(Rule::on(
        &["DescribeKey"],
        Reply::Delay(Duration::from_secs(10)),
    ));
    let started = Instant::now();
    let err = rt.block_on(kms.describe_key(&key)).expect_err("slow");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), KmsErrorKind::Unavailable, "{err}");
    let text = err.to_string();
    assert!(text.contains(&proxy.url()), "{text}");
    assert!(
        text.contains("timeout") || text.contains("timed out"),
        "{text}"
    );

    // Connections dropped without an answer: retried, then "cannot reach".
    proxy.clear();
    proxy.push(Rule::on(&["DescribeKey"], Reply::Drop));
    let err = rt.block_on(kms.describe_key(&key)).expect_err("dropped");
    assert_eq!(err.kind(), KmsErrorKind::Unavailable, "{err}");

    // Nothing listening: "cannot reach" with the endpoint.
    proxy.clear();
    proxy.set_down(true);
    let err = rt.block_on(kms.describe_key(&key)).expect_err("down");
    assert_eq!(err.kind(), KmsErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains(&proxy.url()), "{err}");
    proxy.set_down(false);
    rt.block_on(kms.describe_key(&key)).expect("back up");

    // Failed calls are reported too (no request id when nothing answered).
    let calls = calls.lock().expect("calls");
    assert!(
        calls
            .iter()
            .any(|c| c.outcome.is_err() && c.request_id.is_none())
    );
}

fn credential_process_script(dir: &TestDir, marker: &Path) -> std::path::PathBuf {
    let script = dir.join("signing-helper.sh");
    let expires = "2099-01-01T00:00:00Z";
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             # Stands in for IAM Roles Anywhere's aws_signing_helper credential-process.\n\
             echo ran >> '{}'\n\
             cat <<EOF\n\
             {{\"Version\": 1, \"AccessKeyId\": \"ASIAPROCESSTEST00001\", \
             \"SecretAccessKey\": \"process/secret/EXAMPLEKEY\", \
             \"SessionToken\": \"process-session-token\", \"Expiration\": \"{expires}\"}}\n\
             EOF\n",
            marker.display()
        ),
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    script
}

#[test]
fn credential_process_profile_signs_the_requests() {
    let dir = TestDir::new("aws-credproc");
    let moto = Moto::start();
    let proxy = KmsProxy::start(Some(moto.addr));
    let rt = rt();
    let marker = dir.join("ran");
    let script = credential_process_script(&dir, &marker);
    let config = dir.join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile roles-anywhere]\nregion = {REGION}\ncredential_process = {}\n",
            script.display()
        ),
    )
    .expect("config");
    let empty = dir.join("no-credentials");
    std::fs::write(&empty, "").expect("empty credentials");
    let cfg = AwsKmsConfig {
        profile: Some("roles-anywhere".into()),
        config_file: Some(config),
        credentials_file: Some(empty),
        ..settings(&proxy.url(), &(dir.join("unused"), dir.join("unused")))
    };
    let (kms, _) = connect(&rt, cfg);
    let key = moto.create_key("credential process");
    rt.block_on(kms.describe_key(&key)).expect("DescribeKey");
    let ctx = context("vol-0123456789abcdef0");
    rt.block_on(kms.generate_data_key(&key, &ctx, 64))
        .expect("GenerateDataKey");
    assert!(marker.exists(), "the credential process did not run");
    let log = proxy.log();
    assert_eq!(log.len(), 2, "{log:?}");
    for r in &log {
        assert!(
            r.authorization.contains("Credential=ASIAPROCESSTEST00001/"),
            "{} was not signed with the process's key: {}",
            r.action,
            r.authorization
        );
        assert!(
            r.authorization.contains("/eu-west-1/kms/aws4_request"),
            "{}",
            r.authorization
        );
    }
    // Cached until expiry: the process ran once for both calls.
    let runs = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(runs.lines().count(), 1, "{runs}");
}
