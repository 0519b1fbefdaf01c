//! The checks after a restart: every acknowledged outcome is there exactly
//! once, and every unanswered keyed request, retried with its key, is
//! applied at most once.
//!
//! - deposits: retrying the key answers `repeat: true` and the balance the
//!   first receipt reported;
//! - sends: re-sending with the key answers `repeat: true` and the same
//!   packet;
//! - opens: each is a claim of that amount in the packet's committed
//!   detail (admin API), once, and the packet adds up; opening again
//!   answers the same share as a repeat;
//! - keyed wins: retrying the key answers the same win;
//! - unanswered deposits, sends and keyed shakes are retried twice: the
//!   second answer must be a repeat of the first (no double apply), and
//!   the first becomes an acknowledged outcome checked from then on; an
//!   unanswered open is retried once (opens are idempotent per user).
//!
//! Campaign totals and refunds after expiry are checked in `mod.rs`, which
//! keeps the run's campaigns and packets.

use std::collections::{BTreeMap, HashMap};

use hongbao_client::{Admin, AdminResponse, Client};
use hongbao_proto::{ErrorCode, PacketDetail, Reply, Request, ShakeResult};

use super::load::{ask, deposit_body, deposit_path, send_request};
use super::record::{check_claims, Checked, DepositAsk, Opened, Outcomes, Receipt, SendAsk, Sent, ShakeAsk, Won};

/// One round of checks against a restarted server.
pub struct Check<'a> {
    pub admin: Admin,
    pub clients: &'a HashMap<u64, Client>,
    /// What the retries got acknowledged, and every violation found.
    pub out: Outcomes,
    pub checked: Checked,
}

impl Check<'_> {
    fn client(&self, user: u64) -> &Client {
        self.clients.get(&user).expect("every user of the cast is connected")
    }

    async fn post(&self, path: String, body: serde_json::Value) -> Result<AdminResponse, String> {
        let admin = self.admin.clone();
        tokio::task::spawn_blocking(move || admin.post(&path, &body)).await.map_err(|e| e.to_string())?
    }

    pub async fn get(&self, path: String) -> Result<AdminResponse, String> {
        let admin = self.admin.clone();
        tokio::task::spawn_blocking(move || admin.get(&path)).await.map_err(|e| e.to_string())?
    }

    /// A packet's committed detail from the admin API.
    pub async fn detail(&self, packet: u64) -> Result<PacketDetail, String> {
        let body = self.get(format!("/v1/packets/{packet}")).await?.ok()?;
        serde_json::from_value(body.clone()).map_err(|e| format!("packet {packet}: unreadable detail {body}: {e}"))
    }

    /// A deposit's receipt now: (repeat, balance_fen).
    async fn deposit(&self, ask: &DepositAsk) -> Result<(bool, i64), String> {
        let body = self.post(deposit_path(ask.user), deposit_body(ask)).await?.ok()?;
        match (body["repeat"].as_bool(), body["balance_fen"].as_i64()) {
            (Some(repeat), Some(balance)) if body["amount_fen"] == ask.amount_fen => Ok((repeat, balance)),
            _ => Err(format!("deposit {}: odd receipt {body}", ask.key)),
        }
    }

    pub async fn deposits(&mut self, acked: &[Receipt]) {
        for r in acked {
            match self.deposit(&r.ask).await {
                Ok((true, balance)) if balance == r.balance_fen => {}
                Ok((repeat, balance)) => self.out.violation(format!(
                    "deposit {} ({} fen to user {}): the retry answered repeat={repeat} balance {balance} fen, the \
                     acknowledged receipt said balance {} fen",
                    r.ask.key, r.ask.amount_fen, r.ask.user, r.balance_fen
                )),
                Err(e) => self.out.violation(format!("deposit {} retried: {e}", r.ask.key)),
            }
            self.checked.deposits += 1;
        }
    }

    pub async fn deposits_unanswered(&mut self, asks: Vec<DepositAsk>) {
        for ask in asks {
            let first = self.deposit(&ask).await;
            let second = self.deposit(&ask).await;
            match (first, second) {
                (Ok((_, b1)), Ok((true, b2))) if b1 == b2 => {
                    self.out.deposits.push(Receipt { ask, balance_fen: b1 });
                }
                (first, second) => self.out.violation(format!(
                    "unanswered deposit {} retried twice: {first:?}, then {second:?} (the second must repeat the \
                     first)",
                    ask.key
                )),
            }
            self.checked.retried += 1;
        }
    }

    async fn send(&self, a: &SendAsk) -> Option<Reply> {
        ask(self.client(a.sender), send_request(a)).await
    }

    pub async fn sends(&mut self, acked: &[Sent]) {
        for s in acked {
            match self.send(&s.ask).await {
                Some(Reply::Sent { packet, repeat: true, .. }) if packet == s.packet => {}
                other => self.out.violation(format!(
                    "send {} by user {} (acknowledged as packet {}): the retry answered {other:?}",
                    s.ask.key, s.ask.sender, s.packet
                )),
            }
            self.checked.sends += 1;
        }
    }

    pub async fn sends_unanswered(&mut self, asks: Vec<SendAsk>) {
        for a in asks {
            let first = self.send(&a).await;
            match first {
                Some(Reply::Sent { packet, expires_ms, .. }) => {
                    match self.send(&a).await {
                        Some(Reply::Sent { packet: p, repeat: true, .. }) if p == packet => {}
                        second => self.out.violation(format!(
                            "unanswered send {} by user {}: the retry made packet {packet}, a second retry answered \
                             {second:?}",
                            a.key, a.sender
                        )),
                    }
                    self.out.sends.push(Sent { ask: a, packet, expires_ms });
                }
                Some(Reply::Error { code, .. }) => self.out.refuse(format!("send retry {code:?}")),
                other => self.out.violation(format!("unanswered send {} retried: {other:?}", a.key)),
            }
            self.checked.retried += 1;
        }
    }

    pub async fn opens_unanswered(&mut self, pairs: Vec<(u64, u64)>) {
        for (packet, user) in pairs {
            match ask(self.client(user), Request::Open { packet }).await {
                Some(Reply::Opened { packet: p, amount_fen, .. }) if p == packet => {
                    self.out.opens.push(Opened { packet, user, amount_fen })
                }
                Some(Reply::Error { code: code @ (ErrorCode::Finished | ErrorCode::Expired), .. }) => {
                    self.out.refuse(format!("open retry {code:?}"))
                }
                other => self.out.violation(format!("unanswered open of packet {packet} by {user} retried: {other:?}")),
            }
            self.checked.retried += 1;
        }
    }

    /// Each acknowledged open is one claim of its amount (one detail read
    /// per packet), and opening again answers that share as a repeat.
    pub async fn opens(&mut self, acked: &[Opened]) {
        let mut by_packet: BTreeMap<u64, Vec<Opened>> = BTreeMap::new();
        for o in acked {
            by_packet.entry(o.packet).or_default().push(*o);
        }
        for (packet, opens) in by_packet {
            match self.detail(packet).await {
                Ok(d) => {
                    for v in check_claims(&d, &opens) {
                        self.out.violation(v);
                    }
                }
                Err(e) => self.out.violation(format!("packet {packet} with acknowledged opens: {e}")),
            }
            for o in &opens {
                match ask(self.client(o.user), Request::Open { packet }).await {
                    Some(Reply::Opened { packet: p, amount_fen, repeat: true, .. })
                        if p == packet && amount_fen == o.amount_fen => {}
                    other => self.out.violation(format!(
                        "packet {packet}: user {} was told {} fen; opening again answered {other:?}",
                        o.user, o.amount_fen
                    )),
                }
            }
            self.checked.opens += opens.len() as u64;
        }
    }

    async fn shake(&self, a: &ShakeAsk) -> Option<Reply> {
        ask(self.client(a.user), Request::Shake { campaign: a.campaign, key: a.key.clone() }).await
    }

    /// A keyed win's key answers that win again, whatever the campaign's
    /// state now.
    pub async fn keyed_wins(&mut self, acked: &[Won]) {
        for w in acked.iter().filter(|w| w.ask.key.is_some()) {
            match self.shake(&w.ask).await {
                Some(Reply::Shake(ShakeResult::Won { campaign, packet, amount_fen }))
                    if campaign == w.ask.campaign && packet == w.packet && amount_fen == w.amount_fen => {}
                other => self.out.violation(format!(
                    "keyed win {:?} of user {} (campaign {}, packet {}, {} fen): the retry answered {other:?}",
                    w.ask.key, w.ask.user, w.ask.campaign, w.packet, w.amount_fen
                )),
            }
            self.checked.wins += 1;
        }
    }

    pub async fn shakes_unanswered(&mut self, asks: Vec<ShakeAsk>) {
        for a in asks {
            match self.shake(&a).await {
                Some(Reply::Shake(ShakeResult::Won { campaign, packet, amount_fen })) if campaign == a.campaign => {
                    match self.shake(&a).await {
                        Some(Reply::Shake(ShakeResult::Won { packet: p, amount_fen: f, .. }))
                            if p == packet && f == amount_fen => {}
                        second => self.out.violation(format!(
                            "unanswered keyed shake {:?} of user {}: the retry won packet {packet} ({amount_fen} \
                             fen), a second retry answered {second:?}",
                            a.key, a.user
                        )),
                    }
                    self.out.wins.push(Won { ask: a, packet, amount_fen });
                }
                Some(Reply::Shake(r @ (ShakeResult::None | ShakeResult::NotRunning | ShakeResult::Overload))) => {
                    self.out.refuse(format!("shake retry {r:?}"))
                }
                Some(Reply::Error { code, .. }) => self.out.refuse(format!("shake retry {code:?}")),
                other => self.out.violation(format!("unanswered keyed shake {:?} retried: {other:?}", a.key)),
            }
            self.checked.retried += 1;
        }
    }
}
