//! Issue 9: a user sent 1,000 one-fen packets to a victim in 10 s and the
//! victim's oldest stored message, an operator's notice, was pushed out of
//! the 1,000-message cap. Against the real binary: with the send rate off,
//! the flood still cannot evict the operator's notice; with the default
//! rate, the flood is refused `rate_limited`.

mod common;

use std::time::Duration;

use common::*;
use hongbao_proto::{ErrorCode, PushBody, Reply, Request, SplitKind, Target};
use serde_json::json;

fn one_fen_to(user: u64, key: String) -> Request {
    Request::Send {
        amount_fen: 1,
        count: 1,
        kind: SplitKind::Lucky,
        to: Target::User(user),
        greeting: String::new(),
        key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_flood_never_evicts_an_operators_notice() {
    let server = Server::dev(&["--sends-per-s", "0"]);
    let victim = 9;
    let notice =
        json!({"target": {"user": victim}, "persistent": true, "topic": "ops", "text": "maintenance at 02:00"});
    server.post("/v1/push", notice).await.ok().unwrap();
    server.deposit(1, 10_000).await;
    let spammer = server.client(1).await;
    for i in 0..=1_000 {
        match spammer.request(one_fen_to(victim, format!("spam-{i}"))).await.unwrap() {
            Reply::Sent { .. } => {}
            other => panic!("send {i}: {other:?}"),
        }
    }
    let mut victim_conn = server.client(victim).await;
    let first = victim_conn.next_push(Duration::from_secs(5)).await.expect("stored messages are delivered");
    assert!(
        matches!(&first.body, PushBody::Notice { topic, .. } if topic == "ops"),
        "the operator's notice survives and comes first: {first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_flood_of_sends_is_rate_limited() {
    let server = Server::dev(&[]);
    server.deposit(1, 10_000).await;
    let spammer = server.client(1).await;
    let (mut sent, mut limited) = (0u64, 0u64);
    let started = std::time::Instant::now();
    for i in 0..100 {
        match spammer.request(one_fen_to(9, format!("s-{i}"))).await.unwrap() {
            Reply::Sent { .. } => sent += 1,
            Reply::Error { code: ErrorCode::RateLimited, .. } => limited += 1,
            other => panic!("send {i}: {other:?}"),
        }
    }
    // The default bucket: bursts of 20, then 10 a second. However long the
    // sends took, no more passed than it allows (however fast the machine).
    let elapsed_s = started.elapsed().as_secs_f64();
    let allowed = 20 + (10.0 * elapsed_s).ceil() as u64;
    assert!(sent <= allowed, "{sent} sent in {elapsed_s:.2} s; the default rate allows {allowed}");
    assert!(limited > 0 || allowed >= 100, "{sent} sent, none refused, in {elapsed_s:.2} s");
}
