//! `serve --gateways N`: several gateway processes share the client ports
//! (SO_REUSEPORT) and reach the shards over the internal link. Real
//! processes, real sockets: connections land on every gateway, requests and
//! pushes from any of them work, money stays exact under a race, and a
//! gateway's death (or the serve process's) harms nothing else.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hongbao_client::procfs;
use hongbao_proto::{PushBody, Reply, Request};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// Sockets a process holds (its TCP connections, listeners and link).
fn sockets(pid: u32) -> usize {
    procfs::socket_fds(pid).unwrap_or(0)
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet).
fn gone(pid: u32) -> bool {
    procfs::stat(pid).is_none_or(|s| s.exited())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_the_ports_and_one_packet_is_raced_across_them() {
    const K: u32 = 25;
    const CLIENTS: u64 = 10 * K as u64;
    let server = Server::dev(&["--gateways", "3"]);
    assert_eq!(server.gateway_pids.len(), 2, "two gateway processes besides the serve process");
    let pids: Vec<u32> = std::iter::once(server.child.id()).chain(server.gateway_pids.iter().copied()).collect();
    let before: Vec<usize> = pids.iter().map(|&p| sockets(p)).collect();

    server.deposit(1, 20_000).await;
    let members: Vec<u64> = (1..=CLIENTS + 1).collect();
    server.put("/v1/groups/5", json!({"members": members})).await.ok().unwrap();
    let sender = server.client(1).await;
    let mut clients = Vec::new();
    for user in 2..=CLIENTS + 1 {
        clients.push((user, server.client(user).await));
    }

    // The kernel spread the connections over all three processes.
    let gained: Vec<usize> = pids.iter().zip(&before).map(|(&p, &b)| sockets(p).saturating_sub(b)).collect();
    assert_eq!(gained.iter().sum::<usize>(), CLIENTS as usize + 1, "one socket per client: {gained:?}");
    assert!(gained.iter().all(|&g| g >= 20), "every gateway holds clients: {gained:?}");
    let stats = server.get("/v1/stats").await.ok().unwrap();
    assert_eq!(stats["connections"], CLIENTS + 1, "the engine sees every gateway's connections");
    // The live view counts each process's own (the dashboard's table).
    let expected: Vec<(u64, u64)> = pids.iter().zip(&gained).map(|(&p, &g)| (p as u64, g as u64)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live = server.get("/v1/live/now").await.ok().unwrap_or_default();
        let seen: Vec<(u64, u64)> = live["connections"]["gateways"]
            .as_array()
            .map(|g| g.iter().map(|e| (e["pid"].as_u64().unwrap(), e["connections"].as_u64().unwrap())).collect())
            .unwrap_or_default();
        if seen == expected {
            assert_eq!(live["connections"]["total"], CLIENTS + 1);
            assert_eq!(live["connections"]["gateways"][0]["name"], "serve");
            break;
        }
        assert!(Instant::now() < deadline, "live gateways {seen:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let packet = send_to_group(&sender, 20_000, K, 5, "gw-race-1").await;

    // The group push reached every member, on whichever gateway.
    for (user, client) in &mut clients {
        let push = client.next_push(WAIT).await.unwrap_or_else(|| panic!("user {user} got no push"));
        assert!(matches!(push.body, PushBody::PacketReceived { packet: p, .. } if p == packet), "{push:?}");
    }

    let mut clients = race_open(clients, packet, K, 20_000).await;
    let detail = sender.request(Request::Detail { packet }).await.unwrap();
    let Reply::Detail(d) = detail else { panic!("{detail:?}") };
    assert_eq!((d.claims.len(), d.remaining_fen), (K as usize, 0));

    // A broadcast reaches every connection on every gateway.
    server.post("/v1/broadcast", json!({"topic": "gw", "text": "新年快乐"})).await.ok().unwrap();
    for (user, client) in &mut clients {
        loop {
            let push = client.next_push(WAIT).await.unwrap_or_else(|| panic!("user {user}: no broadcast"));
            if matches!(&push.body, PushBody::Notice { topic, .. } if topic == "gw") {
                break;
            }
        }
    }

    drop(clients);
    drop(sender);
    let mut server = server;
    assert!(server.terminate().success(), "clean exit; log:\n{}", server.log());
    for pid in &server.gateway_pids {
        wait_until("the gateway processes have exited", || gone(*pid));
    }
    let (passed, report) = audit(&server.data);
    assert!(passed, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateway_takes_only_its_own_connections() {
    let mut server = Server::dev(&["--gateways", "3"]);
    let victim = server.gateway_pids[0];
    // Listeners, the link and the runtime's own sockets, before any client.
    let base = sockets(victim);
    let mut clients = Vec::new();
    for user in 1..=60 {
        clients.push(server.client(user).await);
    }
    let on_victim = sockets(victim).saturating_sub(base);
    assert!(on_victim > 0, "some clients are on the gateway to be killed");

    let killed = std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap();
    assert!(killed.success());
    let mut closed = 0;
    let mut alive = 0;
    for client in &clients {
        if client.wait_closed(Duration::from_millis(300)).await.is_some() || client.is_closed() {
            closed += 1;
            continue;
        }
        let reply = client.request_timeout(Request::Balance, WAIT).await;
        assert!(matches!(reply, Ok(Reply::Balance { .. })), "{reply:?}");
        alive += 1;
    }
    assert_eq!(closed, on_victim, "exactly the dead gateway's clients were cut off");
    assert!(alive > 0, "closed {closed}, alive {alive}");
    // The engine forgot the dead gateway's connections.
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = server.get("/v1/stats").await.ok().unwrap();
        let connections = stats["connections"].as_u64().unwrap();
        if connections == alive || Instant::now() >= deadline {
            assert_eq!(connections, alive);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // New clients still get in (on the gateways that are left).
    let late = server.client(100).await;
    assert!(matches!(late.request(Request::Balance).await, Ok(Reply::Balance { .. })));

    // The serve process dies without a word: its gateways follow it.
    let survivor = server.gateway_pids[1];
    server.kill9();
    wait_until("the orphaned gateway has exited", || gone(survivor));
}
