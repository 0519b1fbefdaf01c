//! One packet of count K opened by 10 × K concurrent clients over real TCP
//! connections: exactly K opens, amounts summing to the packet, no user twice,
//! and `hongbao audit` passes.

mod common;

use common::*;
use hongbao_proto::{ErrorCode, Reply, Request, SplitKind, Target};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_packet_opened_by_ten_times_its_count_in_parallel() {
    const K: u32 = 25;
    const CLIENTS: u64 = 10 * K as u64;
    let server = Server::dev(&[]);
    server.deposit(1, 20_000).await;
    let members: Vec<u64> = (1..=CLIENTS + 1).collect();
    server.put("/v1/groups/5", json!({"members": members})).await.ok().unwrap();

    let sender = server.client(1).await;
    let reply = sender
        .request(Request::Send {
            amount_fen: 20_000,
            count: K,
            kind: SplitKind::Lucky,
            to: Target::Group(5),
            greeting: "race".into(),
            key: "race-1".into(),
        })
        .await
        .unwrap();
    let Reply::Sent { packet, .. } = reply else { panic!("{reply:?}") };

    // Connect everyone first, then open at once.
    let mut clients = Vec::new();
    for user in 2..=CLIENTS + 1 {
        clients.push((user, server.client(user).await));
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut tasks = Vec::new();
    for (user, client) in clients {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            (user, client.request(Request::Open { packet }).await.unwrap())
        }));
    }
    let mut opened = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (user, Reply::Opened { amount_fen, repeat: false, .. }) => opened.push((user, amount_fen)),
            (_, Reply::Error { code: ErrorCode::Finished, .. }) => {}
            (user, other) => panic!("user {user} got {other:?}"),
        }
    }
    assert_eq!(opened.len(), K as usize);
    assert_eq!(opened.iter().map(|o| o.1).sum::<i64>(), 20_000);
    let mut users: Vec<u64> = opened.iter().map(|o| o.0).collect();
    users.sort_unstable();
    users.dedup();
    assert_eq!(users.len(), K as usize);

    let detail = server.get(&format!("/v1/packets/{packet}")).await.ok().unwrap();
    assert_eq!(detail["status"], "finished");
    assert_eq!(detail["claims"].as_array().unwrap().len(), K as usize);
    let (passed, report) = audit(&server.data);
    assert!(passed, "{report}");
}
