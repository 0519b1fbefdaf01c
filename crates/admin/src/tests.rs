//! The API against a real engine in a temporary directory, over real
//! sockets with a minimal HTTP/1.1 client (so the tests see exactly the
//! bytes an operator's curl would).

use std::net::SocketAddr;

use hongbao_boundary::TokenSigner;
use hongbao_shard::{Engine, EngineConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::{start, AdminConfig};

const KEY: &str = "test-admin-key-0123456789";

struct Api {
    addr: SocketAddr,
    engine: Engine,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), crate::AdminError>>,
    _tmp: tempfile::TempDir,
}

async fn api(api_key: Option<&str>) -> Api {
    let tmp = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::default(), tmp.path()).await.unwrap();
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let (stop, rx) = watch::channel(false);
    let config = AdminConfig { addr: "127.0.0.1:0".parse().unwrap(), api_key: api_key.map(str::to_owned), dev: false };
    let signer = TokenSigner::new(b"0123456789abcdef0123456789abcdef".to_vec());
    let (addr, task) = start(config, engine.clone(), signer, prometheus, rx).await.unwrap();
    Api { addr, engine, stop, task, _tmp: tmp }
}

struct Resp {
    status: u16,
    body: Value,
    text: String,
}

impl Api {
    async fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
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
        let text = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Resp { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text }
    }
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let auth = format!("Bearer {KEY}");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.raw(method, path, &[("authorization", &auth), ("content-type", "application/json")], &body).await
    }
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
    api.task.await.unwrap().unwrap();
    api.engine.shutdown().await;
}
