//! Issue 9: campaigns with fewer packets than shards paid the wrong packets
//! (1,000 fen in 1 packet paid one win of 250 and refunded 750; 30 fen in
//! [10, 20] released nothing). Against the real binary with 4 shards: each
//! campaign pays exactly what docs/api.md promises.

mod common;

use std::time::Duration;

use common::*;
use hongbao_proto::{Reply, Request, ShakeResult};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_campaigns_pay_their_rule_exactly_on_four_shards() {
    let server = Server::dev(&["--shards", "4"]);
    server.deposit(1, 10_000).await;
    let mut shakers = Vec::new();
    for user in 10..30u64 {
        shakers.push(server.client(user).await);
    }
    let cases = [
        (json!({"count": {"packets": 1}}), 1_000),
        (json!({"count": {"packets": 3}}), 30),
        (json!({"range": {"min_fen": 10, "max_fen": 20}}), 30),
        (json!({"range": {"min_fen": 20, "max_fen": 20}}), 20),
    ];
    for (i, (rule, total_fen)) in cases.into_iter().enumerate() {
        let body =
            json!({"funder": 1, "total_fen": total_fen, "rule": rule, "rate_per_s": 1_000, "key": format!("c{i}")});
        let campaign = server.post("/v1/campaigns", body).await.ok().unwrap()["id"].as_u64().unwrap();
        server.post(&format!("/v1/campaigns/{campaign}/start"), json!({})).await.ok().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut wins = Vec::new();
        for _ in 0..5 {
            for c in &shakers {
                if let Reply::Shake(ShakeResult::Won { amount_fen, .. }) =
                    c.request(Request::Shake { campaign, key: None }).await.unwrap()
                {
                    wins.push(amount_fen);
                }
            }
        }
        let info = server.post(&format!("/v1/campaigns/{campaign}/stop"), json!({})).await.ok().unwrap();
        let refunded = info["refunded_fen"].as_i64().unwrap();
        let case = format!("{rule}, {total_fen} fen: won {wins:?}, refunded {refunded}");
        assert_eq!(wins.iter().sum::<i64>() + refunded, total_fen, "{case}");
        match rule.get("count") {
            Some(count) => {
                assert_eq!(wins.len() as u64, count["packets"].as_u64().unwrap(), "{case}");
                assert_eq!(refunded, 0, "{case}");
            }
            None => {
                let (min, max) =
                    (rule["range"]["min_fen"].as_i64().unwrap(), rule["range"]["max_fen"].as_i64().unwrap());
                assert!(!wins.is_empty() && wins.iter().all(|a| (min..=max).contains(a)), "{case}");
                assert!(refunded < min, "{case}");
            }
        }
    }
    drop(server);
}
