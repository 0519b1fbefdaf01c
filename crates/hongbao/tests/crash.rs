//! kill -9 during a stream of opens: after a restart `hongbao audit` passes
//! and every open a client saw acknowledged is in the ledger.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hongbao_proto::{Reply, Request, SplitKind, Target};

const OPENERS: u64 = 30;
const PACKETS: usize = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_opens_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    // Many packets from one sender, fast: not what the send rate is for.
    let mut server = Server::start_in(tmp.path(), true, &["--sends-per-s", "0"]);
    server.deposit(1, 10_000_000).await;
    let openers: Vec<u64> = (2..2 + OPENERS).collect();
    let sender = server.client(1).await;
    let mut packets = Vec::new();
    for i in 0..PACKETS {
        let req = Request::Send {
            amount_fen: 1_000,
            count: 10,
            kind: if i % 2 == 0 { SplitKind::Lucky } else { SplitKind::Fixed },
            to: Target::Users(openers.clone()),
            greeting: String::new(),
            key: format!("crash-{i}"),
        };
        match sender.request(req).await.unwrap() {
            Reply::Sent { packet, .. } => packets.push(packet),
            other => panic!("{other:?}"),
        }
    }
    let packets = Arc::new(packets);

    // Every opener walks the packets; each acknowledged open is recorded.
    let acked: Arc<Mutex<Vec<(u64, u64, i64)>>> = Arc::default();
    let mut tasks = Vec::new();
    for &user in &openers {
        let client = server.client(user).await;
        let (packets, acked) = (packets.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for &packet in packets.iter() {
                match client.request_timeout(Request::Open { packet }, Duration::from_secs(5)).await {
                    Ok(Reply::Opened { amount_fen, repeat: false, .. }) => {
                        acked.lock().unwrap().push((packet, user, amount_fen))
                    }
                    Ok(_) => {}
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    // Let opens flow, then pull the plug mid-stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 300 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300, "opens were flowing when the server died: {}", acked.len());

    let restarted = Server::start_in(tmp.path(), true, &[]);
    let (passed, report) = audit(tmp.path());
    assert!(passed, "audit after crash: {report}");
    let mut claims: HashMap<(u64, u64), i64> = HashMap::new();
    for &packet in packets.iter() {
        let d = restarted.get(&format!("/v1/packets/{packet}")).await.ok().unwrap();
        for c in d["claims"].as_array().unwrap() {
            claims.insert((packet, c["user"].as_u64().unwrap()), c["amount_fen"].as_i64().unwrap());
        }
    }
    for (packet, user, amount) in &acked {
        assert_eq!(claims.get(&(*packet, *user)), Some(amount), "acknowledged open of packet {packet} by {user} lost");
    }
    // The recovered server keeps working on the same packets.
    // An open committed before the crash answers its first share again;
    // otherwise the user opens now or learns the packet is finished.
    let (user, packet) = (openers[0], *packets.last().unwrap());
    let late = restarted.client(user).await;
    let r = late.request(Request::Open { packet }).await.unwrap();
    match claims.get(&(packet, user)) {
        Some(&amount) => assert!(
            matches!(r, Reply::Opened { amount_fen, repeat: true, .. } if amount_fen == amount),
            "a committed open must answer its first share: {r:?}"
        ),
        None => assert!(
            matches!(
                r,
                Reply::Opened { repeat: false, .. } | Reply::Error { code: hongbao_proto::ErrorCode::Finished, .. }
            ),
            "{r:?}"
        ),
    }
}
