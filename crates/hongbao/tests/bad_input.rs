//! Bad input gets a clear error and harms nothing else: each case below is
//! followed by a check that the server still serves other clients.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hongbao_proto::{ErrorCode, Reply, Request, SplitKind, Target, FRAME_BYTES_MAX};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

async fn still_serving(server: &Server) {
    let c = server.client(4242).await;
    assert_eq!(c.request(Request::Ping).await.unwrap(), Reply::Pong);
    assert_eq!(server.get("/health").await.status, 200);
}

async fn closed_with(server: &Server, bytes: &[u8], hello_first: bool) -> Option<(ErrorCode, String)> {
    let c = if hello_first { server.client(77).await } else { Client::connect(server.tcp).await.unwrap() };
    c.send_raw(bytes).await.unwrap();
    c.wait_closed(WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_connection() {
    let server = Server::dev(&[]);
    let bystander = server.client(1).await;

    // Truncated: a header promising 100 bytes, 10 bytes, then EOF.
    let c = server.client(2).await;
    let mut bytes = 100u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 10]);
    c.send_raw(&bytes).await.unwrap();
    c.shutdown_write().await.unwrap();
    c.wait_closed(WAIT).await;
    assert!(c.is_closed());

    // Oversized: rejected from the header alone.
    let header = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
    assert_eq!(closed_with(&server, &header, true).await.map(|c| c.0), Some(ErrorCode::FrameTooLarge));

    // Unknown operation: request variant 99.
    let mut unknown = 2u32.to_be_bytes().to_vec();
    unknown.extend_from_slice(&[1, 99]);
    assert_eq!(closed_with(&server, &unknown, true).await.map(|c| c.0), Some(ErrorCode::UnknownOp));

    // Garbage body.
    let mut garbage = 3u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
    assert_eq!(closed_with(&server, &garbage, true).await.map(|c| c.0), Some(ErrorCode::Malformed));

    // Anything before hello.
    let ping = hongbao_proto::binary::encode_client(&hongbao_proto::ClientFrame { id: 1, req: Request::Ping });
    assert_eq!(closed_with(&server, &ping, false).await.map(|c| c.0), Some(ErrorCode::HelloRequired));

    assert_eq!(bystander.request(Request::Ping).await.unwrap(), Reply::Pong);
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_unknown_ops_on_websocket() {
    let server = Server::dev(&[]);
    for (text, code) in [
        ("{not json", "malformed"),
        (r#"{"id":1,"req":{"fly":{}}}"#, "unknown_op"),
        (r#"{"id":1,"req":{"hello":{"token":"1"}},"x":"#, "malformed"),
        (r#"{"id":1,"req":{"hello":{"token":42}}}"#, "malformed"),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", server.ws)).await.unwrap();
        ws.send(Message::Text(text.into())).await.unwrap();
        let mut close_code = None;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(WAIT, ws.next()).await {
            if let Message::Text(t) = msg {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                close_code = v["close"]["code"].as_str().map(str::to_owned);
            }
        }
        assert_eq!(close_code.as_deref(), Some(code), "for {text}");
    }
    // A number that overflows i64 is malformed, not wrapped.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", server.ws)).await.unwrap();
    ws.send(Message::Text(json!({"id": 1, "req": {"hello": {"token": "3"}}}).to_string().into())).await.unwrap();
    ws.next().await.unwrap().unwrap();
    let overflow = r#"{"id":2,"req":{"send":{"amount_fen":99999999999999999999999,"count":1,"kind":"lucky","to":{"user":4},"greeting":"","key":"k"}}}"#;
    ws.send(Message::Text(overflow.into())).await.unwrap();
    let msg = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(msg.to_text().unwrap().contains("malformed"), "{msg:?}");
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_amounts_and_strangers_get_clear_errors() {
    let server = Server::dev(&[]);
    server.deposit(1, 1_000).await;
    let c = server.client(1).await;
    let send = |amount_fen: i64, count: u32| Request::Send {
        amount_fen,
        count,
        kind: SplitKind::Lucky,
        to: Target::Users(vec![2, 3]),
        greeting: String::new(),
        key: format!("k{amount_fen}-{count}"),
    };
    for (amount, count, why) in
        [(0, 1, "zero"), (-5, 1, "negative"), (3, 5, "count > amount"), (100, 0, "zero count"), (i64::MAX, 1, "huge")]
    {
        match c.request(send(amount, count)).await.unwrap() {
            Reply::Error { code: ErrorCode::InvalidRequest, message } => assert!(!message.is_empty()),
            other => panic!("{why}: {other:?}"),
        }
    }
    // Still connected after request errors.
    assert_eq!(c.request(Request::Ping).await.unwrap(), Reply::Pong);
    let Reply::Sent { packet, .. } = c.request(send(100, 2)).await.unwrap() else { panic!() };
    let stranger = server.client(99).await;
    assert!(matches!(
        stranger.request(Request::Open { packet }).await.unwrap(),
        Reply::Error { code: ErrorCode::NotEligible, .. }
    ));
    assert!(matches!(
        stranger.request(Request::Open { packet: 12345 }).await.unwrap(),
        Reply::Error { code: ErrorCode::NotFound, .. }
    ));

    // The admin API rejects bad amounts and bad JSON with 400 and a message.
    for body in [json!({"amount_fen": 0, "key": "a"}), json!({"amount_fen": -1, "key": "b"}), json!({"amount_fen": 10})]
    {
        let r = server.post("/v1/accounts/1/deposit", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert!(r.body["error"]["message"].is_string());
    }
    let admin = server.admin();
    let r = tokio::task::spawn_blocking(move || {
        (
            admin
                .send_raw("POST", "/v1/accounts/1/deposit", r#"{"amount_fen": 99999999999999999999999, "key": "o"}"#)
                .unwrap(),
            admin.send_raw("POST", "/v1/accounts/1/deposit", "{nope").unwrap(),
            admin.send_raw("POST", "/v1/accounts/notanumber/deposit", r#"{"amount_fen": 1, "key": "x"}"#).unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!((r.0.status, r.1.status, r.2.status), (400, 400, 400));
    assert_eq!(server.get("/v1/accounts/1").await.body["balance_fen"], 900);
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_idle_connections_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_in(tmp.path(), false, &["--heartbeat-s", "1", "--idle-timeout-s", "2"]);
    let token = |user: &str, ttl: &str| {
        let out = hongbao()
            .args(["token", "--data", tmp.path().to_str().unwrap(), "--user", user, "--ttl-s", ttl])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let good = token("5", "3600");
    let (c, welcome) = Client::connect_with_token(server.tcp, &good).await.unwrap();
    assert!(matches!(welcome, Reply::Welcome { user: 5, .. }));
    // Idle past the timeout: closed with a reason.
    assert_eq!(c.wait_closed(WAIT).await.map(|c| c.0), Some(ErrorCode::IdleTimeout));

    // A bare user id is not a token outside --dev.
    let bare = Client::connect_with_token(server.tcp, "5").await;
    assert!(matches!(bare, Err(ClientError::Closed { code: ErrorCode::BadToken, .. })), "{:?}", bare.err());
    // A forged signature.
    let mut forged = good.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let r = Client::connect_with_token(server.tcp, &forged).await;
    assert!(matches!(r, Err(ClientError::Closed { code: ErrorCode::BadToken, .. })));
    // Another user's id with this signature.
    let swapped = good.replacen("v1.5.", "v1.6.", 1);
    let r = Client::connect_with_token(server.tcp, &swapped).await;
    assert!(matches!(r, Err(ClientError::Closed { code: ErrorCode::BadToken, .. })));
    // Expired.
    let short = token("5", "1");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let r = Client::connect_with_token(server.tcp, &short).await;
    assert!(matches!(r, Err(ClientError::Closed { code: ErrorCode::TokenExpired, .. })), "{:?}", r.err());

    // The admin API needs its key outside --dev.
    let anonymous = Admin::new(server.admin_addr, None);
    let keyed = server.admin();
    let (a, b) =
        tokio::task::spawn_blocking(move || (anonymous.get("/v1/stats").unwrap(), keyed.get("/v1/stats").unwrap()))
            .await
            .unwrap();
    assert_eq!((a.status, b.status), (401, 200));
    let (_c, w) = Client::connect_with_token(server.tcp, &token("8", "3600")).await.unwrap();
    assert!(matches!(w, Reply::Welcome { user: 8, .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_packets_are_refunded_to_a_waiting_sender() {
    let server = Server::dev(&["--packet-expiry-s", "1"]);
    server.deposit(1, 1_000).await;
    let mut sender = server.client(1).await;
    let Reply::Sent { packet, .. } = sender
        .request(Request::Send {
            amount_fen: 500,
            count: 5,
            kind: SplitKind::Lucky,
            to: Target::Users(vec![2, 3, 4, 5, 6]),
            greeting: String::new(),
            key: "exp".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let opener = server.client(2).await;
    let Reply::Opened { amount_fen, .. } = opener.request(Request::Open { packet }).await.unwrap() else { panic!() };
    let mut refund = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline && refund.is_none() {
        if let Some(p) = sender.next_push(Duration::from_millis(200)).await {
            if let hongbao_proto::PushBody::PacketRefunded { amount_fen, .. } = p.body {
                assert_ne!(p.msg, 0, "refunds are persistent messages");
                refund = Some(amount_fen);
            }
        }
    }
    assert_eq!(refund, Some(500 - amount_fen));
    assert_eq!(sender.request(Request::Balance).await.unwrap(), Reply::Balance { balance_fen: 1_000 - amount_fen });
    let late = server.client(3).await;
    assert!(matches!(
        late.request(Request::Open { packet }).await.unwrap(),
        Reply::Error { code: ErrorCode::Expired, .. }
    ));
    let (passed, report) = audit(&server.data);
    assert!(passed, "{report}");
}
