//! What the overload phases need on the server: a running campaign for the
//! shakes, and for the opens many packets, each addressed to a block of
//! `BLOCK` users and split in as many shares, so that every user of a block
//! races the others for every packet of its block and each open takes a
//! real share (a user opens a packet once).
//!
//! Packets are sent by many senders (each funded by a keyed deposit) with
//! `send`, pipelined: every share is one `packet_received` notice kept for
//! its recipient, and a sender may have at most 10,000 undelivered notices,
//! so each sender sends at most `SENDS_PER_SENDER`.

use std::collections::VecDeque;
use std::net::SocketAddr;

use anyhow::{ensure, Context};
use hongbao_client::{Admin, Client};
use hongbao_proto::{Reply, Request, SplitKind, Target};
use serde_json::json;

/// Users per block, and shares per packet.
pub const BLOCK: u64 = 100;
/// Fen per packet (lucky split over `BLOCK` shares).
const PACKET_FEN: i64 = 1_000;
/// Packets one sender sends: its recipients' notices stay under the
/// server's 10,000 undelivered per sender.
const SENDS_PER_SENDER: u64 = 90;
/// Sends in flight per sender connection (the server's limit is 64).
const SENDS_IN_FLIGHT: usize = 64;
/// Senders sending at once.
const SENDERS_AT_ONCE: usize = 8;
/// The campaign's funder and its shape: a budget no phase exhausts,
/// releasing `CAMPAIGN_RATE_PER_S` packets a second of 1–2 fen.
const FUNDER: u64 = 900_000;
const CAMPAIGN_FEN: i64 = 100_000_000;
const CAMPAIGN_RATE_PER_S: u64 = 1_000;

/// Creates and starts the shake campaign; returns its id.
pub fn campaign(admin: &Admin) -> anyhow::Result<u64> {
    post(
        admin,
        &format!("/v1/accounts/{FUNDER}/deposit"),
        json!({"amount_fen": CAMPAIGN_FEN, "key": "overload-fund"}),
    )?;
    let created = post(
        admin,
        "/v1/campaigns",
        json!({"funder": FUNDER, "total_fen": CAMPAIGN_FEN, "rule": {"range": {"min_fen": 1, "max_fen": 2}},
               "rate_per_s": CAMPAIGN_RATE_PER_S, "key": "overload-campaign"}),
    )?;
    let id = created["id"].as_u64().with_context(|| format!("campaign {created}"))?;
    let started = admin.send_raw("POST", &format!("/v1/campaigns/{id}/start"), "").map_err(anyhow::Error::msg)?;
    let started = started.ok().map_err(anyhow::Error::msg)?;
    ensure!(started["status"] == "running", "campaign {id} started as {started}");
    Ok(id)
}

/// The release rate of the campaign, for the report.
pub fn campaign_rate() -> u64 {
    CAMPAIGN_RATE_PER_S
}

pub(crate) fn post(admin: &Admin, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    admin
        .post(path, &body)
        .map_err(anyhow::Error::msg)?
        .ok()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("POST {path}"))
}

/// The open users' blocks: `users` split in blocks of `BLOCK`.
pub fn blocks(users: &[u64]) -> Vec<Vec<u64>> {
    users.chunks(BLOCK as usize).map(<[u64]>::to_vec).collect()
}

/// Sends `per_block` packets to each block, from senders `first_sender`,
/// … (each funded, each sending at most `SENDS_PER_SENDER`); returns each
/// block's packets in the order they were sent, and the next unused sender.
pub async fn packets(
    addr: SocketAddr,
    admin: &Admin,
    blocks: &[Vec<u64>],
    per_block: u64,
    first_sender: u64,
) -> anyhow::Result<(Vec<Vec<u64>>, u64)> {
    // (sender, block, packets) jobs, then run them a few senders at a time.
    let mut jobs = Vec::new();
    let mut sender = first_sender;
    for (b, _) in blocks.iter().enumerate() {
        let mut left = per_block;
        while left > 0 {
            let n = left.min(SENDS_PER_SENDER);
            jobs.push((sender, b, n));
            sender += 1;
            left -= n;
        }
    }
    for &(s, _, n) in &jobs {
        let admin = admin.clone();
        let body = json!({"amount_fen": PACKET_FEN * n as i64, "key": format!("overload-sender-{s}")});
        tokio::task::spawn_blocking(move || post(&admin, &format!("/v1/accounts/{s}/deposit"), body)).await??;
    }
    let mut per = vec![Vec::new(); blocks.len()];
    for chunk in jobs.chunks(SENDERS_AT_ONCE) {
        let sends = chunk.iter().map(|&(s, b, n)| send_all(addr, s, &blocks[b], n));
        for (r, &(_, b, _)) in futures_util::future::join_all(sends).await.into_iter().zip(chunk) {
            per[b].extend(r?);
        }
    }
    Ok((per, sender))
}

/// One sender's `n` packets to `block`, `SENDS_IN_FLIGHT` at a time.
async fn send_all(addr: SocketAddr, sender: u64, block: &[u64], n: u64) -> anyhow::Result<Vec<u64>> {
    let (client, _) = Client::connect_with_token(addr, &sender.to_string()).await?;
    let mut packets = Vec::with_capacity(n as usize);
    let keys: Vec<u64> = (0..n).collect();
    for chunk in keys.chunks(SENDS_IN_FLIGHT) {
        let sends = chunk.iter().map(|&i| {
            client.request(Request::Send {
                amount_fen: PACKET_FEN,
                count: BLOCK as u32,
                kind: SplitKind::Lucky,
                to: Target::Users(block.to_vec()),
                greeting: String::new(),
                key: format!("o{sender}-{i}"),
            })
        });
        for reply in futures_util::future::join_all(sends).await {
            match reply? {
                Reply::Sent { packet, .. } => packets.push(packet),
                other => anyhow::bail!("sender {sender}: send answered {other:?}"),
            }
        }
    }
    Ok(packets)
}

/// Each user's queue: its block's packets, in order, so the users of a
/// block race for the same packet at about the same time.
pub fn queues(blocks: &[Vec<u64>], packets: &[Vec<u64>]) -> Vec<VecDeque<u64>> {
    blocks.iter().zip(packets).flat_map(|(users, ps)| users.iter().map(move |_| ps.iter().copied().collect())).collect()
}
