//! `/v1/live`, `/v1/live/now` and `/v1/alerts` against a real engine and
//! a real sampler, over real sockets, reading the bytes a browser's
//! `fetch()` would get (chunked transfer decoded here).

use std::net::SocketAddr;
use std::time::Duration;

use hongbao_watch::{Live, SamplerConfig, WatchRecorder};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::limits::LIVE_STREAMS_MAX;
use crate::tests::KEY;
use crate::AdminLimits;

/// Bounds every wait for a condition; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(20);

/// The admin API (`crate::tests`' set-up) and a sampler feeding its live
/// handle from the engine.
struct Api {
    addr: SocketAddr,
    api: crate::tests::Api,
    sampler: tokio::task::JoinHandle<()>,
}

async fn api(limits: AdminLimits) -> Api {
    let live = Live::new();
    let api = crate::tests::api_with_live(Some(KEY), limits, live.clone()).await;
    let registry = WatchRecorder::new().registry();
    let feed = crate::EngineFeed(api.engine.clone());
    let sampler = hongbao_watch::sampler::spawn(registry, feed, live, SamplerConfig::default(), api.stop.subscribe());
    Api { addr: api.addr, api, sampler }
}

impl Api {
    async fn stop(self) {
        let _ = self.api.stop.send(true);
        tokio::time::timeout(PATIENCE, self.api.task).await.expect("the admin server ends").unwrap();
        tokio::time::timeout(PATIENCE, self.sampler).await.expect("the sampler ends").unwrap();
        self.api.engine.shutdown().await;
    }
}

/// One request on its own connection (`connection: close`): status and body.
async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = key.map(|k| format!("authorization: Bearer {k}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n{auth}\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// An open `/v1/live` stream: its head, then its body as it comes.
struct Stream {
    socket: TcpStream,
    head: String,
    /// Raw bytes read past the head, not yet de-chunked.
    raw: Vec<u8>,
    /// The de-chunked body so far.
    body: String,
    ended: bool,
}

impl Stream {
    async fn open(addr: SocketAddr) -> Stream {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /v1/live HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\naccept: text/event-stream\r\n\r\n"
        );
        socket.write_all(req.as_bytes()).await.unwrap();
        let mut stream = Stream { socket, head: String::new(), raw: Vec::new(), body: String::new(), ended: false };
        while !stream.raw.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(stream.read_some().await, "closed before the head");
        }
        let at = stream.raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        stream.head = String::from_utf8(stream.raw[..at].to_vec()).unwrap();
        stream.raw.drain(..at + 4);
        stream
    }

    fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }

    async fn read_some(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let n =
            tokio::time::timeout(PATIENCE, self.socket.read(&mut buf)).await.expect("the stream went quiet").unwrap();
        self.raw.extend_from_slice(&buf[..n]);
        n > 0
    }

    /// Moves whole chunks from `raw` into `body`.
    fn dechunk(&mut self) {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else { return };
            let size = usize::from_str_radix(std::str::from_utf8(&self.raw[..eol]).unwrap().trim(), 16).unwrap();
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            let data = self.raw[eol + 2..eol + 2 + size].to_vec();
            self.raw.drain(..eol + 2 + size + 2);
            if size == 0 {
                self.ended = true;
                return;
            }
            self.body.push_str(std::str::from_utf8(&data).unwrap());
        }
    }

    /// Reads until the body holds `n` whole events (or the stream ends).
    async fn events(&mut self, n: usize) -> Vec<String> {
        loop {
            self.dechunk();
            let whole: Vec<String> =
                self.body.split_inclusive("\n\n").filter(|e| e.ends_with("\n\n")).map(str::to_owned).collect();
            if whole.len() >= n || self.ended {
                return whole;
            }
            if !self.read_some().await {
                self.ended = true;
            }
        }
    }

    /// Reads until the server ends the stream; true if it ended cleanly
    /// (the last chunk came).
    async fn until_end(&mut self) -> bool {
        loop {
            self.dechunk();
            if self.ended {
                return true;
            }
            if !self.read_some().await {
                return false;
            }
        }
    }
}

/// The seq of a `snapshot` event, checking its framing.
fn snapshot_seq(event: &str) -> u64 {
    let data = event
        .strip_prefix("event: snapshot\ndata: ")
        .and_then(|rest| rest.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not a snapshot event: {event:?}"));
    assert!(!data.contains('\n'), "the JSON is one line");
    let json: Value = serde_json::from_str(data).unwrap();
    json["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_and_alerts_have_the_contract_shape() {
    let api = api(AdminLimits::default()).await;
    assert_eq!(get(api.addr, "/v1/live/now", None).await.0, 401);
    assert_eq!(get(api.addr, "/v1/alerts", None).await.0, 401);
    // The first snapshot is a second after start; until then, 503.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let now = loop {
        let (status, body) = get(api.addr, "/v1/live/now", Some(KEY)).await;
        match status {
            200 => break body,
            503 => assert_eq!(body["error"]["code"], "unavailable", "{body}"),
            other => panic!("{other}: {body}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "no snapshot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(now["seq"].as_u64().unwrap() >= 1);
    assert!(now["at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(now["connections"]["gateways"][0]["name"], "serve");
    assert_eq!(now["connections"]["gateways"][0]["pid"], std::process::id());
    assert!(now["ops"].as_object().unwrap().is_empty());
    for field in ["won", "none", "not_running", "overload"] {
        assert_eq!(now["shakes"][field], 0, "{now}");
    }
    for (group, fields) in [
        ("commit", &["commits_per_s", "batch_ops_mean", "batch_ops_p99", "p50_ms", "p99_ms"][..]),
        ("queues", &["writer", "shard"]),
        ("overload_per_s", &["total", "shard_queue", "storage_reads"]),
        (
            "money",
            &[
                "user_balances_fen",
                "packet_escrow_fen",
                "campaign_escrow_fen",
                "in_flight_fen",
                "deposits_minus_withdrawals_fen",
                "balanced",
            ],
        ),
        ("storage", &["up", "failure"]),
        ("campaigns", &["running", "released_per_s"]),
    ] {
        for field in fields {
            assert!(now[group].get(field).is_some(), "{group}.{field} missing: {now}");
        }
    }
    assert!(now["commit"]["p99_ms"].is_null(), "no commits, no latency: {now}");
    assert_eq!((now["money"]["balanced"].as_bool(), now["storage"]["up"].as_bool()), (Some(true), Some(true)));
    for field in ["wins_per_s", "opens_per_s", "sends_per_s", "alerts_firing"] {
        assert_eq!(now[field], 0, "{now}");
    }
    let (status, alerts) = get(api.addr, "/v1/alerts", Some(KEY)).await;
    assert_eq!(status, 200);
    assert_eq!(alerts, serde_json::json!({"alerts": []}));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_replays_then_sends_each_second_past_the_idle_timeout_and_ends_on_shutdown() {
    // An idle timeout shorter than the stream: a stream's progress renews it.
    let limits = AdminLimits { idle_timeout_ms: 1_500, ..AdminLimits::default() };
    let api = api(limits).await;
    // Let a few snapshots pile up for the replay.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while get(api.addr, "/v1/live/now", Some(KEY)).await.1["seq"].as_u64().unwrap_or(0) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no snapshots");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut stream = Stream::open(api.addr).await;
    assert_eq!(stream.status(), 200, "{}", stream.head);
    let head = stream.head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("cache-control: no-cache"), "{head}");
    // The replay (3 or more, oldest first), then one a second: more than
    // the idle timeout's worth of seconds.
    let events = stream.events(7).await;
    let seqs: Vec<u64> = events.iter().map(|e| snapshot_seq(e)).collect();
    assert!(seqs.len() >= 7, "the stream ended early: {seqs:?}");
    assert_eq!(seqs[0], 1, "the replay starts at the oldest kept: {seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "consecutive: {seqs:?}");

    // Shutdown ends the stream with its last chunk, and the server task.
    let _ = api.api.stop.send(true);
    assert!(stream.until_end().await, "the stream ends cleanly");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_and_a_closed_one_frees_its_place() {
    let api = api(AdminLimits::default()).await;
    let mut streams = Vec::new();
    for _ in 0..LIVE_STREAMS_MAX {
        let s = Stream::open(api.addr).await;
        assert_eq!(s.status(), 200, "{}", s.head);
        streams.push(s);
    }
    let (status, body) = get(api.addr, "/v1/live", Some(KEY)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "overload", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(&LIVE_STREAMS_MAX.to_string()));
    // The API itself still answers.
    assert_eq!(get(api.addr, "/v1/alerts", Some(KEY)).await.0, 200);
    // A viewer goes away: its place is given back (once the server has
    // noticed the closed socket, at its next write).
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = Stream::open(api.addr).await;
        if s.status() == 200 {
            streams.push(s);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the place was never given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(api.addr, "/v1/live", None).await.0, 401, "the key is required");
    api.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_quiet_stream_sends_a_keepalive_after_15_s_and_ends_on_shutdown() {
    // No sampler: nothing is published, as when the sampler stalls.
    let live = Live::new();
    let (stop, shutdown) = watch::channel(false);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    let state = super::StreamState {
        live: live.clone(),
        updates: live.subscribe(),
        shutdown,
        pending: Default::default(),
        seen: 0,
        _permit: permits.clone().try_acquire_owned().unwrap(),
    };
    let start = tokio::time::Instant::now();
    let (chunk, state) = super::next_chunk(state).await.unwrap();
    assert_eq!(chunk.unwrap(), ": keepalive\n\n");
    assert_eq!(start.elapsed(), Duration::from_millis(crate::limits::LIVE_KEEPALIVE_MS));
    // Shutdown ends it, and gives its place back.
    stop.send(true).unwrap();
    if let Some((chunk, _)) = super::next_chunk(state).await {
        panic!("{chunk:?} after shutdown");
    }
    assert_eq!(permits.available_permits(), 1);
}
