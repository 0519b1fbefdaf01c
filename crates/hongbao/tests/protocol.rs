//! Every client message over real sockets: TCP binary frames and WebSocket
//! JSON (and binary) frames, pushes to several devices, persistent messages
//! for offline users, campaigns and broadcasts driven through the admin API.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hongbao_proto::{GrabState, PushBody, Reply, Request, ShakeResult, SplitKind, Target};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_session_covers_every_message() {
    let server = Server::dev(&[]);
    server.deposit(1, 10_000).await;
    server.put("/v1/groups/3", json!({"members": [1, 2, 3]})).await.ok().unwrap();

    let mut c1 = server.client(1).await;
    let mut c2 = server.client(2).await;
    let mut c2_phone = server.client(2).await;
    assert_eq!(c1.request(Request::Ping).await.unwrap(), Reply::Pong);
    assert_eq!(c1.request(Request::Balance).await.unwrap(), Reply::Balance { balance_fen: 10_000 });

    let sent = c1
        .request(Request::Send {
            amount_fen: 300,
            count: 3,
            kind: SplitKind::Lucky,
            to: Target::Group(3),
            greeting: "新年快乐".into(),
            key: "s1".into(),
        })
        .await
        .unwrap();
    let Reply::Sent { packet, amount_fen: 300, count: 3, repeat: false, .. } = sent else { panic!("{sent:?}") };

    // Both devices of user 2 hear about it, as a persistent message.
    let mut msg = 0;
    for device in [&mut c2, &mut c2_phone] {
        let push = device.next_push(WAIT).await.expect("packet push");
        assert!(matches!(push.body, PushBody::PacketReceived { packet: p, .. } if p == packet), "{push:?}");
        assert_ne!(push.msg, 0);
        msg = push.msg;
    }
    assert_eq!(c2.request(Request::Grab { packet }).await.unwrap(), Reply::Grab { packet, state: GrabState::CanOpen });
    let Reply::Opened { amount_fen, repeat: false, finished: false, .. } =
        c2.request(Request::Open { packet }).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(
        c2.request(Request::Grab { packet }).await.unwrap(),
        Reply::Grab { packet, state: GrabState::AlreadyOpened { amount_fen } }
    );
    let Reply::Detail(d) = c2.request(Request::Detail { packet }).await.unwrap() else { panic!() };
    assert_eq!((d.claims.len(), d.claims[0].user, d.remaining_fen), (1, 2, 300 - amount_fen));
    assert_eq!(c2.request(Request::Ack { msg }).await.unwrap(), Reply::Acked { msg });
    // The sender is told who opened.
    let mut saw_open = false;
    while let Some(p) = c1.next_push(WAIT).await {
        if matches!(p.body, PushBody::PacketOpened { user: 2, .. }) {
            saw_open = true;
            break;
        }
    }
    assert!(saw_open);

    // Shakes: nothing running, then a campaign through the admin API.
    assert_eq!(
        c2.request(Request::Shake { campaign: 0, key: None }).await.unwrap(),
        Reply::Shake(ShakeResult::NotRunning)
    );
    let c = server
        .post(
            "/v1/campaigns",
            json!({"funder": 1, "total_fen": 1000, "rule": {"count": {"packets": 10}}, "rate_per_s": 1000, "key": "camp"}),
        )
        .await
        .ok()
        .unwrap();
    let id = c["id"].as_u64().unwrap();
    server.post(&format!("/v1/campaigns/{id}/start"), json!({})).await.ok().unwrap();
    let mut won = None;
    for _ in 0..100 {
        match c2.request(Request::Shake { campaign: 0, key: Some(format!("k{}", rand_suffix())) }).await.unwrap() {
            Reply::Shake(ShakeResult::Won { amount_fen, .. }) => {
                won = Some(amount_fen);
                break;
            }
            Reply::Shake(ShakeResult::None) => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("{other:?}"),
        }
    }
    let won = won.expect("a shake wins within a second");
    assert_eq!(c2.request(Request::Balance).await.unwrap(), Reply::Balance { balance_fen: amount_fen + won });
    let stopped = server.post(&format!("/v1/campaigns/{id}/stop"), json!({})).await.ok().unwrap();
    assert_eq!(stopped["status"], "stopped");

    // A persistent push to an offline user waits for them, until acknowledged.
    let r = server
        .post("/v1/push", json!({"target": {"user": 9}, "persistent": true, "topic": "t", "text": "hello offline"}))
        .await
        .ok()
        .unwrap();
    assert_eq!(r["stored"], 1);
    let mut c9 = server.client(9).await;
    let p = c9.next_push(WAIT).await.expect("stored message on connect");
    assert!(matches!(&p.body, PushBody::Notice { text, .. } if text == "hello offline"));
    c9.request(Request::Ack { msg: p.msg }).await.unwrap();
    drop(c9);
    let mut c9 = server.client(9).await;
    assert!(c9.next_push(Duration::from_millis(300)).await.is_none(), "acknowledged messages are gone");

    // A broadcast reaches everyone online and reports progress.
    let task = server.post("/v1/broadcast", json!({"topic": "all", "text": "恭喜发财"})).await.ok().unwrap();
    let got = c9.next_push(WAIT).await.unwrap();
    assert!(matches!(got.body, PushBody::Notice { .. }) && got.msg == 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = server.get(&format!("/v1/tasks/{}", task["id"])).await.ok().unwrap();
    assert_eq!(t["state"], "done");
    assert!(t["delivered"].as_u64().unwrap() >= 4);
    // Prometheus: connections, requests by operation and result, latency
    // histograms, commit batch sizes, queue depths and money totals.
    let metrics = server.get("/metrics").await.body;
    let metrics = metrics.as_str().expect("metrics are text");
    for name in [
        "hongbao_connections",
        "hongbao_requests_total{op=\"shake\"",
        "hongbao_request_seconds",
        "hongbao_commit_batch_ops",
        "hongbao_writer_queue_depth",
        "hongbao_shard_queue_depth",
        "hongbao_user_balances_fen",
        "hongbao_campaign_escrow_fen",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    let (passed, report) = audit(&server.data);
    assert!(passed, "{report}");
}

async fn ws_send(ws: &mut (impl SinkExt<Message> + Unpin), v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.ok().unwrap();
}

async fn ws_next(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("ws reply").expect("ws open").unwrap();
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Binary(b) => return json!({"binary": b.to_vec()}),
            Message::Close(_) => return Value::Null,
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_speaks_json_and_binary() {
    let server = Server::dev(&[]);
    server.deposit(5, 700).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", server.ws)).await.unwrap();
    ws_send(&mut ws, json!({"id": 1, "req": {"hello": {"token": "5"}}})).await;
    let v = ws_next(&mut ws).await;
    assert_eq!(v["reply"]["id"], 1);
    assert_eq!(v["reply"]["reply"]["welcome"]["user"], 5);
    ws_send(&mut ws, json!({"id": 2, "req": "ping"})).await;
    assert_eq!(ws_next(&mut ws).await["reply"]["reply"], "pong");
    ws_send(&mut ws, json!({"id": 3, "req": "balance"})).await;
    assert_eq!(ws_next(&mut ws).await["reply"]["reply"]["balance"]["balance_fen"], 700);
    ws_send(&mut ws, json!({"id": 4, "req": {"shake": {"campaign": 0, "key": null}}})).await;
    assert_eq!(ws_next(&mut ws).await["reply"]["reply"]["shake"], "not_running");
    ws_send(
        &mut ws,
        json!({"id": 5, "req": {"send": {"amount_fen": 600, "count": 2, "kind": "fixed", "to": {"users": [6, 7]}, "greeting": "", "key": "w1"}}}),
    )
    .await;
    let sent = ws_next(&mut ws).await;
    let packet = sent["reply"]["reply"]["sent"]["packet"].as_u64().expect("sent");
    ws_send(&mut ws, json!({"id": 6, "req": {"detail": {"packet": packet}}})).await;
    assert_eq!(ws_next(&mut ws).await["reply"]["reply"]["detail"]["count"], 2);

    // A connection whose first frame is binary speaks postcard bodies (no
    // length prefix: WebSocket frames the messages) for its whole life.
    let (mut wsb, _) = tokio_tungstenite::connect_async(format!("ws://{}/", server.ws)).await.unwrap();
    for (id, req) in [(7, Request::Hello { token: "8".into() }), (8, Request::Ping)] {
        let body = hongbao_proto::binary::encode_client(&hongbao_proto::ClientFrame { id, req });
        wsb.send(Message::Binary(body[hongbao_proto::FRAME_HEADER_BYTES..].to_vec().into())).await.unwrap();
        let v = ws_next(&mut wsb).await;
        let bytes: Vec<u8> = serde_json::from_value(v["binary"].clone()).expect("binary reply");
        let frame = hongbao_proto::binary::decode_server(&bytes).unwrap();
        match frame {
            hongbao_proto::ServerFrame::Reply { id: got, reply } => {
                assert_eq!(got, id);
                if id == 8 {
                    assert_eq!(reply, Reply::Pong);
                } else {
                    assert!(matches!(reply, Reply::Welcome { user: 8, .. }), "{reply:?}");
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // The opener on TCP gets the fixed share.
    let c6 = server.client(6).await;
    assert!(matches!(c6.request(Request::Open { packet }).await.unwrap(), Reply::Opened { amount_fen: 300, .. }));
}
