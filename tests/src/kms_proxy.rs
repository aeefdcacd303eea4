//! A scripted AWS KMS endpoint for tests: an HTTP/1.1 server on loopback that answers the SDK
//! with the real AWS KMS JSON error shapes where moto cannot (disabled keys, pending
//! deletion, IncorrectKey, AccessDenied, throttling, server errors, slow answers, dropped
//! connections), and forwards everything else to an upstream KMS server (moto) unchanged.
//!
//! Rules are matched in order against each request's action (`X-Amz-Target:
//! TrentService.ACTION`) and key (`KeyId`, `SourceKeyId` or `DestinationKeyId` in the body);
//! a rule may be limited to a number of matches. Every request is recorded (action, key,
//! Authorization header) so tests can count attempts and check which credentials signed them.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// What a matching rule does.
#[derive(Debug, Clone)]
pub enum Reply {
    /// An AWS error: HTTP status, `__type`, message (as AWS KMS sends them).
    Error {
        /// HTTP status (AWS: 400 for most, 404 NotFound, 409 Disabled/InvalidState, 500...).
        status: u16,
        /// The exception name.
        code: String,
        /// The message.
        message: String,
    },
    /// Wait, then forward (a slow KMS).
    Delay(Duration),
    /// Close the connection without answering (a dropped connection).
    Drop,
    /// A 200 answer with this JSON body (for a pure scripted endpoint without upstream).
    Json(Value),
}

impl Reply {
    /// An AWS error reply.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        Reply::Error {
            status,
            code: code.into(),
            message: message.into(),
        }
    }
}

/// One scripted rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Actions it applies to (empty: all).
    pub actions: Vec<String>,
    /// A substring of the key named in the request (None: any request).
    pub key: Option<String>,
    /// How many more requests it applies to (None: all).
    pub remaining: Option<usize>,
    /// What it does.
    pub reply: Reply,
}

impl Rule {
    /// A rule for these actions (empty: all).
    pub fn on(actions: &[&str], reply: Reply) -> Self {
        Self {
            actions: actions.iter().map(|s| (*s).to_owned()).collect(),
            key: None,
            remaining: None,
            reply,
        }
    }

    /// Only requests naming a key containing `key`.
    pub fn for_key(mut self, key: &str) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: usize) -> Self {
        self.remaining = Some(n);
        self
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `Decrypt`, `GenerateDataKey`, ...
    pub action: String,
    /// The key named in the body, if any.
    pub key: Option<String>,
    /// The Authorization header (SigV4: carries the access key id).
    pub authorization: String,
    /// The `GrantTokens` the request carried.
    pub grant_tokens: Vec<String>,
    /// The request id the client got (ours or upstream's), if any.
    pub request_id: Option<String>,
    /// What was done: `forwarded`, `error CODE`, `dropped`, `scripted`.
    pub handled: String,
}

struct State {
    rules: Vec<Rule>,
    log: Vec<Recorded>,
}

/// The running endpoint (stopped on drop).
pub struct KmsProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    /// While true, connections are accepted and closed at once (a KMS that is down).
    down: Arc<AtomicBool>,
}

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

impl KmsProxy {
    /// Starts on 127.0.0.1; `upstream` is where unmatched requests go (None: they get a 500).
    pub fn start(upstream: Option<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the KMS proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(State {
            rules: Vec::new(),
            log: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        {
            let (state, stop, down) = (state.clone(), stop.clone(), down.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    if down.load(Ordering::SeqCst) {
                        drop(conn);
                        continue;
                    }
                    let (state, down) = (state.clone(), down.clone());
                    std::thread::spawn(move || serve(conn, &state, &down, upstream));
                }
            });
        }
        Self {
            addr,
            state,
            stop,
            down,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a rule (after the existing ones).
    pub fn push(&self, rule: Rule) {
        self.lock().rules.push(rule);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Makes the endpoint refuse to talk (accept and close) or talk again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The requests so far.
    pub fn log(&self) -> Vec<Recorded> {
        self.lock().log.clone()
    }

    /// How many requests of `action` were received.
    pub fn count(&self, action: &str) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|r| r.action == action)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for KmsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

type Headers = Vec<(String, String)>;

struct HttpMessage {
    start: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpMessage {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_message(r: &mut impl BufRead) -> Option<HttpMessage> {
    let mut start = String::new();
    if r.read_line(&mut start).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut msg = HttpMessage {
        start: start.trim_end().to_owned(),
        headers,
        body: Vec::new(),
    };
    if msg
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            msg.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = msg.header("content-length") {
        let mut body = vec![0; len.parse().ok()?];
        r.read_exact(&mut body).ok()?;
        msg.body = body;
    }
    Some(msg)
}

fn write_response(
    w: &mut impl Write,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        if ["content-length", "transfer-encoding", "connection"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h))
        {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    w.write_all(out.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn forward(upstream: SocketAddr, req: &HttpMessage) -> Option<(u16, Headers, Vec<u8>)> {
    let mut s = TcpStream::connect(upstream).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut head = format!("{}\r\n", req.start);
    for (k, v) in &req.headers {
        if ["content-length", "transfer-encoding", "connection"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h))
        {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        req.body.len()
    ));
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(&req.body).ok()?;
    let mut r = BufReader::new(s);
    let resp = read_message(&mut r)?;
    let status = resp.start.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, resp.headers, resp.body))
}

fn serve(conn: TcpStream, state: &Mutex<State>, down: &AtomicBool, upstream: Option<SocketAddr>) {
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut writer = write_half;
    while let Some(req) = read_message(&mut reader) {
        if down.load(Ordering::SeqCst) {
            // Down: kept-alive connections are cut too, without an answer.
            return;
        }
        let action = req
            .header("x-amz-target")
            .and_then(|t| t.rsplit_once('.'))
            .map(|(_, a)| a.to_owned())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let key = ["KeyId", "SourceKeyId", "DestinationKeyId"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_str))
            .map(str::to_owned);
        let reply = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            let hit = st.rules.iter_mut().find(|r| {
                r.remaining != Some(0)
                    && (r.actions.is_empty() || r.actions.contains(&action))
                    && r.key
                        .as_ref()
                        .is_none_or(|k| key.as_deref().is_some_and(|x| x.contains(k.as_str())))
            });
            hit.map(|r| {
                if let Some(n) = r.remaining.as_mut() {
                    *n -= 1;
                }
                r.reply.clone()
            })
        };
        // Recorded on arrival (a slow answer is counted before it is sent), completed after.
        let index = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.log.push(Recorded {
                action: action.clone(),
                key: key.clone(),
                authorization: req.header("authorization").unwrap_or_default().to_owned(),
                grant_tokens: body
                    .get("GrantTokens")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                request_id: None,
                handled: "in progress".into(),
            });
            st.log.len() - 1
        };
        let mut request_id = None;
        let handled: String;
        let complete = |request_id: Option<String>, handled: String| {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            let r = &mut st.log[index];
            r.request_id = request_id;
            r.handled = handled;
        };
        let ours = || format!("proxy-{:08}", REQUEST_IDS.fetch_add(1, Ordering::SeqCst));
        let json_headers = |id: &str| {
            vec![
                (
                    "Content-Type".to_owned(),
                    "application/x-amz-json-1.1".to_owned(),
                ),
                ("x-amzn-RequestId".to_owned(), id.to_owned()),
            ]
        };
        let written = match reply {
            Some(Reply::Drop) => {
                handled = "dropped".into();
                complete(request_id, handled);
                return;
            }
            Some(Reply::Error {
                status,
                code,
                message,
            }) => {
                let id = ours();
                request_id = Some(id.clone());
                handled = format!("error {code}");
                let body = serde_json::json!({"__type": code, "message": message});
                write_response(
                    &mut writer,
                    status,
                    &json_headers(&id),
                    body.to_string().as_bytes(),
                )
            }
            Some(Reply::Json(v)) => {
                let id = ours();
                request_id = Some(id.clone());
                handled = "scripted".into();
                write_response(
                    &mut writer,
                    200,
                    &json_headers(&id),
                    v.to_string().as_bytes(),
                )
            }
            delay @ (Some(Reply::Delay(_)) | None) => {
                if let Some(Reply::Delay(d)) = delay {
                    std::thread::sleep(d);
                }
                match upstream.and_then(|u| forward(u, &req)) {
                    Some((status, headers, body)) => {
                        request_id = headers
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case("x-amzn-requestid"))
                            .map(|(_, v)| v.clone());
                        handled = "forwarded".into();
                        write_response(&mut writer, status, &headers, &body)
                    }
                    None => {
                        let id = ours();
                        request_id = Some(id.clone());
                        handled = "no upstream".into();
                        let body = serde_json::json!({
                            "__type": "KMSInternalException",
                            "message": "the test proxy has no upstream for this request"
                        });
                        write_response(
                            &mut writer,
                            500,
                            &json_headers(&id),
                            body.to_string().as_bytes(),
                        )
                    }
                }
            }
        };
        complete(request_id, handled);
        if written.is_err() {
            return;
        }
    }
}
