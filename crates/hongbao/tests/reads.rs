//! Issue 9: one user could stall everyone's storage reads. 40 connections
//! with 64 reads in flight each took the blocking thread pool from 6 to 516
//! threads and an unrelated client's `balance` from 0.6 ms to seconds. Reads
//! now run on four reader threads fed by a bounded queue (over it:
//! `overload`), and `balance` reads no storage at all.

mod common;

use common::*;
use futures_util::future::join_all;
use hongbao_proto::{ErrorCode, Reply, Request, Target};

fn threads(pid: u32) -> u64 {
    hongbao_client::procfs::memory(pid).unwrap().threads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_reads_is_bounded_and_balance_needs_no_read() {
    let server = Server::dev(&[]);
    let pid = server.child.id();
    server.deposit(1, 10_000).await;
    server.deposit(2, 777).await;
    let sender = server.client(1).await;
    let reply = sender
        .request(Request::Send {
            amount_fen: 100,
            count: 2,
            kind: hongbao_proto::SplitKind::Lucky,
            to: Target::Users(vec![3, 4]),
            greeting: "hi".into(),
            key: "p".into(),
        })
        .await
        .unwrap();
    let Reply::Sent { packet, .. } = reply else { panic!("{reply:?}") };
    let before = threads(pid);

    let mut flooders = Vec::new();
    for user in 100..140u64 {
        flooders.push(server.client(user).await);
    }
    let victim = server.client(2).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(threads(pid));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            most
        })
    };
    let flood = join_all(flooders.iter().flat_map(|c| (0..64).map(move |_| c.request(Request::Detail { packet }))));
    let balances = async {
        let mut answered = 0;
        for _ in 0..50 {
            match victim.request(Request::Balance).await.unwrap() {
                Reply::Balance { balance_fen: 777 } => answered += 1,
                other => panic!("balance during the flood: {other:?}"),
            }
        }
        answered
    };
    let (results, answered) = tokio::join!(flood, balances);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most_threads = sampler.join().unwrap();

    assert_eq!(answered, 50, "every balance answered, none refused");
    let (mut read, mut refused) = (0, 0);
    for r in results {
        match r.unwrap() {
            Reply::Error { code: ErrorCode::NotEligible, .. } => read += 1,
            Reply::Error { code: ErrorCode::Overload, .. } => refused += 1,
            other => panic!("a detail: {other:?}"),
        }
    }
    assert!(read > 0, "reads still get through");
    // Reads run on the server's four reader threads, started with it; the
    // flood starts no thread (it took the blocking pool to 516 before).
    assert!(most_threads <= before + 2, "{before} threads before the flood, {most_threads} during it");
    eprintln!("{read} reads answered, {refused} refused as overload; threads {before} -> at most {most_threads}");
}
