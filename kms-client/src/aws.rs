//! The AWS KMS backend, on the official SDK (`aws-sdk-kms`, `aws-config`).
//!
//! - GenerateDataKey with `NumberOfBytes = 64` (KeySpec `AES_256` would give 32 bytes, that is
//!   AES-128-XTS), Decrypt always with the expected `KeyId` and the full context, ReEncrypt for
//!   rekey, DescribeKey for key states, CreateGrant/RetireGrant for per-volume grants.
//! - Credentials come from the standard chain every AWS tool uses: environment, the shared
//!   config and credentials files (a profile may use `credential_process`, which is how IAM
//!   Roles Anywhere hands out certificate-based credentials), SSO, web identity, the container
//!   and the instance metadata endpoints.
//! - Every call reports its AWS request id to an optional [`CallObserver`] (the daemon writes it
//!   to the audit trail, so a line can be matched with CloudTrail) and in errors.
//! - Errors are mapped to [`KmsErrorKind`]s with messages that name the key, the action and
//!   what to do. Throttling and transient failures are retried by the SDK's standard retry
//!   strategy (exponential backoff with full jitter, bounded attempts), then reported.
//!
//! Plaintext keys: the SDK hands the plaintext over in a `Blob` whose `Vec` is moved (not
//! copied) into a zeroizing [`DataKey`]. The HTTP response buffer it was decoded from is owned
//! by the HTTP stack and is not wiped; the daemon's `mlockall` and non-dumpable state keep it
//! out of swap and core dumps (docs/aws-kms.md says so).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::operation::RequestId;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{GrantConstraints, GrantOperation};
use zeroize::Zeroizing;

pub use crate::aws_config::AwsKmsConfig;
use crate::{
    CallObserver, DataKey, EncryptionContext, GeneratedKey, KeyMetadata, KeyState, Kms, KmsCall,
    KmsError, KmsErrorKind, WrappedKey,
};

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantOp {
    /// `Decrypt`.
    Decrypt,
    /// `ReEncryptFrom`: re-wrap away from this key.
    ReEncryptFrom,
    /// `ReEncryptTo`.
    ReEncryptTo,
    /// `DescribeKey`.
    DescribeKey,
}

impl GrantOp {
    fn to_sdk(self) -> GrantOperation {
        match self {
            GrantOp::Decrypt => GrantOperation::Decrypt,
            GrantOp::ReEncryptFrom => GrantOperation::ReEncryptFrom,
            GrantOp::ReEncryptTo => GrantOperation::ReEncryptTo,
            GrantOp::DescribeKey => GrantOperation::DescribeKey,
        }
    }
}

/// A grant to create on a master key.
#[derive(Debug, Clone)]
pub struct GrantSpec<'a> {
    /// The master key.
    pub key_id: &'a str,
    /// Who may use the grant.
    pub grantee_principal: &'a str,
    /// Who may retire it.
    pub retiring_principal: &'a str,
    /// What it allows.
    pub operations: &'a [GrantOp],
    /// Requests must carry at least these context pairs.
    pub context_subset: &'a EncryptionContext,
    /// A name (AWS deduplicates CreateGrant retries with the same name and parameters).
    pub name: &'a str,
}

/// A grant as CreateGrant returned it.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// The grant id (kept in the volume token, to retire it).
    pub grant_id: String,
    /// The grant token: makes the grant usable at once, before it has propagated.
    pub grant_token: String,
    /// The master key it is on.
    pub key_id: String,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("grant_id", &self.grant_id)
            .field("grant_token", &"(redacted)")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// The AWS KMS backend.
pub struct AwsKms {
    client: aws_sdk_kms::Client,
    sts: aws_sdk_sts::Client,
    config: AwsKmsConfig,
    region: String,
    observer: Option<CallObserver>,
    /// Tokens of the grants this process created, by key: sent with every call on that key,
    /// so a grant works before it has propagated (AWS: up to about five minutes).
    grant_tokens: Mutex<HashMap<String, Vec<(String, String)>>>,
}

/// AWS accepts at most this many grant tokens per request.
const MAX_GRANT_TOKENS: usize = 10;

impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("region", &self.region)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn sdk_map(context: &EncryptionContext) -> HashMap<String, String> {
    context
        .pairs()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl AwsKms {
    /// Loads the AWS configuration (credentials are resolved lazily, on the first call).
    pub async fn connect(config: AwsKmsConfig) -> Result<Self, KmsError> {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout)
            .operation_attempt_timeout(config.attempt_timeout)
            .operation_timeout(config.operation_timeout)
            .build();
        let retry = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(config.max_attempts.max(1))
            .with_initial_backoff(config.initial_backoff)
            .with_max_backoff(config.max_backoff);
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(retry);
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(profile) = &config.profile {
            loader = loader.profile_name(profile);
        }
        if config.config_file.is_some() || config.credentials_file.is_some() {
            use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
            let mut files = EnvConfigFiles::builder();
            if let Some(f) = &config.config_file {
                files = files
                    .include_default_config_file(false)
                    .with_file(EnvConfigFileKind::Config, f);
            } else {
                files = files.include_default_config_file(true);
            }
            if let Some(f) = &config.credentials_file {
                files = files
                    .include_default_credentials_file(false)
                    .with_file(EnvConfigFileKind::Credentials, f);
            } else {
                files = files.include_default_credentials_file(true);
            }
            loader = loader.profile_files(files.build());
        }
        if config.use_fips {
            loader = loader.use_fips(true);
        }
        let shared = loader.load().await;
        let Some(region) = shared.region().map(|r| r.to_string()) else {
            return Err(KmsError::new(
                KmsErrorKind::InvalidRequest,
                "no AWS region is configured: set kms.aws.region in the daemon config, \
                 AWS_REGION, or `region` in the AWS profile",
            ));
        };
        // Each endpoint applies to its own service only (the credential providers, which may
        // call STS or SSO themselves, keep the standard endpoints).
        let mut kms = aws_sdk_kms::config::Builder::from(&shared);
        if let Some(url) = &config.endpoint_url {
            kms = kms.endpoint_url(url);
        }
        let mut sts = aws_sdk_sts::config::Builder::from(&shared);
        if let Some(url) = &config.sts_endpoint_url {
            sts = sts.endpoint_url(url);
        }
        Ok(Self {
            client: aws_sdk_kms::Client::from_conf(kms.build()),
            sts: aws_sdk_sts::Client::from_conf(sts.build()),
            grant_tokens: Mutex::default(),
            config,
            region,
            observer: None,
        })
    }

    /// Reports every call (operation, key, request id, outcome) to `observer`.
    pub fn with_observer(mut self, observer: CallObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The region in use.
    pub fn region(&self) -> &str {
        &self.region
    }

    fn endpoint(&self) -> String {
        match &self.config.endpoint_url {
            Some(url) => url.clone(),
            None if self.config.use_fips => format!("kms-fips.{}.amazonaws.com", self.region),
            None => format!("kms.{}.amazonaws.com", self.region),
        }
    }

    /// Runs one SDK call: times it, reports it to the observer with its request id, and maps
    /// its error.
    async fn call<T, E, Fut>(
        &self,
        operation: &'static str,
        key_id: &str,
        context: Option<&EncryptionContext>,
        fut: Fut,
    ) -> Result<T, KmsError>
    where
        Fut: std::future::Future<
                Output = Result<T, SdkError<E, aws_smithy_runtime_api::http::Response>>,
            >,
        T: RequestId,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        let result = fut.await;
        let latency = started.elapsed();
        let (request_id, mapped) = match result {
            Ok(out) => (out.request_id().map(str::to_owned), Ok(out)),
            Err(err) => {
                let id = err.request_id().map(str::to_owned);
                let e = self.map_error(operation, key_id, context, err, latency);
                (id.clone(), Err(e.with_request_id(id)))
            }
        };
        if let Some(observer) = &self.observer {
            observer(&KmsCall {
                operation,
                key_id: key_id.to_owned(),
                context: context.cloned(),
                request_id: request_id.clone(),
                outcome: match &mapped {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.to_string()),
                },
                latency,
            });
        }
        mapped
    }

    fn map_error<E>(
        &self,
        operation: &str,
        key_id: &str,
        context: Option<&EncryptionContext>,
        err: SdkError<E, aws_smithy_runtime_api::http::Response>,
        latency: Duration,
    ) -> KmsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let request = |id: Option<&str>| match id {
            Some(id) => format!(" (AWS request id {id})"),
            None => String::new(),
        };
        match err {
            SdkError::ServiceError(ref service) => {
                let e = service.err();
                let code = e.code().unwrap_or("UnknownError").to_owned();
                let aws_message = e.message().unwrap_or("").to_owned();
                let rid = request(err.request_id());
                let (kind, message) = self.describe_service_error(
                    operation,
                    key_id,
                    context,
                    &code,
                    &aws_message,
                    service.raw().status().as_u16(),
                );
                KmsError::new(kind, format!("{message}{rid}"))
            }
            SdkError::TimeoutError(_) => KmsError::new(
                KmsErrorKind::Unavailable,
                format!(
                    "AWS KMS at {} did not answer {operation} on key {key_id} within {:.1} s \
                     ({} attempts allowed): check the network path to the endpoint, or raise \
                     kms.aws.operation_timeout_secs",
                    self.endpoint(),
                    latency.as_secs_f64(),
                    self.config.max_attempts
                ),
            ),
            SdkError::DispatchFailure(ref d) => {
                let detail = error_chain(&err);
                if is_credentials_error(&err) {
                    no_credentials(operation, key_id, &detail)
                } else if d.is_timeout() {
                    KmsError::new(
                        KmsErrorKind::Unavailable,
                        format!(
                            "AWS KMS at {} timed out during {operation} on key {key_id}: {detail}",
                            self.endpoint()
                        ),
                    )
                } else {
                    KmsError::new(
                        KmsErrorKind::Unavailable,
                        format!(
                            "cannot reach AWS KMS at {} for {operation} on key {key_id} \
                             (gave up after {} attempts with backoff): {detail}",
                            self.endpoint(),
                            self.config.max_attempts
                        ),
                    )
                }
            }
            other => {
                let detail = error_chain(&other);
                if is_credentials_error(&other) {
                    return no_credentials(operation, key_id, &detail);
                }
                KmsError::new(
                    KmsErrorKind::Unavailable,
                    format!(
                        "AWS KMS at {} gave an unusable answer to {operation} on key {key_id}: \
                         {detail}",
                        self.endpoint()
                    ),
                )
            }
        }
    }

    fn describe_service_error(
        &self,
        operation: &str,
        key_id: &str,
        context: Option<&EncryptionContext>,
        code: &str,
        aws_message: &str,
        status: u16,
    ) -> (KmsErrorKind, String) {
        let said = if aws_message.is_empty() {
            String::new()
        } else {
            format!(" AWS said: {aws_message}")
        };
        match code {
            "DisabledException" | "KMSInvalidStateException"
                if aws_message
                    .to_ascii_lowercase()
                    .contains("pending deletion") =>
            {
                (
                    KmsErrorKind::KeyPendingDeletion,
                    format!(
                        "KMS key {key_id} is scheduled for deletion, so {operation} was refused: \
                         cancel it with `aws kms cancel-key-deletion --key-id {key_id}`, then \
                         `aws kms enable-key --key-id {key_id}`.{said}"
                    ),
                )
            }
            "DisabledException" => (
                KmsErrorKind::KeyDisabled,
                format!(
                    "KMS key {key_id} is disabled, so {operation} was refused: enable it with \
                     `aws kms enable-key --key-id {key_id}` (an attached volume keeps working; \
                     new attaches and rebuilds need the key enabled).{said}"
                ),
            ),
            "KMSInvalidStateException" => (
                KmsErrorKind::KeyDisabled,
                format!(
                    "KMS key {key_id} is not in a state that allows {operation} \
                     (see `aws kms describe-key --key-id {key_id}`).{said}"
                ),
            ),
            "InvalidCiphertextException" => (
                KmsErrorKind::InvalidCiphertext,
                format!(
                    "AWS KMS refused {operation} with key {key_id}: the wrapped volume key does \
                     not match this key and encryption context{}; the header was altered or \
                     belongs to another volume.{said}",
                    match context {
                        Some(c) => format!(" {c}"),
                        None => String::new(),
                    }
                ),
            ),
            "IncorrectKeyException" => (
                KmsErrorKind::WrongKey,
                format!(
                    "the volume key was not wrapped by KMS key {key_id} (IncorrectKeyException \
                     on {operation}): the token names another key than the one that wrapped \
                     it.{said}"
                ),
            ),
            "AccessDeniedException" => (
                KmsErrorKind::AccessDenied,
                format!(
                    "AWS KMS denied kms:{operation} on key {key_id} to this principal: allow it \
                     in the key policy or an IAM policy, or use a grant (docs/aws-kms.md).{said}"
                ),
            ),
            "NotFoundException" => (
                KmsErrorKind::KeyNotFound,
                format!(
                    "AWS KMS has no key {key_id} in region {} (NotFoundException on \
                     {operation}): check the key id or ARN and the region.{said}",
                    self.region
                ),
            ),
            "LimitExceededException" => (
                KmsErrorKind::InvalidRequest,
                format!(
                    "AWS KMS refused {operation} on key {key_id}: a quota is exhausted (for \
                     example 50,000 grants per key; see `aws kms list-grants --key-id \
                     {key_id}`) or the request rate is too high.{said}"
                ),
            ),
            "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "MissingAuthenticationToken" => (
                KmsErrorKind::AccessDenied,
                format!(
                    "AWS KMS rejected the credentials signing {operation} on key {key_id} \
                     ({code}): they are wrong, expired or for another partition; check the \
                     profile or the credential process.{said}"
                ),
            ),
            "ThrottlingException" | "RequestLimitExceeded" => (
                KmsErrorKind::Unavailable,
                format!(
                    "AWS KMS throttled {operation} on key {key_id} ({code}) and still did after \
                     {} attempts with jittered backoff: retry later, or raise the account's KMS \
                     request quota or kms.aws.max_attempts.{said}",
                    self.config.max_attempts
                ),
            ),
            "InvalidGrantTokenException" => (
                KmsErrorKind::InvalidRequest,
                format!(
                    "AWS KMS rejected the grant token sent with {operation} on key \
                     {key_id}.{said}"
                ),
            ),
            "KMSInternalException" | "DependencyTimeoutException" | "KeyUnavailableException" => (
                KmsErrorKind::Unavailable,
                format!(
                    "AWS KMS failed {operation} on key {key_id} ({code}) after {} attempts: \
                     retry later.{said}",
                    self.config.max_attempts
                ),
            ),
            _ if status >= 500 => (
                KmsErrorKind::Unavailable,
                format!(
                    "AWS KMS answered {operation} on key {key_id} with HTTP {status} ({code}) \
                     after {} attempts: retry later.{said}",
                    self.config.max_attempts
                ),
            ),
            _ => (
                KmsErrorKind::InvalidRequest,
                format!("AWS KMS refused {operation} on key {key_id}: {code}.{said}"),
            ),
        }
    }

    /// Decrypt with grant tokens (a grant just created is usable through its token before it
    /// has propagated).
    pub async fn decrypt_with_grant_tokens(
        &self,
        wrapped: &[u8],
        context: &EncryptionContext,
        expected_key_id: &str,
        grant_tokens: &[String],
    ) -> Result<DataKey, KmsError> {
        let request = self
            .client
            .decrypt()
            .ciphertext_blob(Blob::new(wrapped))
            .set_encryption_context(Some(sdk_map(context)))
            .key_id(expected_key_id)
            .set_grant_tokens((!grant_tokens.is_empty()).then(|| grant_tokens.to_vec()));
        let out = self
            .call("Decrypt", expected_key_id, Some(context), request.send())
            .await?;
        if let Some(returned) = out.key_id()
            && !same_key(returned, expected_key_id)
        {
            return Err(KmsError::new(
                KmsErrorKind::WrongKey,
                format!(
                    "AWS KMS unwrapped the volume key with key {returned}, not the expected \
                     {expected_key_id}: refusing it"
                ),
            ));
        }
        // Moved out of the answer, not copied: the only copy is the zeroizing one.
        let mut out = out;
        let plaintext = out.plaintext.take().ok_or_else(|| {
            KmsError::new(
                KmsErrorKind::Unavailable,
                format!("AWS KMS answered Decrypt on key {expected_key_id} without a plaintext"),
            )
        })?;
        Ok(DataKey::new(Zeroizing::new(plaintext.into_inner())))
    }

    /// The tokens of the grants this process made on `key_id`.
    fn tokens_for(&self, key_id: &str) -> Vec<String> {
        self.grant_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(bare_key(key_id))
            .map(|l| l.iter().map(|(_, t)| t.clone()).collect())
            .unwrap_or_default()
    }

    /// CreateGrant (its token is kept and sent with later calls on the key until it is
    /// retired or this process ends).
    pub async fn create_grant(&self, spec: &GrantSpec<'_>) -> Result<Grant, KmsError> {
        let request = self
            .client
            .create_grant()
            .key_id(spec.key_id)
            .grantee_principal(spec.grantee_principal)
            .retiring_principal(spec.retiring_principal)
            .set_operations(Some(spec.operations.iter().map(|o| o.to_sdk()).collect()))
            .constraints(
                GrantConstraints::builder()
                    .set_encryption_context_subset(Some(sdk_map(spec.context_subset)))
                    .build(),
            )
            .name(spec.name);
        let out = self
            .call(
                "CreateGrant",
                spec.key_id,
                Some(spec.context_subset),
                request.send(),
            )
            .await?;
        match (out.grant_id(), out.grant_token()) {
            (Some(id), Some(token)) => {
                let mut all = self.grant_tokens.lock().unwrap_or_else(|p| p.into_inner());
                let list = all.entry(bare_key(spec.key_id).to_owned()).or_default();
                list.push((id.to_owned(), token.to_owned()));
                if list.len() > MAX_GRANT_TOKENS {
                    list.remove(0);
                }
                Ok(Grant {
                    grant_id: id.to_owned(),
                    grant_token: token.to_owned(),
                    key_id: spec.key_id.to_owned(),
                })
            }
            _ => Err(KmsError::new(
                KmsErrorKind::Unavailable,
                format!(
                    "AWS KMS answered CreateGrant on key {} without a grant id or token",
                    spec.key_id
                ),
            )),
        }
    }

    /// RetireGrant by key and grant id (the caller must be the retiring principal).
    pub async fn retire_grant(&self, key_id: &str, grant_id: &str) -> Result<(), KmsError> {
        let request = self.client.retire_grant().key_id(key_id).grant_id(grant_id);
        self.call("RetireGrant", key_id, None, request.send())
            .await?;
        if let Some(list) = self
            .grant_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(bare_key(key_id))
        {
            list.retain(|(id, _)| id != grant_id);
        }
        Ok(())
    }

    /// The ids of the grants on a key (ListGrants, every page).
    pub async fn list_grant_ids(&self, key_id: &str) -> Result<Vec<String>, KmsError> {
        let mut ids = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let request = self
                .client
                .list_grants()
                .key_id(key_id)
                .set_marker(marker.clone());
            let out = self
                .call("ListGrants", key_id, None, request.send())
                .await?;
            ids.extend(
                out.grants()
                    .iter()
                    .filter_map(|g| g.grant_id().map(str::to_owned)),
            );
            match out.next_marker() {
                Some(m) if out.truncated() => marker = Some(m.to_owned()),
                _ => return Ok(ids),
            }
        }
    }

    /// The ARN of the principal the credentials belong to (STS GetCallerIdentity), as a grant
    /// names it: an assumed-role session becomes its role (`arn:aws:iam::ACCOUNT:role/NAME`;
    /// a role with a path must be configured explicitly).
    pub async fn caller_principal(&self) -> Result<String, KmsError> {
        let out = self.sts.get_caller_identity().send().await.map_err(|e| {
            KmsError::new(
                KmsErrorKind::AccessDenied,
                format!(
                    "cannot find out which AWS principal the daemon runs as (STS \
                     GetCallerIdentity): {}; set kms.aws.grantee_principal",
                    error_chain(&e)
                ),
            )
        })?;
        let arn = out.arn().unwrap_or_default();
        principal_for_grant(arn).ok_or_else(|| {
            KmsError::new(
                KmsErrorKind::InvalidRequest,
                format!(
                    "STS says the daemon runs as {arn:?}, which cannot be a grantee: set \
                     kms.aws.grantee_principal"
                ),
            )
        })
    }
}

/// Maps a caller ARN to the principal a grant can name.
pub fn principal_for_grant(arn: &str) -> Option<String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if parts.len() != 6 || parts[0] != "arn" {
        return None;
    }
    let (partition, service, account, resource) = (parts[1], parts[2], parts[4], parts[5]);
    match service {
        "iam" => Some(arn.to_owned()),
        "sts" => {
            let rest = resource.strip_prefix("assumed-role/")?;
            let role = rest.split('/').next()?;
            (!role.is_empty()).then(|| format!("arn:{partition}:iam::{account}:role/{role}"))
        }
        _ => None,
    }
}

/// True when two key references name the same key: equal, or one is the ARN of the other's
/// bare id.
pub fn same_key(a: &str, b: &str) -> bool {
    a == b || bare_key(a) == bare_key(b)
}

/// The key id of a key ARN (`arn:aws:kms:REGION:ACCOUNT:key/ID` -> `ID`); other references
/// as they are.
fn bare_key(k: &str) -> &str {
    k.rsplit_once(":key/").map_or(k, |(_, id)| id)
}

fn no_credentials(operation: &str, key_id: &str, detail: &str) -> KmsError {
    KmsError::new(
        KmsErrorKind::AccessDenied,
        format!(
            "no AWS credentials for {operation} on key {key_id}: {detail}. Provide them through \
             the standard chain (environment, ~/.aws/credentials, a profile with \
             credential_process or SSO, web identity, container or instance metadata)"
        ),
    )
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn is_credentials_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(s) = source {
        if s.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            return true;
        }
        source = s.source();
    }
    false
}

fn key_state(state: Option<&aws_sdk_kms::types::KeyState>) -> KeyState {
    use aws_sdk_kms::types::KeyState as S;
    match state {
        Some(S::Enabled) => KeyState::Enabled,
        Some(S::Disabled) => KeyState::Disabled,
        Some(S::PendingDeletion) => KeyState::PendingDeletion,
        Some(S::PendingImport) => KeyState::PendingImport,
        Some(S::Creating) => KeyState::Creating,
        Some(S::Updating) => KeyState::Updating,
        Some(S::PendingReplicaDeletion) => KeyState::PendingReplicaDeletion,
        _ => KeyState::Unavailable,
    }
}

fn rfc3339(t: Option<&aws_sdk_kms::primitives::DateTime>) -> Option<String> {
    t.and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
}

impl Kms for AwsKms {
    fn backend_name(&self) -> &'static str {
        "aws"
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        len: usize,
    ) -> Result<GeneratedKey, KmsError> {
        let bytes = i32::try_from(len)
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| {
                KmsError::new(
                    KmsErrorKind::InvalidRequest,
                    format!("AWS KMS generates 1 to 1024 bytes, not {len}"),
                )
            })?;
        let request = self
            .client
            .generate_data_key()
            .key_id(key_id)
            .number_of_bytes(bytes)
            .set_encryption_context(Some(sdk_map(context)));
        let mut out = self
            .call("GenerateDataKey", key_id, Some(context), request.send())
            .await?;
        let plaintext = out.plaintext.take();
        let wrapped = out.ciphertext_blob.take();
        let returned_key = out.key_id.take();
        match (plaintext, wrapped, returned_key) {
            (Some(p), Some(w), Some(k)) => {
                let plaintext = DataKey::new(Zeroizing::new(p.into_inner()));
                if plaintext.len() != len {
                    return Err(KmsError::new(
                        KmsErrorKind::Unavailable,
                        format!(
                            "AWS KMS returned a {}-byte data key for key {key_id}, not the \
                             {len} bytes asked for",
                            plaintext.len()
                        ),
                    ));
                }
                Ok(GeneratedKey {
                    plaintext,
                    wrapped: w.into_inner(),
                    key_id: k,
                })
            }
            _ => Err(KmsError::new(
                KmsErrorKind::Unavailable,
                format!("AWS KMS answered GenerateDataKey on key {key_id} without a key"),
            )),
        }
    }

    async fn decrypt(
        &self,
        wrapped: &[u8],
        context: &EncryptionContext,
        expected_key_id: &str,
    ) -> Result<DataKey, KmsError> {
        let tokens = self.tokens_for(expected_key_id);
        self.decrypt_with_grant_tokens(wrapped, context, expected_key_id, &tokens)
            .await
    }

    async fn re_encrypt(
        &self,
        wrapped: &[u8],
        context: &EncryptionContext,
        key_id: &str,
        new_key_id: &str,
        new_context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let request = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped))
            .set_source_encryption_context(Some(sdk_map(context)))
            .source_key_id(key_id)
            .destination_key_id(new_key_id)
            .set_grant_tokens({
                let t = self.tokens_for(key_id);
                (!t.is_empty()).then_some(t)
            })
            .set_destination_encryption_context(Some(sdk_map(new_context)));
        let out = self
            .call("ReEncrypt", key_id, Some(context), request.send())
            .await?;
        match (out.ciphertext_blob(), out.key_id()) {
            (Some(blob), Some(k)) => Ok(WrappedKey {
                wrapped: blob.as_ref().to_vec(),
                key_id: k.to_owned(),
            }),
            _ => Err(KmsError::new(
                KmsErrorKind::Unavailable,
                format!("AWS KMS answered ReEncrypt to key {new_key_id} without a blob"),
            )),
        }
    }

    async fn describe_key(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        let request = self.client.describe_key().key_id(key_id);
        let out = self
            .call("DescribeKey", key_id, None, request.send())
            .await?;
        let Some(meta) = out.key_metadata() else {
            return Err(KmsError::new(
                KmsErrorKind::Unavailable,
                format!("AWS KMS answered DescribeKey on {key_id} without metadata"),
            ));
        };
        Ok(KeyMetadata {
            key_id: meta.arn().unwrap_or(meta.key_id()).to_owned(),
            aliases: Vec::new(),
            description: meta.description().unwrap_or_default().to_owned(),
            state: key_state(meta.key_state()),
            created: rfc3339(meta.creation_date()).unwrap_or_default(),
            deletion_date: rfc3339(meta.deletion_date()),
            versions: 1,
            backend: "aws".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_for_grants() {
        assert_eq!(
            principal_for_grant("arn:aws:iam::111122223333:user/ops").as_deref(),
            Some("arn:aws:iam::111122223333:user/ops")
        );
        assert_eq!(
            principal_for_grant("arn:aws:sts::111122223333:assumed-role/cryptnbd-host/i-0abc")
                .as_deref(),
            Some("arn:aws:iam::111122223333:role/cryptnbd-host")
        );
        assert_eq!(
            principal_for_grant("arn:aws-us-gov:sts::111122223333:assumed-role/r/s").as_deref(),
            Some("arn:aws-us-gov:iam::111122223333:role/r")
        );
        assert_eq!(principal_for_grant("arn:aws:sts::1:federated-user/x"), None);
        assert_eq!(principal_for_grant("nonsense"), None);
    }

    #[test]
    fn key_references_compare_by_id() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert!(same_key(arn, "1234abcd-12ab-34cd-56ef-1234567890ab"));
        assert!(same_key(arn, arn));
        assert!(!same_key(arn, "alias/other"));
        assert!(!same_key(arn, "ffffffff-12ab-34cd-56ef-1234567890ab"));
    }
}
