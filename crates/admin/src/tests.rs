//! The API against a real engine in a temporary directory, over real
//! sockets with a minimal HTTP/1.1 client (so the tests see exactly the
//! bytes an operator's curl would).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hongbao_boundary::TokenSigner;
use hongbao_core::limits::AMOUNT_FEN_MAX;
use hongbao_core::ID_MAX;
use hongbao_shard::{Engine, EngineConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::{start, AdminConfig, AdminLimits};

pub(crate) const KEY: &str = "test-admin-key-0123456789";

pub(crate) struct Api {
    pub(crate) addr: SocketAddr,
    pub(crate) engine: Engine,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) task: tokio::task::JoinHandle<()>,
    _tmp: tempfile::TempDir,
}

pub(crate) async fn api(api_key: Option<&str>) -> Api {
    api_with(api_key, AdminLimits::default()).await
}

async fn api_with(api_key: Option<&str>, limits: AdminLimits) -> Api {
    api_with_live(api_key, limits, hongbao_watch::Live::new()).await
}

/// The API over a fresh engine, serving `live` (which the live tests feed
/// from a sampler of their own).
pub(crate) async fn api_with_live(api_key: Option<&str>, limits: AdminLimits, live: hongbao_watch::Live) -> Api {
    let tmp = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::default(), tmp.path()).await.unwrap();
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let (stop, rx) = watch::channel(false);
    let config = AdminConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        api_key: api_key.map(str::to_owned),
        dev: false,
        limits,
        ws_addr: None,
        dependency: None,
    };
    let signer = TokenSigner::new(b"0123456789abcdef0123456789abcdef".to_vec());
    let (addr, task) = start(config, engine.clone(), signer, prometheus, live, rx).await.unwrap();
    Api { addr, engine, stop, task, _tmp: tmp }
}

pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) text: String,
    /// The status line and headers, as sent.
    pub(crate) head: String,
}

impl Resp {
    /// A header's value (the name in lower case).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }
}

impl Api {
    pub(crate) async fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        http(self.addr, method, path, headers, body).await
    }
    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        call(self.addr, method, path, body).await
    }
}

/// One request with the admin key, on a connection of its own.
pub(crate) async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Resp {
    let auth = format!("Bearer {KEY}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    http(addr, method, path, &[("authorization", &auth), ("content-type", "application/json")], &body).await
}

/// One request as given, on a connection of its own (`connection: close`).
pub(crate) async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, text) = out.split_once("\r\n\r\n").map(|(h, b)| (h.to_owned(), b.to_owned())).unwrap_or_default();
    Resp { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text, head }
}

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["error"]["code"], code, "{}", r.text);
    assert!(!r.body["error"]["message"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn key_is_required_except_for_health_and_metrics() {
    let api = api(Some(KEY)).await;
    let r = api.raw("GET", "/health", &[], "").await;
    assert_eq!((r.status, r.body.clone()), (200, json!({"status": "ok"})));
    assert_eq!(api.raw("GET", "/metrics", &[], "").await.status, 200);

    assert_error(&api.raw("GET", "/v1/stats", &[], "").await, 401, "bad_token");
    assert_error(&api.raw("GET", "/v1/stats", &[("authorization", "Bearer nope")], "").await, 401, "bad_token");
    assert_error(
        &api.raw("GET", "/v1/stats", &[("x-api-key", "test-admin-key-012345678X")], "").await,
        401,
        "bad_token",
    );
    assert_eq!(api.raw("GET", "/v1/stats", &[("x-api-key", KEY)], "").await.status, 200);
    let r = api.call("GET", "/v1/stats", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["shards"], 4);
}

#[tokio::test]
async fn no_key_means_open() {
    let api = api(None).await;
    assert_eq!(api.raw("GET", "/v1/stats", &[], "").await.status, 200);
}

#[tokio::test]
async fn bad_input_is_a_400_with_a_message() {
    let api = api(Some(KEY)).await;
    let bearer = format!("Bearer {KEY}");
    let h = [("authorization", bearer.as_str())];
    let cases = [
        ("/v1/accounts/1/deposit", "{nope"),
        ("/v1/accounts/1/deposit", ""),
        ("/v1/accounts/1/deposit", r#"{"amount_fen": 10}"#),
        ("/v1/accounts/1/deposit", r#"{"amount_fen": "10", "key": "k"}"#),
        ("/v1/accounts/1/deposit", r#"{"amount_fen": 99999999999999999999999, "key": "k"}"#),
        ("/v1/accounts/1/deposit", r#"{"amount_fen": 10, "key": "k", "extra": 1}"#),
        ("/v1/accounts/x/deposit", r#"{"amount_fen": 10, "key": "k"}"#),
        ("/v1/accounts/-1/deposit", r#"{"amount_fen": 10, "key": "k"}"#),
        ("/v1/accounts/0/deposit", r#"{"amount_fen": 10, "key": "k"}"#),
        ("/v1/tokens", r#"{"user": 0}"#),
        ("/v1/tokens", r#"{"user": 5, "ttl_s": 0}"#),
        (
            "/v1/packets",
            r#"{"sender": 1, "amount_fen": 10, "count": 1, "kind": "weird", "to": {"user": 2}, "key": "k"}"#,
        ),
        ("/v1/groups/1/members", r#"{}"#),
    ];
    for (path, body) in cases {
        assert_error(&api.raw("POST", path, &h, body).await, 400, "invalid_request");
    }
    assert_error(&api.raw("GET", "/v1/packets/abc", &h, "").await, 400, "invalid_request");
    assert_error(&api.raw("GET", "/v1/nowhere", &h, "").await, 404, "not_found");
    assert_error(&api.raw("DELETE", "/v1/stats", &h, "").await, 405, "invalid_request");
    let big = format!(r#"{{"topic":"t","text":"{}"}}"#, "x".repeat(crate::BODY_BYTES_MAX));
    assert_eq!(api.raw("POST", "/v1/broadcast", &h, &big).await.status, 413);
}

#[tokio::test]
async fn money_groups_packets_and_tokens() {
    let api = api(Some(KEY)).await;
    let r = api.call("POST", "/v1/accounts/1/deposit", Some(json!({"amount_fen": 1000, "key": "d1"}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["balance_fen"], 1000);
    let again = api.call("POST", "/v1/accounts/1/deposit", Some(json!({"amount_fen": 1000, "key": "d1"}))).await;
    assert_eq!((again.status, again.body["repeat"].clone()), (200, json!(true)));
    assert_error(
        &api.call("POST", "/v1/accounts/1/withdraw", Some(json!({"amount_fen": 5000, "key": "w1"}))).await,
        409,
        "insufficient_funds",
    );
    assert_error(
        &api.call("POST", "/v1/accounts/1/deposit", Some(json!({"amount_fen": 0, "key": "d0"}))).await,
        400,
        "invalid_request",
    );
    assert_eq!(api.call("GET", "/v1/accounts/1", None).await.body, json!({"user": 1, "balance_fen": 1000}));

    let g = api.call("PUT", "/v1/groups/7", Some(json!({"members": [1, 2, 3]}))).await;
    assert_eq!(g.status, 200, "{}", g.text);
    let g = api.call("POST", "/v1/groups/7/members", Some(json!({"add": [4], "remove": [3]}))).await;
    let mut members: Vec<u64> = serde_json::from_value(g.body["members"].clone()).unwrap();
    members.sort_unstable();
    assert_eq!(members, vec![1, 2, 4]);
    assert_eq!(api.call("GET", "/v1/groups/7", None).await.body["group"], 7);

    let send = json!({"sender": 1, "amount_fen": 300, "count": 3, "kind": "lucky", "to": {"group": 7}, "key": "s1"});
    let sent = api.call("POST", "/v1/packets", Some(send)).await;
    assert_eq!(sent.status, 201, "{}", sent.text);
    let packet = sent.body["packet"].as_u64().unwrap();
    let detail = api.call("GET", &format!("/v1/packets/{packet}"), None).await;
    assert_eq!((detail.status, detail.body["amount_fen"].clone()), (200, json!(300)));
    let broke = json!({"sender": 9, "amount_fen": 300, "count": 3, "kind": "fixed", "to": {"users": [1]}, "key": "s2"});
    assert_error(&api.call("POST", "/v1/packets", Some(broke)).await, 409, "insufficient_funds");
    assert_error(&api.call("GET", "/v1/tasks/12345", None).await, 404, "not_found");

    let t = api.call("POST", "/v1/tokens", Some(json!({"user": 42}))).await;
    assert_eq!(t.status, 200, "{}", t.text);
    let signer = TokenSigner::new(b"0123456789abcdef0123456789abcdef".to_vec());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(signer.verify(t.body["token"].as_str().unwrap(), now), Ok(42));

    let _ = api.stop.send(true);
    api.task.await.unwrap();
    api.engine.shutdown().await;
}

/// Money-moving routes take whatever a caller sends (scripts/api-check.sh
/// has schemathesis send it at random): numbers at the ends of their types,
/// ids out of range, keys too long in bytes but not in characters, rules
/// that contradict each other. Each is refused with a 4xx in the error
/// format, and no money moves.
#[tokio::test]
async fn money_routes_refuse_hostile_input_with_a_4xx() {
    let api = api(Some(KEY)).await;
    let r = api.call("POST", "/v1/accounts/1/deposit", Some(json!({"amount_fen": 1000, "key": "seed"}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let long_key = "恭".repeat(22); // 22 characters, 66 bytes
    let money = |amount: Value, key: &str| json!({"amount_fen": amount, "key": key});
    let send = |patch: Value| {
        let mut body =
            json!({"sender": 1, "amount_fen": 100, "count": 2, "kind": "lucky", "to": {"users": [2, 3]}, "key": "s"});
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        body
    };
    let campaign = |patch: Value| {
        let mut body =
            json!({"funder": 1, "total_fen": 100, "rule": {"count": {"packets": 10}}, "rate_per_s": 5, "key": "c"});
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        body
    };
    let mut cases: Vec<(&str, String, Value)> = Vec::new();
    for op in ["deposit", "withdraw"] {
        for user in [0, ID_MAX + 1, u64::MAX] {
            cases.push(("POST", format!("/v1/accounts/{user}/{op}"), money(json!(1), "k")));
        }
        let path = format!("/v1/accounts/1/{op}");
        for amount in
            [json!(i64::MIN), json!(-1), json!(0), json!(AMOUNT_FEN_MAX + 1), json!(i64::MAX), json!(u64::MAX)]
        {
            cases.push(("POST", path.clone(), money(amount, "k")));
        }
        for key in ["", long_key.as_str(), &"k".repeat(65)] {
            cases.push(("POST", path.clone(), money(json!(1), key)));
        }
    }
    for patch in [
        json!({"sender": 0}),
        json!({"sender": u64::MAX}),
        json!({"amount_fen": i64::MAX}),
        json!({"amount_fen": i64::MIN}),
        json!({"count": 0}),
        json!({"count": u32::MAX}),
        json!({"amount_fen": 1, "count": 2}),
        json!({"kind": "fixed", "amount_fen": 101}),
        json!({"to": {"user": 2}}),
        json!({"to": {"user": 0}, "count": 1}),
        json!({"to": {"group": u64::MAX}}),
        json!({"to": {"users": []}}),
        json!({"to": {"users": (1..=501).collect::<Vec<u64>>()}}),
        json!({"to": {"users": [0, u64::MAX]}}),
        json!({"greeting": "x".repeat(257)}),
        json!({"key": long_key}),
        json!({"key": ""}),
    ] {
        cases.push(("POST", "/v1/packets".into(), send(patch)));
    }
    for patch in [
        json!({"funder": 0}),
        json!({"funder": ID_MAX + 1}),
        json!({"total_fen": 0}),
        json!({"total_fen": i64::MAX}),
        json!({"total_fen": AMOUNT_FEN_MAX + 1}),
        json!({"total_fen": 1_000_000}),
        json!({"rule": {"count": {"packets": 0}}}),
        json!({"rule": {"count": {"packets": u64::MAX}}}),
        json!({"rule": {"count": {"packets": 101}}}),
        json!({"rule": {"range": {"min_fen": 0, "max_fen": 10}}}),
        json!({"rule": {"range": {"min_fen": 11, "max_fen": 10}}}),
        json!({"rule": {"range": {"min_fen": 1, "max_fen": 101}}}),
        json!({"rule": {"range": {"min_fen": i64::MIN, "max_fen": i64::MAX}}}),
        json!({"rate_per_s": 0}),
        json!({"rate_per_s": u32::MAX}),
        json!({"win_cap_per_user": 0}),
        json!({"key": long_key}),
    ] {
        cases.push(("POST", "/v1/campaigns".into(), campaign(patch)));
    }
    for path in ["/v1/campaigns/0/start", "/v1/campaigns/18446744073709551615/start", "/v1/campaigns/0/stop"] {
        cases.push(("POST", path.into(), Value::Null));
    }
    for (method, path, body) in cases {
        let body = (!body.is_null()).then_some(body);
        let r = api.call(method, &path, body.clone()).await;
        assert!((400..500).contains(&r.status), "{method} {path} {body:?}: {} {}", r.status, r.text);
        assert!(r.body["error"]["code"].is_string(), "{method} {path}: {}", r.text);
    }
    let r = api.call("GET", "/v1/stats", None).await;
    assert_eq!(
        (r.body["user_balances_fen"].as_i64(), r.body["deposits_minus_withdrawals_fen"].as_i64()),
        (Some(1000), Some(1000))
    );
}

// ---- connections: timeouts, cap, keep-alive, shutdown ----------------------
//
// Timing bounds below are generous on purpose (a loaded 2-core machine): a
// lower bound only says a timer did not fire early, an upper bound is many
// times the timeout.

/// How long any single step may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

/// Short timeouts so these tests run in seconds.
fn quick(connections_max: usize) -> AdminLimits {
    AdminLimits {
        connections_max,
        header_read_timeout_ms: 500,
        body_read_timeout_ms: 500,
        idle_timeout_ms: 1_500,
        shutdown_grace_ms: 1_000,
    }
}

/// One response as read off a connection.
#[derive(Debug)]
struct Head {
    status: u16,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn says_close(&self) -> bool {
        self.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A client connection speaking raw HTTP/1.1, for what one-shot requests
/// cannot show: keep-alive, half-sent requests, who closes and when.
struct Conn {
    stream: TcpStream,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn { stream: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &str) -> std::io::Result<()> {
        self.stream.write_all(bytes.as_bytes()).await
    }

    /// Reads one response (a 1xx has no body). Err if the connection ends
    /// first or nothing comes within `WAIT`.
    async fn response(&mut self) -> Result<Head, String> {
        tokio::time::timeout(WAIT, self.read_response()).await.map_err(|_| format!("no response within {WAIT:?}"))?
    }

    async fn read_response(&mut self) -> Result<Head, String> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().and_then(|l| l.get(9..12)).and_then(|s| s.parse().ok()).ok_or(head.clone())?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize =
            headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
        while self.buf.len() < head_end + len {
            self.fill().await?;
        }
        let body = String::from_utf8_lossy(&self.buf[head_end..head_end + len]).into_owned();
        self.buf.drain(..head_end + len);
        Ok(Head { status, headers, body })
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err(format!("connection closed ({} bytes unparsed)", self.buf.len())),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("read failed: {e}")),
        }
    }

    /// Waits up to `within` for the server to close the connection (EOF or
    /// reset). Returns how long that took and any bytes that came first.
    async fn closed_within(&mut self, within: Duration) -> Result<(Duration, Vec<u8>), String> {
        let began = Instant::now();
        let mut got = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 4096];
        loop {
            let left = within.saturating_sub(began.elapsed());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(format!("still open after {within:?} ({} bytes read)", got.len())),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok((began.elapsed(), got)),
                Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n")
}

/// True once `/health` is answered on a fresh connection; a connection
/// refused over the cap is closed without an answer.
async fn health_answers(addr: SocketAddr) -> bool {
    let mut c = Conn::open(addr).await;
    if c.send(&get("/health")).await.is_err() {
        return false;
    }
    matches!(c.response().await, Ok(h) if h.status == 200)
}

/// A failing dependency (a SET's NATS) makes `/health` say `degraded`, with
/// 200: money still moves; it says `ok` again once the dependency is back.
#[tokio::test]
async fn health_is_degraded_while_a_dependency_fails() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::default(), tmp.path()).await.unwrap();
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let (stop, rx) = watch::channel(false);
    let failing = Arc::new(AtomicBool::new(true));
    let probe = {
        let failing = failing.clone();
        crate::DependencyProbe(Arc::new(move || failing.load(Ordering::Relaxed).then(|| "NATS unreachable".to_owned())))
    };
    let config = AdminConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        api_key: None,
        dev: true,
        limits: AdminLimits::default(),
        ws_addr: None,
        dependency: Some(probe),
    };
    let signer = TokenSigner::new(b"0123456789abcdef0123456789abcdef".to_vec());
    let live = hongbao_watch::Live::new();
    let (addr, task) = start(config, engine.clone(), signer, prometheus, live, rx).await.unwrap();
    let r = call(addr, "GET", "/health", None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("degraded")), "{}", r.text);
    assert_eq!(r.body["dependency"], json!("NATS unreachable"));
    failing.store(false, Ordering::Relaxed);
    let r = call(addr, "GET", "/health", None).await;
    assert_eq!(r.body, json!({"status": "ok"}));
    let _ = stop.send(true);
    task.await.unwrap();
    engine.shutdown().await;
}

/// A user listed three times used to get three stored copies.
#[tokio::test]
async fn a_push_to_a_user_listed_twice_is_one_target() {
    let api = api(Some(KEY)).await;
    let body = json!({"target": {"users": [5, 6, 5, 5]}, "persistent": true, "topic": "t", "text": "x"});
    let r = api.call("POST", "/v1/push", Some(body)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!((r.body["targets"].as_u64(), r.body["stored"].as_u64()), (Some(2), Some(2)), "{}", r.text);
    let _ = api.stop.send(true);
    api.task.await.unwrap();
    api.engine.shutdown().await;
}

#[tokio::test]
async fn half_a_request_is_closed_after_its_timeout() {
    let limits = quick(8);
    let api = api_with(Some(KEY), limits).await;

    // Half a head, then silence: closed without an answer by the header timeout.
    let mut c = Conn::open(api.addr).await;
    c.send("GET /health HTTP/1.1\r\nhost: te").await.unwrap();
    let (took, bytes) = c.closed_within(WAIT).await.unwrap();
    assert!(took >= Duration::from_millis(limits.header_read_timeout_ms / 2), "closed early: {took:?}");
    assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));

    // Nothing at all after connecting: the same.
    let mut c = Conn::open(api.addr).await;
    c.closed_within(WAIT).await.unwrap();

    // The head and half the body: 408 with `Connection: close`, then closed.
    let mut c = Conn::open(api.addr).await;
    let head = format!(
        "POST /v1/accounts/1/deposit HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {KEY}\r\ncontent-length: 40\r\n\r\n"
    );
    c.send(&head).await.unwrap();
    c.send(r#"{"amount_fen": 1"#).await.unwrap();
    let began = Instant::now();
    let r = c.response().await.unwrap();
    assert!(began.elapsed() >= Duration::from_millis(limits.body_read_timeout_ms / 2));
    assert_eq!(r.status, 408, "{r:?}");
    assert!(r.says_close(), "{r:?}");
    assert!(r.body.contains("\"idle_timeout\""), "{r:?}");
    c.closed_within(WAIT).await.unwrap();

    // Nothing moved, and the server still answers.
    assert_eq!(api.call("GET", "/v1/accounts/1", None).await.body["balance_fen"], 0);
    assert!(health_answers(api.addr).await);
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    // A header timeout long enough that the held connections are all still
    // there when the one over the cap arrives.
    let limits = AdminLimits { header_read_timeout_ms: 3_000, ..quick(8) };
    let api = api_with(Some(KEY), limits).await;
    let mut held = Vec::new();
    for _ in 0..limits.connections_max {
        let mut c = Conn::open(api.addr).await;
        c.send("GET /health HTTP/1.1\r\n").await.unwrap();
        held.push(c);
    }
    // One over: a whole request, closed unanswered. (Accepted in order, so
    // the held ones have their permits first.)
    let mut over = Conn::open(api.addr).await;
    let _ = over.send(&get("/health")).await;
    let (_, bytes) = over.closed_within(WAIT).await.unwrap();
    assert!(bytes.is_empty(), "answered over the cap: {}", String::from_utf8_lossy(&bytes));

    // The held ones time out; then a fresh connection is served again.
    for c in &mut held {
        c.closed_within(WAIT).await.unwrap();
    }
    let began = Instant::now();
    while !health_answers(api.addr).await {
        assert!(began.elapsed() < WAIT, "/health not answered after the held connections closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // Idle much longer than the header timeout: a pause between requests is
    // not a slow head.
    let limits = AdminLimits { header_read_timeout_ms: 300, idle_timeout_ms: 2_000, ..quick(8) };
    let api = api_with(Some(KEY), limits).await;
    let mut c = Conn::open(api.addr).await;
    c.send(&get("/health")).await.unwrap();
    assert_eq!(c.response().await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.send(&get("/health")).await.unwrap();
    let r = c.response().await.unwrap();
    assert!(r.status == 200 && !r.says_close(), "{r:?}");
    let (took, bytes) = c.closed_within(WAIT).await.unwrap();
    assert!(took >= Duration::from_millis(limits.idle_timeout_ms / 2), "closed early: {took:?}");
    assert!(bytes.is_empty());
}

#[tokio::test]
async fn an_error_answer_with_a_late_body_keeps_the_connection_usable() {
    // Issue 9, item 4: the 400 for `abc` used to be sent before its body had
    // arrived, without `Connection: close`, and then the socket was closed
    // under the client's next request.
    let api = api(Some(KEY)).await;
    let mut c = Conn::open(api.addr).await;
    let body = r#"{"amount_fen": 10, "key": "late-body"}"#;
    let head = format!(
        "POST /v1/accounts/abc/deposit HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {KEY}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    for round in 0..3 {
        c.send(&head).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.send(body).await.unwrap();
        let r = c.response().await.unwrap();
        assert_eq!(r.status, 400, "round {round}: {r:?}");
        assert!(!r.says_close(), "round {round}: {r:?}");
    }
    // The same socket serves the next request.
    c.send(&format!("GET /v1/stats HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {KEY}\r\n\r\n")).await.unwrap();
    assert_eq!(c.response().await.unwrap().status, 200);

    // A 401 and a 404 with a body read it too.
    for path in ["/v1/accounts/1/deposit", "/v1/nowhere"] {
        let head = format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n", body.len());
        c.send(&head).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.send(body).await.unwrap();
        let r = c.response().await.unwrap();
        assert!(matches!(r.status, 401 | 404) && !r.says_close(), "{path}: {r:?}");
    }
    c.send(&get("/health")).await.unwrap();
    assert_eq!(c.response().await.unwrap().status, 200);

    // A body over the limit is refused from its length, unread, so that
    // answer says the connection ends.
    let mut c = Conn::open(api.addr).await;
    let head = format!(
        "POST /v1/broadcast HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {KEY}\r\ncontent-length: {}\r\n\r\n",
        crate::BODY_BYTES_MAX + 1
    );
    c.send(&head).await.unwrap();
    let r = c.response().await.unwrap();
    assert!(r.status == 413 && r.says_close(), "{r:?}");
    c.closed_within(WAIT).await.unwrap();

    // A head over `HEADER_BYTES_MAX` is refused by hyper, and closed.
    let mut c = Conn::open(api.addr).await;
    let filler = "x".repeat(crate::limits::HEADER_BYTES_MAX);
    let _ = c.send(&format!("GET /health HTTP/1.1\r\nhost: test\r\nx-filler: {filler}\r\n\r\n")).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 431, "{r:?}");
    c.closed_within(WAIT).await.unwrap();
}

const MONEY_GAUGES: [&str; 5] = [
    "hongbao_user_balances_fen",
    "hongbao_packet_escrow_fen",
    "hongbao_campaign_escrow_fen",
    "hongbao_transit_fen",
    "hongbao_deposits_minus_withdrawals_fen",
];

#[tokio::test]
async fn metrics_show_money_only_to_the_key() {
    let api = api(Some(KEY)).await;
    let r = api.call("POST", "/v1/accounts/1/deposit", Some(json!({"amount_fen": 1234, "key": "m1"}))).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let open = api.raw("GET", "/metrics", &[], "").await;
    assert_eq!(open.status, 200);
    for name in MONEY_GAUGES {
        assert!(!open.text.contains(name), "{name} shown without the key:\n{}", open.text);
    }
    let bearer = format!("Bearer {KEY}");
    for header in [("authorization", bearer.as_str()), ("x-api-key", KEY)] {
        let with_key = api.raw("GET", "/metrics", &[header], "").await;
        assert_eq!(with_key.status, 200);
        for name in MONEY_GAUGES {
            assert!(with_key.text.contains(&format!("\n{name} ")), "{name} missing:\n{}", with_key.text);
        }
        assert!(with_key.text.contains("\nhongbao_user_balances_fen 1234\n"), "{}", with_key.text);
        assert!(with_key.text.contains("\nhongbao_deposits_minus_withdrawals_fen 1234\n"), "{}", with_key.text);
    }
    // A key that is offered and wrong is refused, as on `/v1`: a scraper
    // with a stale key should fail loudly, not lose the money gauges quietly.
    assert_error(&api.raw("GET", "/metrics", &[("authorization", "Bearer nope")], "").await, 401, "bad_token");

    // No key configured (dev mode): everything, as before.
    let open_api = self::api(None).await;
    let all = open_api.raw("GET", "/metrics", &[], "").await;
    for name in MONEY_GAUGES {
        assert!(all.text.contains(name), "{name} missing in an open API:\n{}", all.text);
    }
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_drops_stuck_connections() {
    // Header timeout far beyond the grace: only the grace ends the stuck one.
    let limits = AdminLimits { header_read_timeout_ms: 60_000, body_read_timeout_ms: 5_000, ..quick(8) };
    let api = api_with(Some(KEY), limits).await;
    let mut stuck = Conn::open(api.addr).await;
    stuck.send("GET /health HTTP/1.1\r\nhost").await.unwrap();

    // A request in flight: its head is in (hyper asks for the body with
    // `100 Continue` only once the request is being served).
    let mut busy = Conn::open(api.addr).await;
    let body = r#"{"amount_fen": 77, "key": "in-flight"}"#;
    busy.send(&format!(
        "POST /v1/accounts/5/deposit HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {KEY}\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    ))
    .await
    .unwrap();
    assert_eq!(busy.response().await.unwrap().status, 100);

    let _ = api.stop.send(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    busy.send(body).await.unwrap();
    let r = busy.response().await.unwrap();
    assert!(r.status == 200 && r.says_close(), "{r:?}");
    assert_eq!(serde_json::from_str::<Value>(&r.body).unwrap()["balance_fen"], 77);
    busy.closed_within(WAIT).await.unwrap();

    let began = Instant::now();
    tokio::time::timeout(WAIT, api.task).await.expect("the server task ends after the grace").unwrap();
    assert!(began.elapsed() < WAIT);
    stuck.closed_within(WAIT).await.unwrap();
    assert!(TcpStream::connect(api.addr).await.is_err(), "still accepting after shutdown");
    api.engine.shutdown().await;
}

#[tokio::test]
async fn the_web_pages_need_no_key_and_say_how_to_cache_and_what_may_run() {
    let api = api(Some(KEY)).await;
    let pages = [("/", "text/html"), ("/app", "text/html")];
    let files = crate::ui::FILES.iter().map(|a| (format!("/ui/{}", a.name), a.content_type));
    for (path, content_type) in pages.iter().map(|(p, t)| (p.to_string(), *t)).chain(files) {
        let r = api.raw("GET", &path, &[], "").await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        let head = r.head.to_ascii_lowercase();
        assert!(head.contains(&format!("content-type: {content_type}")), "{path}: {head}");
        assert!(head.contains("cache-control: no-cache"), "{path}: {head}");
        assert!(head.contains("content-security-policy: default-src 'none'; script-src 'self';"), "{path}: {head}");
    }
    // The API around them still wants the key, and a file not listed is a 404.
    assert_error(&api.raw("GET", "/v1/campaigns", &[], "").await, 401, "bad_token");
    assert_error(&api.raw("GET", "/ui/../Cargo.toml", &[], "").await, 404, "not_found");
    assert_error(&api.raw("GET", "/ui/nope.js", &[], "").await, 404, "not_found");
    // No gateway beside this API: the page learns there is no WebSocket port.
    let r = api.raw("GET", "/ui/config.json", &[], "").await;
    assert_eq!((r.status, r.body.clone()), (200, json!({"ws_port": null, "dev": false})));
}
