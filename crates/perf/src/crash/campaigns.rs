//! The run's shake campaigns across cycles: one runs at a time, through
//! several cycles (and so through kills and restarts), until the operator
//! stops it (racing a kill) or it finishes; then the next one is created.
//!
//! After each restart every campaign is checked: its money adds up (won +
//! refunded + escrow = total), it has won at least what clients were told
//! they won, a stop that was acknowledged stuck (and returned the rest),
//! and a campaign that was running runs again: it releases packets after
//! the restart.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use hongbao_client::Admin;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::load::StopAnswer;
use super::record::Outcomes;
use super::{mix, Campaign, Run, CAMPAIGN_CYCLES_MAX, RESUME_WAIT, SENDER_BALANCE_MIN_FEN, SENDER_TOP_UP_FEN};

impl Run {
    /// Senders whose balance ran low get money before the load.
    pub(super) fn top_up(&mut self, k: u32) -> anyhow::Result<()> {
        let admin = self.admin();
        for sender in self.cast.senders.clone() {
            let body = get(&admin, &format!("/v1/accounts/{sender}"))?;
            let balance = body["balance_fen"].as_i64().with_context(|| format!("balance of {sender}: {body}"))?;
            if balance < SENDER_BALANCE_MIN_FEN {
                self.deposit(&admin, sender, SENDER_TOP_UP_FEN, format!("top{k}-{sender}"))?;
            }
        }
        Ok(())
    }

    /// The campaign of cycle `k`: the running one, or a new one (funded,
    /// created with a key, started).
    pub(super) fn prepare_campaign(&mut self, k: u32) -> anyhow::Result<Option<u64>> {
        if let Some(c) = self.campaigns.last_mut().filter(|c| !c.closed) {
            c.cycles += 1;
            return Ok(Some(c.id));
        }
        let mut rng = StdRng::seed_from_u64(mix(self.seed, u64::from(k) << 40));
        let (rule, total_fen) = if rng.random_bool(0.5) {
            let packets = rng.random_range(200..=800i64);
            (json!({"count": {"packets": packets}}), packets * rng.random_range(20..=80))
        } else {
            let min = rng.random_range(1..=30i64);
            (
                json!({"range": {"min_fen": min, "max_fen": min + rng.random_range(0..=100)}}),
                rng.random_range(5_000..=40_000),
            )
        };
        let admin = self.admin();
        self.deposit(&admin, self.cast.funder, total_fen, format!("fund{k}"))?;
        let mut body = json!({"funder": self.cast.funder, "total_fen": total_fen, "rule": rule,
            "rate_per_s": rng.random_range(50..=300), "key": format!("camp{k}")});
        // Sometimes a cap per user: 8 shakers reach it, and then only "none".
        if rng.random_bool(0.25) {
            body["win_cap_per_user"] = json!(rng.random_range(10..=50));
        }
        let created =
            admin.post("/v1/campaigns", &body).map_err(anyhow::Error::msg)?.ok().map_err(anyhow::Error::msg)?;
        let id = created["id"].as_u64().with_context(|| format!("created campaign {created}"))?;
        let started = post(&admin, &format!("/v1/campaigns/{id}/start"))?;
        ensure!(started["status"] == "running", "campaign {id} started as {started}");
        self.campaigns.push(Campaign { id, total_fen, cycles: 1, stop: StopAnswer::NotAsked, closed: false });
        Ok(Some(id))
    }

    /// When the operator stops the running campaign during this load, if it
    /// does: always once it has run `CAMPAIGN_CYCLES_MAX` cycles, else
    /// now and then.
    pub(super) fn plan_stop(&self, rng: &mut StdRng, load: Duration) -> Option<Duration> {
        let c = self.campaigns.last().filter(|c| !c.closed)?;
        let stop = c.cycles >= CAMPAIGN_CYCLES_MAX || rng.random_bool(0.2);
        stop.then(|| Duration::from_millis(rng.random_range(0..=load.as_millis() as u64)))
    }

    /// Every campaign against what the run knows of it. Returns the plain
    /// (unkeyed) wins of `out` this covered: a plain shake cannot be asked
    /// again, so its win is checked only in its campaign's committed totals.
    pub(super) fn check_campaigns(&mut self, out: &mut Outcomes) -> anyhow::Result<u64> {
        let admin = self.admin();
        let list = get(&admin, "/v1/campaigns")?;
        let list = list.as_array().with_context(|| format!("campaign list {list}"))?;
        if list.len() != self.campaigns.len() {
            out.violation(format!(
                "{} campaigns exist, the run created {} (one key each)",
                list.len(),
                self.campaigns.len()
            ));
        }
        let mut won: HashMap<u64, (u64, i64)> = HashMap::new();
        for w in self.all.wins.iter().chain(&out.wins) {
            let e = won.entry(w.ask.campaign).or_default();
            e.0 += 1;
            e.1 += w.amount_fen;
        }
        for i in 0..self.campaigns.len() {
            let id = self.campaigns[i].id;
            let Some(now) = list.iter().find(|c| c["id"] == id) else {
                out.violation(format!("campaign {id} is gone"));
                continue;
            };
            let told = won.get(&id).copied().unwrap_or_default();
            self.check_campaign(&admin, i, now.clone(), told, out)?;
        }
        Ok(out.wins.iter().filter(|w| w.ask.key.is_none()).count() as u64)
    }

    fn check_campaign(
        &mut self,
        admin: &Admin,
        i: usize,
        mut now: Value,
        (wins, won_fen): (u64, i64),
        out: &mut Outcomes,
    ) -> anyhow::Result<()> {
        let c = &self.campaigns[i];
        let id = c.id;
        for v in money(c.total_fen, wins, won_fen, &now) {
            out.violation(format!("campaign {id}: {v}"));
        }
        if c.stop == StopAnswer::Unanswered && now["status"] == "running" {
            // The stop died with the server: the operator asks again.
            now = post(admin, &format!("/v1/campaigns/{id}/stop"))?;
            self.campaigns[i].stop = StopAnswer::Acknowledged;
        }
        let c = &mut self.campaigns[i];
        let status = now["status"].as_str().unwrap_or("?").to_owned();
        match (c.stop, status.as_str()) {
            (StopAnswer::Acknowledged | StopAnswer::Unanswered, "stopped") => c.stop = StopAnswer::Acknowledged,
            (StopAnswer::Acknowledged, other) => {
                out.violation(format!("campaign {id}: its stop was acknowledged, and now it is {other}"))
            }
            (StopAnswer::Finished, "finished") => {}
            (StopAnswer::Finished, other) => {
                out.violation(format!("campaign {id}: a stop found it finished, and now it is {other}"))
            }
            (_, "stopped") => out.violation(format!("campaign {id}: stopped, though no stop was applied: {now}")),
            (_, "finished") => {}
            (_, "running") if !c.closed => {
                if !resumes(admin, id)? {
                    out.violation(format!(
                        "campaign {id}: running after the restart, but released nothing in {RESUME_WAIT:?}: {now}"
                    ));
                }
            }
            (_, other) => out
                .violation(format!("campaign {id}: {other} (it was {}) ", if c.closed { "closed" } else { "running" })),
        }
        c.closed = matches!(status.as_str(), "stopped" | "finished");
        Ok(())
    }

    /// The current campaign, for the cycle line.
    pub(super) fn campaign_line(&self) -> String {
        match self.campaigns.last() {
            Some(c) => format!(
                "{} {} (cycle {} of it, stop {:?})",
                c.id,
                if c.closed { "closed" } else { "running" },
                c.cycles,
                c.stop
            ),
            None => "none".into(),
        }
    }
}

/// The money rules of a campaign as the admin API shows it, against what
/// clients were told: won + refunded + escrow = total; at least the wins
/// told were committed; a closed campaign holds nothing and returned the
/// rest.
fn money(total_fen: i64, wins: u64, won_fen: i64, c: &Value) -> Vec<String> {
    let num = |k: &str| c[k].as_i64().unwrap_or(i64::MIN);
    let mut v = Vec::new();
    if num("total_fen") != total_fen {
        v.push(format!("total {} fen, created with {total_fen} fen", num("total_fen")));
    }
    if num("won_fen") + num("refunded_fen") + num("escrow_fen") != total_fen {
        v.push(format!("won + refunded + escrow != total: {c}"));
    }
    if num("won") < wins as i64 || num("won_fen") < won_fen {
        v.push(format!(
            "{wins} wins of {won_fen} fen were acknowledged, it counts {} of {} fen",
            num("won"),
            num("won_fen")
        ));
    }
    let closed = matches!(c["status"].as_str(), Some("stopped" | "finished"));
    if closed && (num("escrow_fen") != 0 || num("refunded_fen") != total_fen - num("won_fen")) {
        v.push(format!("closed, but escrow or refund is off: {c}"));
    }
    v
}

/// Whether campaign `id` releases packets within `RESUME_WAIT` (or closes
/// by itself meanwhile, having released all).
fn resumes(admin: &Admin, id: u64) -> anyhow::Result<bool> {
    let deadline = Instant::now() + RESUME_WAIT;
    loop {
        let c = get(admin, &format!("/v1/campaigns/{id}"))?;
        if c["released"].as_u64().unwrap_or(0) > 0 || c["status"] != "running" || c["escrow_fen"] == 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn get(admin: &Admin, path: &str) -> anyhow::Result<Value> {
    admin.get(path).map_err(anyhow::Error::msg)?.ok().map_err(anyhow::Error::msg).with_context(|| format!("GET {path}"))
}

/// A POST without a body (campaign start and stop).
fn post(admin: &Admin, path: &str) -> anyhow::Result<Value> {
    let r = admin.send_raw("POST", path, "").map_err(anyhow::Error::msg)?;
    r.ok().map_err(anyhow::Error::msg).with_context(|| format!("POST {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A campaign as the admin API shows it: total 100 fen, 3 wins of 30 fen.
    fn campaign(refunded_fen: i64, escrow_fen: i64, status: &str) -> Value {
        json!({"total_fen": 100, "won": 3, "won_fen": 30, "refunded_fen": refunded_fen, "escrow_fen": escrow_fen,
               "status": status})
    }

    #[test]
    fn campaign_money_must_add_up() {
        let running = campaign(0, 70, "running");
        assert!(money(100, 3, 30, &running).is_empty());
        assert!(money(100, 4, 30, &running)[0].contains("4 wins of 30 fen were acknowledged"));
        assert!(money(100, 3, 30, &campaign(0, 60, "running"))[0].contains("won + refunded + escrow != total"));
        assert!(money(100, 3, 30, &campaign(70, 0, "stopped")).is_empty());
        assert!(money(100, 3, 30, &campaign(60, 10, "stopped")).iter().any(|v| v.contains("closed, but")));
    }
}
