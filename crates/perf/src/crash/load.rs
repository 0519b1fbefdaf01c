//! The mixed load of one crash cycle: keyed admin deposits, keyed client
//! sends (to groups and to user lists), opens of those packets by many
//! clients, shakes (plain and keyed) while a campaign runs, acks of
//! persistent messages, and maybe an operator stopping the campaign: all at
//! once, until the server is killed under them.
//!
//! Every task records what it was told in the cycle's `Board`; a request the
//! server died with is recorded as unanswered and ends its task (the server
//! is gone). Choices come from a seeded RNG per task, so a seed replays the
//! same choices (not the same interleaving: that is the scheduler's).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hongbao_client::{Admin, Client};
use hongbao_proto::{ErrorCode, Push, PushBody, Reply, Request, ShakeResult, SplitKind, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::record::{Acked, DepositAsk, Opened, Outcomes, Receipt, SendAsk, Sent, ShakeAsk, Won};
use super::{lock, mix, Cast};

/// How long a request may wait for its answer while the server is up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Share of `packet_received` notices an opener acknowledges as it goes
/// (the rest stay pending and come back on the next connect).
const ACK_SHARE: f64 = 0.8;

/// A packet the openers may open: acknowledged, addressed to `recipients`.
#[derive(Clone, Debug)]
pub struct Live {
    pub packet: u64,
    pub recipients: Arc<Vec<u64>>,
    pub expires_ms: u64,
}

/// A `packet_refunded` notice a sender got.
#[derive(Clone, Copy, Debug)]
pub struct RefundNotice {
    pub msg: u64,
    pub packet: u64,
    pub amount_fen: i64,
}

/// What the operator's stop of the campaign got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopAnswer {
    NotAsked,
    Acknowledged,
    /// Answered with the campaign finished already: it had released and
    /// been won in full before the stop came (a stop then changes nothing).
    Finished,
    /// Sent, and the server died before answering.
    Unanswered,
    /// Answered with an error status (nothing done).
    Refused(u16),
}

/// What one cycle's tasks share.
pub struct Board {
    pub cycle: u32,
    pub cast: Cast,
    pub campaign: Option<u64>,
    pub out: Mutex<Outcomes>,
    /// Packets to open: those still live from earlier cycles, then each one
    /// this cycle's senders get acknowledged.
    pub live: Mutex<Vec<Live>>,
    /// (user, packet) already tried, in any cycle: each user opens a
    /// packet once (a second open would only be a repeat).
    pub decided: Mutex<HashSet<(u64, u64)>>,
    /// (user, msg) → packet of every ack acknowledged before this cycle's
    /// connections: none of those messages may be delivered again.
    pub acked_before: Arc<HashMap<(u64, u64), u64>>,
    pub refunds: Mutex<Vec<RefundNotice>>,
    pub stop: Mutex<StopAnswer>,
    /// Set once the server is dead: the deposit loop ends.
    pub dead: AtomicBool,
}

impl Board {
    /// The server was killed: the load ends (a task with nothing to ask
    /// would not notice otherwise).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
}

/// A request's answer, or `None` when none came (the server died, or the
/// time limit passed: either way the outcome is unknown).
pub async fn ask(client: &Client, req: Request) -> Option<Reply> {
    client.request_timeout(req, REQUEST_TIMEOUT).await.ok()
}

/// Handles every push that has arrived: checks none is a message acked in
/// an earlier cycle, records refund notices, and acks persistent messages
/// (`packet_received` with probability `ack_share`). False if an ack went
/// unanswered (the server is gone).
pub async fn handle_pushes(client: &mut Client, user: u64, board: &Board, rng: &mut StdRng, ack_share: f64) -> bool {
    while let Some(Push { msg, body }) = client.next_push(Duration::ZERO).await {
        if msg == 0 {
            continue;
        }
        if let Some(packet) = board.acked_before.get(&(user, msg)) {
            lock(&board.out).violation(format!(
                "user {user}: message {msg} (packet {packet}) was acknowledged as acked, and came back: {body:?}"
            ));
        }
        let packet = match body {
            PushBody::PacketReceived { packet, .. } if rng.random_bool(ack_share) => packet,
            PushBody::PacketReceived { .. } => continue,
            PushBody::PacketRefunded { packet, amount_fen } => {
                lock(&board.refunds).push(RefundNotice { msg, packet, amount_fen });
                packet
            }
            _ => 0,
        };
        match ask(client, Request::Ack { msg }).await {
            None => return false,
            Some(Reply::Acked { msg: m }) if m == msg => lock(&board.out).acks.push(Acked { user, msg, packet }),
            Some(Reply::Error { code, .. }) => lock(&board.out).refuse(format!("ack {code:?}")),
            Some(other) => lock(&board.out).violation(format!("user {user}: ack {msg} answered {other:?}")),
        }
    }
    true
}

/// A sender: keyed sends to a group it is in or to a list of openers.
pub async fn sender(user: u64, mut client: Client, board: Arc<Board>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(mix(seed, user));
    for n in 0u64.. {
        if board.is_dead() || !handle_pushes(&mut client, user, &board, &mut rng, 1.0).await {
            return;
        }
        let send = draw_send(user, &board, &mut rng, n);
        let reply = ask(&client, send_request(&send)).await;
        if !note_send(&board, send, reply) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
    }
}

/// Records a send's answer; false if there was none (the server is gone).
fn note_send(board: &Board, send: SendAsk, reply: Option<Reply>) -> bool {
    let mut out = lock(&board.out);
    match reply {
        None => {
            out.sends_unanswered.push(send);
            return false;
        }
        Some(Reply::Sent { packet, amount_fen, count, expires_ms, repeat: false })
            if amount_fen == send.amount_fen && count == send.count =>
        {
            let live = Live { packet, recipients: Arc::new(send.recipients.clone()), expires_ms };
            lock(&board.live).push(live);
            out.sends.push(Sent { ask: send, packet, expires_ms });
        }
        Some(Reply::Error { code, .. }) => out.refuse(format!("send {code:?}")),
        Some(other) => {
            out.violation(format!("send {} by user {}: a fresh key answered {other:?}", send.key, send.sender))
        }
    }
    true
}

/// The request `ask` describes.
pub fn send_request(ask: &SendAsk) -> Request {
    Request::Send {
        amount_fen: ask.amount_fen,
        count: ask.count,
        kind: ask.kind,
        to: ask.to.clone(),
        greeting: String::new(),
        key: ask.key.clone(),
    }
}

fn draw_send(sender: u64, board: &Board, rng: &mut StdRng, n: u64) -> SendAsk {
    let (to, recipients) = if rng.random_bool(0.5) {
        let (group, members) = &board.cast.groups[rng.random_range(0..board.cast.groups.len())];
        (Target::Group(*group), members.clone())
    } else {
        let openers = &board.cast.openers;
        let k = rng.random_range(1..=openers.len().min(12));
        let mut list: Vec<u64> = (0..k).map(|_| openers[rng.random_range(0..openers.len())]).collect();
        list.sort_unstable();
        list.dedup();
        (Target::Users(list.clone()), list)
    };
    // Mostly no more shares than recipients; sometimes more, so that some
    // packets can only end by a refund.
    let most = if rng.random_bool(0.8) { recipients.len().min(10) } else { 12 };
    let count = rng.random_range(1..=most as u32);
    let (kind, amount_fen) = if rng.random_bool(0.5) {
        (SplitKind::Lucky, rng.random_range(i64::from(count)..=2_000))
    } else {
        (SplitKind::Fixed, i64::from(count) * rng.random_range(1..=150))
    };
    let key = format!("s{}-{sender}-{n}", board.cycle);
    SendAsk { sender, key, amount_fen, count, kind, to, recipients }
}

/// An opener: opens live packets it may open, acks most notices.
pub async fn opener(user: u64, mut client: Client, board: Arc<Board>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(mix(seed, user));
    loop {
        if board.is_dead() || !handle_pushes(&mut client, user, &board, &mut rng, ACK_SHARE).await {
            return;
        }
        let Some(packet) = pick(user, &board, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let reply = ask(&client, Request::Open { packet }).await;
        if !note_open(&board, user, packet, reply) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..8))).await;
    }
}

/// Records an open's answer; false if there was none.
fn note_open(board: &Board, user: u64, packet: u64, reply: Option<Reply>) -> bool {
    let mut out = lock(&board.out);
    match reply {
        None => {
            out.opens_unanswered.push((packet, user));
            return false;
        }
        Some(Reply::Opened { packet: p, amount_fen, .. }) if p == packet => {
            out.opens.push(Opened { packet, user, amount_fen })
        }
        Some(Reply::Error { code: code @ (ErrorCode::Finished | ErrorCode::Expired), .. }) => {
            out.refuse(format!("open {code:?}"))
        }
        Some(Reply::Error { code: code @ (ErrorCode::Overload | ErrorCode::Unavailable), .. }) => {
            // Nothing was done: it may be tried again.
            lock(&board.decided).remove(&(user, packet));
            out.refuse(format!("open {code:?}"))
        }
        Some(other) => out.violation(format!("open of packet {packet} by recipient {user} answered {other:?}")),
    }
    true
}

/// A live packet `user` may open and has not tried, marked as tried.
fn pick(user: u64, board: &Board, rng: &mut StdRng) -> Option<u64> {
    let live = lock(&board.live);
    let mut decided = lock(&board.decided);
    // Packets a little past their expiry too: those opens race the refund.
    let now = super::unix_ms();
    let open: Vec<u64> = live
        .iter()
        .filter(|l| l.expires_ms + 1_000 > now)
        .filter(|l| l.recipients.contains(&user) && !decided.contains(&(user, l.packet)))
        .map(|l| l.packet)
        .collect();
    let packet = *open.get(rng.random_range(0..open.len().max(1)))?;
    decided.insert((user, packet));
    Some(packet)
}

/// A shaker: plain and keyed shakes of the cycle's campaign.
pub async fn shaker(user: u64, mut client: Client, board: Arc<Board>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(mix(seed, user));
    let Some(campaign) = board.campaign else { return };
    for n in 0u64.. {
        if board.is_dead() || !handle_pushes(&mut client, user, &board, &mut rng, 1.0).await {
            return;
        }
        let key = rng.random_bool(0.5).then(|| format!("k{}-{user}-{n}", board.cycle));
        let shake = ShakeAsk { user, campaign, key };
        let reply = ask(&client, Request::Shake { campaign, key: shake.key.clone() }).await;
        if !note_shake(&board, shake, reply) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
    }
}

/// Records a shake's answer; false if there was none.
fn note_shake(board: &Board, shake: ShakeAsk, reply: Option<Reply>) -> bool {
    let mut out = lock(&board.out);
    let campaign = shake.campaign;
    match reply {
        None => {
            if shake.key.is_some() {
                out.shakes_unanswered.push(shake);
            }
            return false;
        }
        Some(Reply::Shake(ShakeResult::Won { campaign: c, packet, amount_fen })) if c == campaign => {
            out.wins.push(Won { ask: shake, packet, amount_fen })
        }
        Some(Reply::Shake(r @ (ShakeResult::None | ShakeResult::NotRunning | ShakeResult::Overload))) => {
            out.refuse(format!("shake {r:?}"))
        }
        Some(Reply::Error { code, .. }) => out.refuse(format!("shake {code:?}")),
        Some(other) => out.violation(format!("shake of campaign {campaign} by {} answered {other:?}", shake.user)),
    }
    true
}

/// Keyed admin deposits to random users until the server is gone (blocking:
/// run it on a blocking thread).
pub fn depositor(admin: Admin, board: Arc<Board>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let users = board.cast.everyone();
    for n in 0u64.. {
        if board.is_dead() {
            return;
        }
        let user = if rng.random_bool(0.5) {
            board.cast.senders[rng.random_range(0..board.cast.senders.len())]
        } else {
            users[rng.random_range(0..users.len())]
        };
        let ask = DepositAsk { key: format!("d{}-{n}", board.cycle), user, amount_fen: rng.random_range(1..=5_000) };
        let answer = admin.post(&deposit_path(user), &deposit_body(&ask));
        let mut out = lock(&board.out);
        match answer {
            Err(_) => return out.deposits_unanswered.push(ask),
            Ok(r) if r.status == 200 && r.body["repeat"] == false && r.body["amount_fen"] == ask.amount_fen => {
                match r.body["balance_fen"].as_i64() {
                    Some(balance_fen) => out.deposits.push(Receipt { ask, balance_fen }),
                    None => out.violation(format!("deposit {}: receipt without a balance: {}", ask.key, r.body)),
                }
            }
            Ok(r) if r.status == 200 => out.violation(format!("deposit {}: a fresh key answered {}", ask.key, r.body)),
            Ok(r) => out.refuse(format!("deposit HTTP {}", r.status)),
        }
        drop(out);
        std::thread::sleep(Duration::from_millis(rng.random_range(5..30)));
    }
}

pub fn deposit_path(user: u64) -> String {
    format!("/v1/accounts/{user}/deposit")
}

pub fn deposit_body(ask: &DepositAsk) -> serde_json::Value {
    json!({"amount_fen": ask.amount_fen, "key": ask.key})
}

/// The operator stops the campaign after `after` (racing the kill).
pub fn stopper(admin: Admin, board: Arc<Board>, campaign: u64, after: Duration) {
    std::thread::sleep(after);
    if board.is_dead() {
        return;
    }
    *lock(&board.stop) = StopAnswer::Unanswered;
    let answer = match admin.post(&format!("/v1/campaigns/{campaign}/stop"), &json!({})) {
        Err(_) => StopAnswer::Unanswered,
        Ok(r) if r.status == 200 && r.body["status"] == "stopped" => StopAnswer::Acknowledged,
        Ok(r) if r.status == 200 && r.body["status"] == "finished" => StopAnswer::Finished,
        Ok(r) if r.status == 200 => {
            lock(&board.out).violation(format!("stop of campaign {campaign} answered 200 with {}", r.body));
            StopAnswer::Acknowledged
        }
        Ok(r) => StopAnswer::Refused(r.status),
    };
    *lock(&board.stop) = answer;
}
