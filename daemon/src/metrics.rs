//! The Prometheus endpoint (`[metrics] listen`, off by default): what the daemon does, for a
//! scraper, in the OpenMetrics text format that Prometheus reads.
//!
//! - Per attached volume: requests, bytes and latency by NBD command, errors by errno (the
//!   device's and the refusals'), requests in flight, connections, the last key check.
//! - KMS calls by operation: count by outcome, and latency.
//! - Operations (attach, detach, rekey, snapshot...): one count per audit record, by outcome.
//!
//! The data path pays a few atomic operations and one uncontended lock (the latency
//! histogram) per request: a volume's counters are looked up once, when it is attached
//! ([`Metrics::volume`]), never per request, and nothing is allocated then. The encoding is
//! `prometheus-client`'s; the HTTP side is the least a scraper needs (GET /metrics, one
//! response per connection).

use std::sync::Arc;
use std::time::Duration;

use nbd::Errno;
use nbd::proto::Command;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Largest request head the endpoint reads.
const MAX_REQUEST: usize = 8192;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    volume: String,
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrnoLabels {
    volume: String,
    errno: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    volume: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KmsLabels {
    operation: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 10 µs to about 42 s, doubling.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 2.0, 23))
}

/// 100 µs to about 52 s, doubling.
fn kms_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 2.0, 20))
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<CommandLabels, Counter>,
    bytes: Family<CommandLabels, Counter>,
    latency: HistogramFamily<CommandLabels>,
    errors: Family<ErrnoLabels, Counter>,
    in_flight: Family<VolumeLabel, Gauge>,
    connections: Family<VolumeLabel, Gauge>,
    key_check: Family<KeyLabels, Gauge>,
    attached: Gauge,
    kms_calls: Family<OperationLabels, Counter>,
    kms_latency: HistogramFamily<KmsLabels>,
    operations: Family<OperationLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, none with a value yet.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cryptnbd");
        let requests = Family::<CommandLabels, Counter>::default();
        let bytes = Family::<CommandLabels, Counter>::default();
        let latency: HistogramFamily<CommandLabels> =
            Family::new_with_constructor(request_histogram);
        let errors = Family::<ErrnoLabels, Counter>::default();
        let in_flight = Family::<VolumeLabel, Gauge>::default();
        let connections = Family::<VolumeLabel, Gauge>::default();
        let key_check = Family::<KeyLabels, Gauge>::default();
        let attached = Gauge::default();
        let kms_calls = Family::<OperationLabels, Counter>::default();
        let kms_latency: HistogramFamily<KmsLabels> = Family::new_with_constructor(kms_histogram);
        let operations = Family::<OperationLabels, Counter>::default();
        registry.register(
            "requests",
            "NBD requests answered, by volume and command",
            requests.clone(),
        );
        registry.register_with_unit(
            "request",
            "Bytes covered by the NBD requests answered, by volume and command",
            Unit::Bytes,
            bytes.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from an NBD request's header to its reply, by volume and command",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "request_errors",
            "NBD requests answered with an error (the device's or a refusal), by volume and errno",
            errors.clone(),
        );
        registry.register(
            "requests_in_flight",
            "NBD requests passed to the device and not yet answered",
            in_flight.clone(),
        );
        registry.register(
            "connections",
            "NBD connections in transmission phase, by volume",
            connections.clone(),
        );
        registry.register(
            "key_check",
            "The last check of each attached volume's master key: 1 for its state (Enabled, \
             Disabled, PendingDeletion, error, unchecked)",
            key_check.clone(),
        );
        registry.register("volumes_attached", "Volumes attached", attached.clone());
        registry.register(
            "kms_calls",
            "KMS calls, by operation and outcome (ok, error)",
            kms_calls.clone(),
        );
        registry.register_with_unit(
            "kms_call_duration",
            "Time a KMS call took, by operation",
            Unit::Seconds,
            kms_latency.clone(),
        );
        registry.register(
            "operations",
            "Audited operations (attach, detach, rekey, snapshot, ...), by outcome (ok, error)",
            operations.clone(),
        );
        Self {
            registry,
            requests,
            bytes,
            latency,
            errors,
            in_flight,
            connections,
            key_check,
            attached,
            kms_calls,
            kms_latency,
            operations,
        }
    }

    /// The observer of volume `volume`'s export: its counters, looked up now.
    pub fn volume(&self, volume: &str) -> Arc<VolumeMetrics> {
        let per_command = |c: Command| {
            let labels = CommandLabels {
                volume: volume.to_owned(),
                command: command_label(c).to_owned(),
            };
            CommandMetrics {
                requests: self.requests.get_or_create_owned(&labels),
                bytes: self.bytes.get_or_create_owned(&labels),
                latency: self.latency.get_or_create_owned(&labels),
            }
        };
        Arc::new(VolumeMetrics {
            commands: Command::ALL.map(per_command),
            errors: Errno::ALL.map(|e| {
                self.errors.get_or_create_owned(&ErrnoLabels {
                    volume: volume.to_owned(),
                    errno: e.name().to_owned(),
                })
            }),
            in_flight: self.in_flight.get_or_create_owned(&VolumeLabel {
                volume: volume.to_owned(),
            }),
        })
    }

    /// Drops volume `volume`'s series (it was detached).
    pub fn forget(&self, volume: &str) {
        for c in Command::ALL {
            let labels = CommandLabels {
                volume: volume.to_owned(),
                command: command_label(c).to_owned(),
            };
            self.requests.remove(&labels);
            self.bytes.remove(&labels);
            self.latency.remove(&labels);
        }
        for e in Errno::ALL {
            self.errors.remove(&ErrnoLabels {
                volume: volume.to_owned(),
                errno: e.name().to_owned(),
            });
        }
        let label = VolumeLabel {
            volume: volume.to_owned(),
        };
        self.in_flight.remove(&label);
        self.connections.remove(&label);
    }

    /// A KMS call made.
    pub fn kms_call(&self, call: &kms_client::KmsCall) {
        let outcome = if call.outcome.is_ok() { "ok" } else { "error" };
        self.kms_calls
            .get_or_create(&OperationLabels {
                operation: call.operation.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.kms_latency
            .get_or_create(&KmsLabels {
                operation: call.operation.to_owned(),
            })
            .observe(call.latency.as_secs_f64());
    }

    /// An audit record written: an operation and its outcome. KMS calls (`kms:*`) are
    /// counted by [`kms_call`](Self::kms_call) instead.
    pub fn audited(&self, record: &statedir::audit::AuditRecord) {
        if record.operation.starts_with("kms:") {
            return;
        }
        let outcome = if record.outcome == "ok" {
            "ok"
        } else {
            "error"
        };
        self.operations
            .get_or_create(&OperationLabels {
                operation: record.operation.clone(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// What the scrape-time gauges show: the attached volumes, with their connections and
    /// the state of their last key check.
    pub fn set_attached(&self, volumes: &[AttachedGauge]) {
        self.attached.set(volumes.len() as i64);
        self.key_check.clear();
        for v in volumes {
            self.connections
                .get_or_create(&VolumeLabel {
                    volume: v.volume.clone(),
                })
                .set(v.connections as i64);
            self.key_check
                .get_or_create(&KeyLabels {
                    volume: v.volume.clone(),
                    state: v.key_state.clone(),
                })
                .set(1);
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// One attached volume, as the scrape-time gauges show it.
#[derive(Debug, Clone)]
pub struct AttachedGauge {
    /// The volume.
    pub volume: String,
    /// Its connections now.
    pub connections: usize,
    /// Its master key's last checked state: `Enabled`, `Disabled`, `PendingDeletion`,
    /// `error` (the check failed) or `unchecked`.
    pub key_state: String,
}

/// A command as its label shows it: `read`, `write`, `flush`, `trim`, `cache`,
/// `write_zeroes`, `block_status`.
fn command_label(c: Command) -> &'static str {
    match c {
        Command::Read => "read",
        Command::Write => "write",
        Command::Disc => "disc",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::Cache => "cache",
        Command::WriteZeroes => "write_zeroes",
        Command::BlockStatus => "block_status",
    }
}

struct CommandMetrics {
    requests: Counter,
    bytes: Counter,
    latency: Histogram,
}

/// One attached volume's counters: the observer of its export's requests.
pub struct VolumeMetrics {
    /// By [`Command::ALL`] order.
    commands: [CommandMetrics; 8],
    /// By [`Errno::ALL`] order.
    errors: [Counter; 8],
    in_flight: Gauge,
}

impl VolumeMetrics {
    fn command(&self, c: Command) -> &CommandMetrics {
        &self.commands[usize::from(c.to_wire()) % self.commands.len()]
    }

    fn error(&self, e: Errno) {
        if let Some(i) = Errno::ALL.iter().position(|x| *x == e) {
            self.errors[i].inc();
        }
    }
}

impl nbd::RequestObserver for VolumeMetrics {
    fn started(&self, _command: Command) {
        self.in_flight.inc();
    }

    fn finished(
        &self,
        command: Command,
        bytes: u64,
        outcome: Result<(), Errno>,
        latency: Duration,
    ) {
        self.in_flight.dec();
        let c = self.command(command);
        c.requests.inc();
        c.latency.observe(latency.as_secs_f64());
        match outcome {
            Ok(()) => {
                c.bytes.inc_by(bytes);
            }
            Err(e) => self.error(e),
        }
    }

    fn refused(&self, errno: Errno) {
        self.error(errno);
    }
}

/// Serves `GET /metrics` on `listener` until `stop` resolves; `refresh` updates the
/// scrape-time gauges first. One response per connection.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Send + Sync + 'static,
    stop: impl std::future::Future<Output = ()>,
) {
    let refresh = Arc::new(refresh);
    tokio::pin!(stop);
    loop {
        let (mut stream, peer) = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "the metrics listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (metrics, refresh) = (Arc::clone(&metrics), Arc::clone(&refresh));
        tokio::spawn(async move {
            let answer = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
                Ok(Ok(head)) => respond(&head, &metrics, &*refresh),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "metrics request refused");
                    response("400 Bad Request", "text/plain", e.to_string())
                }
                Err(_) => return,
            };
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Reads up to the end of the request head (a blank line), at most [`MAX_REQUEST`] bytes.
async fn read_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
    }
    String::from_utf8(head)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "request head not UTF-8"))
}

fn respond(head: &str, metrics: &Metrics, refresh: &dyn Fn()) -> Vec<u8> {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or("/"),
    );
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => {
            refresh();
            response(
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            )
        }
        ("GET", _) => response(
            "404 Not Found",
            "text/plain",
            "cryptnbd serves its metrics at /metrics\n".into(),
        ),
        _ => response(
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
        ),
    }
}

fn response(status: &str, content_type: &str, body: String) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}
