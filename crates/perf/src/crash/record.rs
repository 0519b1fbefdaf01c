//! What the load asked and what the server acknowledged, kept by the crash
//! harness so every acknowledged outcome can be looked for after a restart.
//!
//! An outcome counts as acknowledged only from the server's own answer (a
//! `sent`, `opened`, `won` or `acked` reply, a deposit receipt); a request
//! that was in flight when the server died has no answer and is kept as
//! *unanswered*: after the restart it is retried with the same key, and
//! must then be applied at most once.

use std::collections::{BTreeMap, HashMap};

use hongbao_proto::{ClaimInfo, PacketDetail, SplitKind, Target};

/// A keyed admin deposit as asked.
#[derive(Clone, Debug)]
pub struct DepositAsk {
    pub key: String,
    pub user: u64,
    pub amount_fen: i64,
}

/// A deposit and the balance its receipt reported.
#[derive(Clone, Debug)]
pub struct Receipt {
    pub ask: DepositAsk,
    pub balance_fen: i64,
}

/// A keyed client `send` as asked.
#[derive(Clone, Debug)]
pub struct SendAsk {
    pub sender: u64,
    pub key: String,
    pub amount_fen: i64,
    pub count: u32,
    pub kind: SplitKind,
    pub to: Target,
    /// Who may open it (the group's members at the time, or the list).
    pub recipients: Vec<u64>,
}

/// An acknowledged send.
#[derive(Clone, Debug)]
pub struct Sent {
    pub ask: SendAsk,
    pub packet: u64,
    pub expires_ms: u64,
}

/// An acknowledged open: the claim that must be in the packet, once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub packet: u64,
    pub user: u64,
    pub amount_fen: i64,
}

/// A shake as asked (only keyed ones are kept when unanswered: a plain
/// shake cannot be retried as the same request).
#[derive(Clone, Debug)]
pub struct ShakeAsk {
    pub user: u64,
    pub campaign: u64,
    pub key: Option<String>,
}

/// An acknowledged win.
#[derive(Clone, Debug)]
pub struct Won {
    pub ask: ShakeAsk,
    pub packet: u64,
    pub amount_fen: i64,
}

/// An acknowledged `ack` of a persistent message: it must not come back.
#[derive(Clone, Copy, Debug)]
pub struct Acked {
    pub user: u64,
    pub msg: u64,
    /// The packet its `packet_received` named (0 for other messages).
    pub packet: u64,
}

/// Everything one cycle (or the whole run) asked and was told.
#[derive(Default, Debug)]
pub struct Outcomes {
    pub deposits: Vec<Receipt>,
    pub deposits_unanswered: Vec<DepositAsk>,
    pub sends: Vec<Sent>,
    pub sends_unanswered: Vec<SendAsk>,
    pub opens: Vec<Opened>,
    pub opens_unanswered: Vec<(u64, u64)>,
    pub wins: Vec<Won>,
    pub shakes_unanswered: Vec<ShakeAsk>,
    pub acks: Vec<Acked>,
    /// Answers that applied nothing, by request and code (`open finished`,
    /// `shake none`, …): shown in the report, never a violation by
    /// themselves.
    pub refused: BTreeMap<String, u64>,
    /// What broke the rules, each a precise sentence.
    pub violations: Vec<String>,
}

impl Outcomes {
    pub fn refuse(&mut self, what: impl Into<String>) {
        *self.refused.entry(what.into()).or_default() += 1;
    }

    pub fn violation(&mut self, what: impl Into<String>) {
        self.violations.push(what.into());
    }

    /// Moves everything of `other` in (a cycle's outcomes into the run's).
    pub fn absorb(&mut self, other: Outcomes) {
        self.deposits.extend(other.deposits);
        self.deposits_unanswered.extend(other.deposits_unanswered);
        self.sends.extend(other.sends);
        self.sends_unanswered.extend(other.sends_unanswered);
        self.opens.extend(other.opens);
        self.opens_unanswered.extend(other.opens_unanswered);
        self.wins.extend(other.wins);
        self.shakes_unanswered.extend(other.shakes_unanswered);
        self.acks.extend(other.acks);
        for (k, v) in other.refused {
            *self.refused.entry(k).or_default() += v;
        }
        self.violations.extend(other.violations);
    }

    /// Acknowledged outcomes, for the cycle line.
    pub fn acknowledged(&self) -> String {
        let keyed = self.wins.iter().filter(|w| w.ask.key.is_some()).count();
        format!(
            "{} deposits, {} sends, {} opens, {} wins ({keyed} keyed), {} acks",
            self.deposits.len(),
            self.sends.len(),
            self.opens.len(),
            self.wins.len(),
            self.acks.len()
        )
    }

    /// Requests without an answer, for the cycle line.
    pub fn unanswered(&self) -> String {
        format!(
            "{} deposits, {} sends, {} opens, {} keyed shakes",
            self.deposits_unanswered.len(),
            self.sends_unanswered.len(),
            self.opens_unanswered.len(),
            self.shakes_unanswered.len()
        )
    }
}

/// How many of each kind were checked, for the report.
#[derive(Default, Debug, Clone, Copy)]
pub struct Checked {
    pub deposits: u64,
    pub sends: u64,
    pub opens: u64,
    pub wins: u64,
    pub refunds: u64,
    pub acks: u64,
    /// Unanswered requests retried after the restart (each twice).
    pub retried: u64,
    pub audits: u64,
}

impl Checked {
    pub fn total(&self) -> u64 {
        self.deposits + self.sends + self.opens + self.wins + self.refunds + self.acks + self.retried
    }

    pub fn add(&mut self, o: Checked) {
        self.deposits += o.deposits;
        self.sends += o.sends;
        self.opens += o.opens;
        self.wins += o.wins;
        self.refunds += o.refunds;
        self.acks += o.acks;
        self.retried += o.retried;
        self.audits += o.audits;
    }

    pub fn line(&self) -> String {
        format!(
            "{} deposits, {} sends, {} opens, {} wins, {} refunds settled, {} acks, {} unanswered retried, {} audits",
            self.deposits, self.sends, self.opens, self.wins, self.refunds, self.acks, self.retried, self.audits
        )
    }
}

/// Checks a packet's committed claims against the opens acknowledged on it:
/// each acknowledged open is a claim of that user with that amount, exactly
/// once, and the packet adds up (claims ≤ count, one claim per user, claims
/// + remaining + refunded = amount). Returns the violations.
pub fn check_claims(d: &PacketDetail, acked: &[Opened]) -> Vec<String> {
    let mut out = Vec::new();
    let mut by_user: HashMap<u64, Vec<&ClaimInfo>> = HashMap::new();
    for c in &d.claims {
        by_user.entry(c.user).or_default().push(c);
    }
    for o in acked {
        match by_user.get(&o.user).map(Vec::as_slice) {
            None | Some([]) => out.push(format!(
                "packet {}: the acknowledged open by user {} ({} fen) is not a claim",
                d.packet, o.user, o.amount_fen
            )),
            Some([c]) if c.amount_fen == o.amount_fen => {}
            Some([c]) => out.push(format!(
                "packet {}: user {} was told {} fen, the claim says {} fen",
                d.packet, o.user, o.amount_fen, c.amount_fen
            )),
            Some(cs) => out.push(format!("packet {}: user {} has {} claims", d.packet, o.user, cs.len())),
        }
    }
    out.extend(packet_sums(d));
    out
}

/// The packet-level sums every committed packet must satisfy.
fn packet_sums(d: &PacketDetail) -> Vec<String> {
    let mut out = Vec::new();
    let claimed: i64 = d.claims.iter().map(|c| c.amount_fen).sum();
    if d.claims.len() > d.count as usize {
        out.push(format!("packet {}: {} claims of a {}-share packet", d.packet, d.claims.len(), d.count));
    }
    let mut users: Vec<u64> = d.claims.iter().map(|c| c.user).collect();
    users.sort_unstable();
    users.dedup();
    if users.len() != d.claims.len() {
        out.push(format!(
            "packet {}: a user claimed twice ({} claims, {} users)",
            d.packet,
            d.claims.len(),
            users.len()
        ));
    }
    if claimed + d.remaining_fen + d.refunded_fen != d.amount_fen {
        out.push(format!(
            "packet {}: claims {} + remaining {} + refunded {} fen != amount {} fen",
            d.packet, claimed, d.remaining_fen, d.refunded_fen, d.amount_fen
        ));
    }
    out
}

/// Where a packet is after its expiry.
#[derive(Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Every share was opened: nothing to refund.
    Finished,
    /// The rest went back to the sender, this much.
    Refunded(i64),
    /// Still open: the refund has not happened (yet).
    Open,
}

/// A packet's state after its expiry, or a violation: a refunded packet
/// returned exactly amount − claims and holds nothing; a finished one had
/// all its shares claimed and refunded nothing.
pub fn settlement(d: &PacketDetail) -> Result<Settlement, String> {
    let claimed: i64 = d.claims.iter().map(|c| c.amount_fen).sum();
    match d.status.as_str() {
        "open" => Ok(Settlement::Open),
        "refunded" if d.refunded_fen == d.amount_fen - claimed && d.remaining_fen == 0 && d.refunded_fen > 0 => {
            Ok(Settlement::Refunded(d.refunded_fen))
        }
        "finished" if claimed == d.amount_fen && d.claims.len() == d.count as usize && d.refunded_fen == 0 => {
            Ok(Settlement::Finished)
        }
        status => Err(format!(
            "packet {}: {status} with {} claims of {} ({} of {} fen claimed), remaining {} fen, refunded {} fen",
            d.packet,
            d.claims.len(),
            d.count,
            claimed,
            d.amount_fen,
            d.remaining_fen,
            d.refunded_fen
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(
        status: &str,
        amount: i64,
        count: u32,
        claims: &[(u64, i64)],
        remaining: i64,
        refunded: i64,
    ) -> PacketDetail {
        PacketDetail {
            packet: 7,
            sender: 1,
            kind: SplitKind::Lucky,
            amount_fen: amount,
            count,
            remaining_fen: remaining,
            refunded_fen: refunded,
            status: status.into(),
            greeting: String::new(),
            created_ms: 0,
            expires_ms: 0,
            best_luck: None,
            claims: claims.iter().map(|&(user, amount_fen)| ClaimInfo { user, amount_fen, at_ms: 0 }).collect(),
        }
    }

    fn open(user: u64, amount_fen: i64) -> Opened {
        Opened { packet: 7, user, amount_fen }
    }

    #[test]
    fn an_acknowledged_open_must_be_one_claim_of_that_amount() {
        let d = detail("open", 100, 3, &[(2, 30), (3, 20)], 50, 0);
        assert!(check_claims(&d, &[open(2, 30), open(3, 20)]).is_empty());
        let lost = check_claims(&d, &[open(4, 10)]);
        assert_eq!(lost.len(), 1);
        assert!(lost[0].contains("user 4") && lost[0].contains("not a claim"), "{lost:?}");
        assert!(check_claims(&d, &[open(2, 31)])[0].contains("was told 31 fen, the claim says 30"));
        let twice = detail("open", 100, 3, &[(2, 30), (2, 20)], 50, 0);
        let v = check_claims(&twice, &[open(2, 30)]);
        assert!(v.iter().any(|v| v.contains("has 2 claims")) && v.iter().any(|v| v.contains("claimed twice")), "{v:?}");
    }

    #[test]
    fn a_packet_must_add_up() {
        assert!(check_claims(&detail("open", 100, 1, &[(2, 30), (3, 20)], 50, 0), &[])[0].contains("2 claims of a 1"));
        assert!(check_claims(&detail("open", 100, 3, &[(2, 30)], 60, 0), &[])[0].contains("!= amount 100"));
    }

    #[test]
    fn settlement_is_a_full_refund_of_the_rest_or_a_finished_packet() {
        assert_eq!(settlement(&detail("open", 100, 3, &[(2, 30)], 70, 0)), Ok(Settlement::Open));
        assert_eq!(settlement(&detail("refunded", 100, 3, &[(2, 30)], 0, 70)), Ok(Settlement::Refunded(70)));
        assert_eq!(settlement(&detail("finished", 100, 2, &[(2, 30), (3, 70)], 0, 0)), Ok(Settlement::Finished));
        // Refunded twice's worth, or a refund that left money in the packet.
        assert!(settlement(&detail("refunded", 100, 3, &[(2, 30)], 0, 140)).is_err());
        assert!(settlement(&detail("refunded", 100, 3, &[(2, 30)], 35, 35)).is_err());
        assert!(settlement(&detail("finished", 100, 3, &[(2, 30)], 70, 0)).is_err());
    }
}
