//! Idle connections park (issue 14): after `--park-after-s` of nothing but
//! heartbeats a connection gives up its task and its place in the runtime's
//! reactor, and still the client's requests, pushes, packets, broadcasts,
//! its idle deadline and the server's shutdown reach it — over TCP and
//! WebSocket, on the serve process's gateway and on a child gateway's.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use hongbao_proto::{ErrorCode, PushBody, Reply, Request, SplitKind, Target};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// Waits (at most `WAIT`) until the serve process's gateway has `n`
/// connections parked; returns how many it has then.
async fn parked(server: &Server, n: f64) -> f64 {
    let until = Instant::now() + WAIT;
    loop {
        let now = metric(server, "hongbao_connections_parked", &[]).await;
        if now == n || Instant::now() > until {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_client(server: &Server, user: u64) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", server.ws)).await.unwrap();
    ws_send(&mut ws, json!({"id": 1, "req": {"hello": {"token": user.to_string()}}})).await;
    assert_eq!(ws_next(&mut ws).await["reply"]["reply"]["welcome"]["user"], user);
    ws
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next JSON message (`Null` at a close), within `WAIT`.
async fn ws_next(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a websocket message in time") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(_))) | None => return Value::Null,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("websocket error: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_wake_for_requests_pushes_packets_and_broadcasts() {
    let server = Server::dev(&["--park-after-s", "1", "--heartbeat-s", "2", "--idle-timeout-s", "60"]);
    server.deposit(1, 10_000).await;
    let sender = server.client(1).await;
    let mut tcp = server.client(2).await;
    let mut ws = ws_client(&server, 3).await;
    assert_eq!(parked(&server, 3.0).await, 3.0, "three idle connections park");

    // A heartbeat is answered from parking, and does not keep the
    // connection awake.
    assert_eq!(tcp.request(Request::Ping).await.unwrap(), Reply::Pong);
    ws_send(&mut ws, json!({"id": 2, "req": "ping"})).await;
    assert_eq!(ws_next(&mut ws).await["reply"]["reply"], "pong");
    assert_eq!(parked(&server, 3.0).await, 3.0, "heartbeats leave them parked");

    // A packet sent from a parked connection reaches two parked ones, which
    // open it.
    let send = Request::Send {
        amount_fen: 600,
        count: 2,
        kind: SplitKind::Fixed,
        to: Target::Users(vec![2, 3]),
        greeting: String::new(),
        key: "park-1".into(),
    };
    let Reply::Sent { packet, .. } = sender.request(send).await.unwrap() else { panic!("not sent") };
    let push = tcp.next_push(WAIT).await.expect("the packet's push reaches the parked TCP client");
    assert!(matches!(push.body, PushBody::PacketReceived { packet: p, .. } if p == packet), "{push:?}");
    let pushed = ws_next(&mut ws).await;
    assert_eq!(pushed["push"]["body"]["packet_received"]["packet"], packet, "{pushed}");
    let opened = tcp.request(Request::Open { packet }).await.unwrap();
    assert!(matches!(opened, Reply::Opened { amount_fen: 300, repeat: false, .. }), "{opened:?}");
    ws_send(&mut ws, json!({"id": 3, "req": {"open": {"packet": packet}}})).await;
    let opened = ws_next(&mut ws).await;
    assert_eq!(opened["reply"]["reply"]["opened"]["amount_fen"], 300, "{opened}");

    // Idle again, they park again; a broadcast wakes every one.
    assert_eq!(parked(&server, 3.0).await, 3.0, "idle again, they park again");
    server.post("/v1/broadcast", json!({"topic": "all", "text": "新年快乐"})).await.ok().unwrap();
    let notice = tcp.next_push(WAIT).await.expect("the broadcast reaches the parked TCP client");
    assert!(matches!(notice.body, PushBody::Notice { ref text, .. } if text == "新年快乐"), "{notice:?}");
    let mut ws_notice = ws_next(&mut ws).await;
    while ws_notice.get("push").is_some_and(|p| p["body"].get("notice").is_none()) {
        // The sender's own pushes (opened, finished) do not come here, but
        // be explicit about what is skipped.
        ws_notice = ws_next(&mut ws).await;
    }
    assert_eq!(ws_notice["push"]["body"]["notice"]["text"], "新年快乐", "{ws_notice}");

    drop((sender, tcp, ws));
    let (passed, report) = audit_after_stop(server);
    assert!(passed, "{report}");
}

/// Stops the server and audits its data.
fn audit_after_stop(mut server: Server) -> (bool, Value) {
    assert!(server.terminate().success());
    audit(&server.data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_time_out_hang_up_and_hear_the_shutdown() {
    let mut server = Server::dev(&["--park-after-s", "1", "--heartbeat-s", "1", "--idle-timeout-s", "4"]);
    let silent = server.client(1).await;
    let leaving = server.client(2).await;
    let keeping = server.client(3).await;
    assert_eq!(parked(&server, 3.0).await, 3.0);

    // The peer hangs up while parked: the server lets the connection go.
    drop(leaving);
    assert_eq!(parked(&server, 2.0).await, 2.0, "a hang-up wakes and ends a parked connection");

    // One client heartbeats, one is silent: the silent one is cut off at
    // its idle deadline, parked or not.
    let heartbeats = async {
        for _ in 0..6 {
            assert_eq!(keeping.request(Request::Ping).await.unwrap(), Reply::Pong);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let (_, closed) = tokio::join!(heartbeats, silent.wait_closed(WAIT));
    assert_eq!(closed.map(|c| c.0), Some(ErrorCode::IdleTimeout));
    assert!(!keeping.is_closed(), "a client that heartbeats is kept");

    // Shutdown reaches the parked one.
    assert_eq!(parked(&server, 1.0).await, 1.0);
    assert!(server.terminate().success());
    assert_eq!(keeping.wait_closed(WAIT).await.map(|c| c.0), Some(ErrorCode::ShuttingDown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_parked_on_child_gateways_get_pushes_and_answer() {
    // Three gateway processes; 30 clients spread over them by the kernel.
    let server =
        Server::dev(&["--gateways", "3", "--park-after-s", "1", "--heartbeat-s", "2", "--idle-timeout-s", "60"]);
    let mut clients = Vec::new();
    for user in 100..130 {
        clients.push(server.client(user).await);
    }
    // Long enough for every one to park. Only the serve process's own
    // gateway shows its gauge here; the kernel gives it about a third.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(metric(&server, "hongbao_connections_parked", &[]).await >= 1.0);
    let pushed = server
        .post("/v1/push", json!({"target": {"users": (100..130).collect::<Vec<u64>>()}, "topic": "t", "text": "hi"}))
        .await
        .ok()
        .unwrap();
    assert_eq!(pushed["delivered"], 30, "{pushed}");
    for c in &mut clients {
        let push = c.next_push(WAIT).await.expect("the push reaches every parked client");
        assert!(matches!(push.body, PushBody::Notice { ref text, .. } if text == "hi"), "{push:?}");
        assert_eq!(c.request(Request::Balance).await.unwrap(), Reply::Balance { balance_fen: 0 });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_clients_racing_one_packet_get_exactly_its_shares() {
    // One packet of K shares, opened at once by 10 × K clients that were
    // all parked: every open wakes its connection on the way in.
    let server = Server::dev(&["--park-after-s", "1", "--heartbeat-s", "2", "--idle-timeout-s", "60"]);
    let (k, amount_fen, racers) = (5u32, 1_000i64, 50u64);
    server.deposit(1, amount_fen).await;
    let members: Vec<u64> = (1..=racers + 1).collect();
    server.put("/v1/groups/5", json!({"members": members})).await.ok().unwrap();
    let sender = server.client(1).await;
    let packet = send_to_group(&sender, amount_fen, k, 5, "park-race").await;
    let mut clients = Vec::new();
    for user in 2..=racers + 1 {
        clients.push((user, server.client(user).await));
    }
    // The packet's push woke the members; they park again once idle.
    assert_eq!(parked(&server, (racers + 1) as f64).await, (racers + 1) as f64, "every client parked");
    let clients = race_open(clients, packet, k, amount_fen).await;
    drop((sender, clients));
    let (passed, report) = audit_after_stop(server);
    assert!(passed, "{report}");
}
