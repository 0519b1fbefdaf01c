//! What follows each restart: pending messages (no acked one may come
//! back), the retries and checks of `check`, the campaigns, and the refunds
//! of packets past their expiry; and the last round over everything the
//! run acknowledged, then a clean stop and its audit.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hongbao_client::Client;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::check::Check;
use super::load::{handle_pushes, Board, StopAnswer};
use super::record::{settlement, Checked, Outcomes, Settlement};
use super::{unix_ms, Run, PENDING_SETTLE, REFUND_GRACE_MS, REFUND_WAIT};

impl Run {
    /// The checks after the restart that ended cycle `k`, on `out` (the
    /// cycle's outcomes; retries add theirs to it).
    pub(super) fn check(
        &mut self,
        k: u32,
        clients: &mut HashMap<u64, Client>,
        out: &mut Outcomes,
    ) -> anyhow::Result<Checked> {
        let mut checked = Checked { audits: 1, acks: out.acks.len() as u64, ..Checked::default() };
        self.note_acks(out);
        self.drain_pending(k, clients, out);
        let retried = self.retry_and_check(clients, out, false);
        checked.add(retried);
        checked.wins += self.check_campaigns(out)?;
        checked.refunds += self.refunds(out, false)?;
        self.checked.add(checked);
        Ok(checked)
    }

    /// Acks acknowledged in the cycle join those no message may come back
    /// for (before the clients of the restarted server read their pending
    /// messages).
    fn note_acks(&mut self, out: &Outcomes) {
        let acked = Arc::make_mut(&mut self.acked);
        for a in &out.acks {
            acked.insert((a.user, a.msg), a.packet);
        }
    }

    /// Reads what every client got since its hello (pending messages first):
    /// none may be a message acked before; all are acked now.
    fn drain_pending(&mut self, k: u32, clients: &mut HashMap<u64, Client>, out: &mut Outcomes) {
        let board = Board {
            cycle: k,
            cast: self.cast.clone(),
            campaign: None,
            out: Mutex::default(),
            live: Mutex::default(),
            decided: Mutex::default(),
            acked_before: self.acked.clone(),
            refunds: Mutex::default(),
            stop: Mutex::new(StopAnswer::NotAsked),
            dead: AtomicBool::new(false),
        };
        self.rt.block_on(async {
            tokio::time::sleep(PENDING_SETTLE).await;
            let drains = clients.iter_mut().map(|(&user, client)| {
                let board = &board;
                async move { handle_pushes(client, user, board, &mut StdRng::seed_from_u64(user), 1.0).await }
            });
            futures_util::future::join_all(drains).await;
        });
        let got = board.out.into_inner().unwrap_or_else(|e| e.into_inner());
        for n in board.refunds.into_inner().unwrap_or_else(|e| e.into_inner()) {
            self.refund_notice(n, out);
        }
        out.absorb(got);
    }

    /// Retries what went unanswered (unless `all`: the last round has none
    /// left), then checks every acknowledged deposit, send, open and keyed
    /// win in `out`.
    fn retry_and_check(&mut self, clients: &HashMap<u64, Client>, out: &mut Outcomes, all: bool) -> Checked {
        let mut c = Check { admin: self.admin(), clients, out: Outcomes::default(), checked: Checked::default() };
        self.rt.block_on(async {
            if !all {
                c.deposits_unanswered(std::mem::take(&mut out.deposits_unanswered)).await;
                c.sends_unanswered(std::mem::take(&mut out.sends_unanswered)).await;
                c.opens_unanswered(std::mem::take(&mut out.opens_unanswered)).await;
                c.shakes_unanswered(std::mem::take(&mut out.shakes_unanswered)).await;
            }
            c.deposits(&out.deposits).await;
            c.sends(&out.sends).await;
            let opens: Vec<_> = out.opens.iter().chain(&c.out.opens).copied().collect();
            c.opens(&opens).await;
            c.keyed_wins(&out.wins).await;
        });
        let checked = c.checked;
        out.absorb(c.out);
        checked
    }

    /// Every packet past its expiry (by `REFUND_GRACE_MS`, with the
    /// restarted server up that long) is refunded or finished, refunded
    /// exactly amount − claims; with `all`, every packet the run made,
    /// settled before or not. Returns how many were checked.
    fn refunds(&mut self, out: &mut Outcomes, all: bool) -> anyhow::Result<u64> {
        let wait = (self.ready_ms + REFUND_GRACE_MS).saturating_sub(unix_ms());
        std::thread::sleep(Duration::from_millis(wait));
        let now = unix_ms();
        let mut due: Vec<u64> = self
            .packets
            .iter()
            .filter(|(_, t)| (all || !t.settled) && t.expires_ms + REFUND_GRACE_MS <= now)
            .map(|(&p, _)| p)
            .collect();
        let checked = due.len() as u64;
        let deadline = Instant::now() + REFUND_WAIT;
        let c = Check {
            admin: self.admin(),
            clients: &HashMap::new(),
            out: Outcomes::default(),
            checked: Checked::default(),
        };
        while !due.is_empty() {
            let mut open: Vec<u64> = Vec::new();
            for packet in due {
                let d = self.rt.block_on(c.detail(packet));
                match d.map(|d| settlement(&d).map(|s| (s, d))) {
                    Ok(Ok((Settlement::Open, _))) if Instant::now() < deadline => open.push(packet),
                    Ok(Ok((Settlement::Open, d))) => out.violation(format!(
                        "packet {packet} expired {} ms ago and is still open {REFUND_WAIT:?} later: {} of {} fen left",
                        now.saturating_sub(d.expires_ms),
                        d.remaining_fen,
                        d.amount_fen
                    )),
                    Ok(Ok((s, _))) => self.settled(packet, s, out),
                    Ok(Err(v)) => out.violation(v),
                    Err(e) => out.violation(format!("packet {packet} past expiry: {e}")),
                }
            }
            due = open;
            if !due.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(checked)
    }

    fn settled(&mut self, packet: u64, s: Settlement, out: &mut Outcomes) {
        if let Some(t) = self.packets.get_mut(&packet) {
            t.settled = true;
            if let (Settlement::Refunded(fen), Some(n)) = (&s, self.refunds.get(&packet)) {
                if n.amount_fen != *fen || *fen > t.amount_fen {
                    out.violation(format!(
                        "packet {packet}: refunded {fen} fen, its refund notice (message {}) said {} fen",
                        n.msg, n.amount_fen
                    ));
                }
            }
        }
    }

    /// After the last cycle: once every packet is past its expiry, every
    /// outcome the run acknowledged is checked again on the server of the
    /// last restart; then a clean stop (SIGTERM) and one more audit.
    pub(super) fn final_round(&mut self, clients: HashMap<u64, Client>) -> anyhow::Result<Vec<String>> {
        let last = self.packets.values().map(|t| t.expires_ms).max().unwrap_or(0);
        let wait = (last + REFUND_GRACE_MS).saturating_sub(unix_ms());
        println!(
            "last round: everything acknowledged over the run, checked again once every packet is past its expiry \
             (in {:.1} s), then a clean stop and its audit",
            wait as f64 / 1e3
        );
        std::thread::sleep(Duration::from_millis(wait));
        let mut out = std::mem::take(&mut self.all);
        let violations_before = out.violations.len();
        let mut checked = Checked { acks: out.acks.len() as u64, ..Checked::default() };
        // New connections: every pending message is delivered again.
        drop(clients);
        let mut clients = self.connect()?;
        self.drain_pending(0, &mut clients, &mut out);
        checked.add(self.retry_and_check(&clients, &mut out, true));
        checked.wins += self.check_campaigns(&mut out)?;
        checked.refunds += self.refunds(&mut out, true)?;
        drop(clients);
        self.server.stop().context("clean stop of the server")?;
        self.audit(&mut out)?;
        checked.audits += 1;
        println!("last round: checked {}", checked.line());
        self.checked.add(checked);
        let violations = out.violations[violations_before..].to_vec();
        self.all = out;
        Ok(violations)
    }

    /// The run's totals and figures; true if it passed.
    pub(super) fn finish(&self, cycles: u32, violations: &[String]) -> bool {
        let refused: Vec<String> = self.all.refused.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("acknowledged over the run: {}", self.all.acknowledged());
        println!("answered without effect: {}", refused.join(", "));
        println!("checked: {} ({} checks)", self.checked.line(), self.checked.total());
        println!("FIGURE crash_cycles {cycles} cycles");
        println!("FIGURE crash_ops_checked {} ops", self.checked.total());
        if violations.is_empty() {
            println!(
                "crash: PASS ({cycles} cycles, no acknowledged outcome lost or applied twice, every audit passed)"
            );
            return true;
        }
        println!("crash: FAIL: {} violation(s)", violations.len());
        for v in violations {
            println!("  - {v}");
        }
        false
    }
}
