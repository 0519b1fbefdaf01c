//! One packet of count K opened by 10 × K concurrent clients over real TCP
//! connections: exactly K opens, amounts summing to the packet, no user twice,
//! and `hongbao audit` passes.

mod common;

use common::*;
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
    let packet = send_to_group(&sender, 20_000, K, 5, "race-1").await;

    // Connect everyone first, then open at once.
    let mut clients = Vec::new();
    for user in 2..=CLIENTS + 1 {
        clients.push((user, server.client(user).await));
    }
    race_open(clients, packet, K, 20_000).await;

    let detail = server.get(&format!("/v1/packets/{packet}")).await.ok().unwrap();
    assert_eq!(detail["status"], "finished");
    assert_eq!(detail["claims"].as_array().unwrap().len(), K as usize);
    let (passed, report) = audit(&server.data);
    assert!(passed, "{report}");
}
