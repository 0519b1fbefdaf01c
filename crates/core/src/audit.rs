//! The conservation proof behind `hongbao audit`, as pure code: storage feeds
//! it every record, it re-derives every balance and packet and reports each
//! broken invariant of DESIGN.md §4 precisely.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::campaign::CampaignStatus;
use crate::ledger::{Account, AccountKind};
use crate::packet::{best_luck_of, Claim, PacketStatus};
use crate::split::SplitKind;
use crate::{CampaignId, PacketId, UserId};

/// What a ledger entry was for; `reference` names the packet or campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Deposit,
    Withdraw,
    /// Sender → packet escrow when a group packet is funded.
    PacketFund,
    /// Packet escrow → opener.
    PacketOpen,
    /// Packet escrow → sender when a packet expires.
    PacketRefund,
    /// Funder → campaign escrow.
    CampaignFund,
    /// Campaign escrow → winner.
    ShakeWin,
    /// Campaign escrow → funder when a campaign closes.
    CampaignRefund,
}

impl EntryKind {
    pub const ALL: [EntryKind; 8] = [
        EntryKind::Deposit,
        EntryKind::Withdraw,
        EntryKind::PacketFund,
        EntryKind::PacketOpen,
        EntryKind::PacketRefund,
        EntryKind::CampaignFund,
        EntryKind::ShakeWin,
        EntryKind::CampaignRefund,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Deposit => "deposit",
            EntryKind::Withdraw => "withdraw",
            EntryKind::PacketFund => "packet_fund",
            EntryKind::PacketOpen => "packet_open",
            EntryKind::PacketRefund => "packet_refund",
            EntryKind::CampaignFund => "campaign_fund",
            EntryKind::ShakeWin => "shake_win",
            EntryKind::CampaignRefund => "campaign_refund",
        }
    }
    pub fn parse(s: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

#[derive(Clone, Debug)]
pub struct EntryRecord {
    pub id: i64,
    pub from: i64,
    pub to: i64,
    pub amount_fen: i64,
    pub kind: EntryKind,
    pub reference: u64,
    /// The user an open/win credited (also `to`), for cross-checks.
    pub user: Option<UserId>,
}

#[derive(Clone, Debug)]
pub struct PacketRecord {
    pub id: PacketId,
    pub sender: UserId,
    pub kind: SplitKind,
    pub total_fen: i64,
    pub count: u32,
    pub remaining_fen: i64,
    pub refunded_fen: i64,
    pub status: PacketStatus,
    pub best_luck: Option<UserId>,
}

#[derive(Clone, Debug)]
pub struct CampaignRecord {
    pub id: CampaignId,
    pub funder: UserId,
    pub total_fen: i64,
    pub status: CampaignStatus,
}

/// Totals that the report prints on success.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditTotals {
    pub accounts: u64,
    pub entries: u64,
    pub packets: u64,
    pub claims: u64,
    pub campaigns: u64,
    pub shake_wins: u64,
    pub deposits_fen: i64,
    pub withdrawals_fen: i64,
    pub user_balances_fen: i64,
    pub packet_escrow_fen: i64,
    pub campaign_escrow_fen: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub totals: AuditTotals,
    pub violations: Vec<String>,
}

impl AuditReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Accumulates records in any order, then checks everything in `finish`.
#[derive(Default)]
pub struct Auditor {
    stored_balances: BTreeMap<i64, i64>,
    derived_balances: HashMap<i64, i64>,
    packets: Vec<PacketRecord>,
    claims: HashMap<PacketId, Vec<Claim>>,
    campaigns: Vec<CampaignRecord>,
    /// (kind, reference) → summed amount of entries.
    sums: HashMap<(EntryKind, u64), i64>,
    counts: HashMap<(EntryKind, u64), u64>,
    /// Open entries per (packet, user), to match against claims.
    open_entries: HashMap<(PacketId, UserId), i64>,
    totals: AuditTotals,
    violations: Vec<String>,
}

impl Auditor {
    pub fn account(&mut self, id: i64, balance_fen: i64) {
        self.totals.accounts += 1;
        if Account::from_id(id).is_none() {
            self.violations.push(format!("account {id} has an unknown kind"));
        }
        self.stored_balances.insert(id, balance_fen);
    }

    pub fn entry(&mut self, e: EntryRecord) {
        self.totals.entries += 1;
        if e.amount_fen <= 0 {
            self.violations.push(format!("entry {} moves a non-positive amount {}", e.id, e.amount_fen));
        }
        if e.from == e.to {
            self.violations.push(format!("entry {} moves money from account {} to itself", e.id, e.from));
        }
        let from = self.derived_balances.entry(e.from).or_insert(0);
        match from.checked_sub(e.amount_fen) {
            Some(v) => *from = v,
            None => self.violations.push(format!("entry {} overflows account {}", e.id, e.from)),
        }
        let to = self.derived_balances.entry(e.to).or_insert(0);
        match to.checked_add(e.amount_fen) {
            Some(v) => *to = v,
            None => self.violations.push(format!("entry {} overflows account {}", e.id, e.to)),
        }
        *self.sums.entry((e.kind, e.reference)).or_insert(0) += e.amount_fen;
        *self.counts.entry((e.kind, e.reference)).or_insert(0) += 1;
        match e.kind {
            EntryKind::Deposit => self.totals.deposits_fen += e.amount_fen,
            EntryKind::Withdraw => self.totals.withdrawals_fen += e.amount_fen,
            EntryKind::ShakeWin => self.totals.shake_wins += 1,
            EntryKind::PacketOpen => {
                if let Some(user) = e.user {
                    if self.open_entries.insert((e.reference, user), e.amount_fen).is_some() {
                        self.violations.push(format!("packet {} credited user {user} twice", e.reference));
                    }
                }
            }
            _ => {}
        }
    }

    pub fn packet(&mut self, p: PacketRecord) {
        self.totals.packets += 1;
        self.packets.push(p);
    }

    /// Claims of one packet must arrive in open order.
    pub fn claim(&mut self, packet: PacketId, claim: Claim) {
        self.totals.claims += 1;
        self.claims.entry(packet).or_default().push(claim);
    }

    pub fn campaign(&mut self, c: CampaignRecord) {
        self.totals.campaigns += 1;
        self.campaigns.push(c);
    }

    fn sum(&self, kind: EntryKind, reference: u64) -> i64 {
        self.sums.get(&(kind, reference)).copied().unwrap_or(0)
    }
    fn count(&self, kind: EntryKind, reference: u64) -> u64 {
        self.counts.get(&(kind, reference)).copied().unwrap_or(0)
    }

    pub fn finish(mut self) -> AuditReport {
        let mut v = std::mem::take(&mut self.violations);
        self.check_accounts(&mut v);
        self.check_packets(&mut v);
        self.check_campaigns(&mut v);
        AuditReport { totals: self.totals, violations: v }
    }

    /// Every stored balance equals the one re-derived from entries; double
    /// entry: all balances sum to zero, and what users and escrow hold is
    /// exactly deposits minus withdrawals.
    fn check_accounts(&mut self, v: &mut Vec<String>) {
        let ids: HashSet<i64> = self.stored_balances.keys().chain(self.derived_balances.keys()).copied().collect();
        let mut total: i128 = 0;
        for id in ids {
            let stored = self.stored_balances.get(&id).copied();
            let derived = self.derived_balances.get(&id).copied().unwrap_or(0);
            if stored != Some(derived) && !(stored.is_none() && derived == 0) {
                v.push(format!("account {id}: stored balance {stored:?} fen, entries give {derived} fen"));
            }
            let balance = stored.unwrap_or(0);
            total += balance as i128;
            match Account::from_id(id) {
                Some(a) if a.kind == AccountKind::User => self.totals.user_balances_fen += balance,
                Some(a) if a.kind == AccountKind::PacketEscrow => self.totals.packet_escrow_fen += balance,
                Some(a) if a.kind == AccountKind::CampaignEscrow => self.totals.campaign_escrow_fen += balance,
                _ => {}
            }
            if balance < 0 && Account::from_id(id).is_some_and(|a| !a.may_go_negative()) {
                v.push(format!("account {id} is negative: {balance} fen"));
            }
        }
        if total != 0 {
            v.push(format!("balances sum to {total} fen, not 0"));
        }
        let net_deposits = self.totals.deposits_fen - self.totals.withdrawals_fen;
        let world = self.stored_balances.get(&Account::WORLD.id()).copied().unwrap_or(0);
        if -world != net_deposits {
            v.push(format!("world account is {world} fen but deposits - withdrawals = {net_deposits} fen"));
        }
        let held = self.totals.user_balances_fen as i128
            + self.totals.packet_escrow_fen as i128
            + self.totals.campaign_escrow_fen as i128;
        if held != net_deposits as i128 {
            v.push(format!("users + escrow hold {held} fen, deposits - withdrawals = {net_deposits} fen"));
        }
    }

    /// Every packet: funded = opened + refunded + remaining, and its claims
    /// agree; the packet escrow holds exactly the open packets' remainders.
    fn check_packets(&mut self, v: &mut Vec<String>) {
        let mut remaining_total: i64 = 0;
        let packets = std::mem::take(&mut self.packets);
        for p in &packets {
            self.check_packet(p, v);
            remaining_total += p.remaining_fen;
        }
        let known: HashSet<PacketId> = packets.iter().map(|p| p.id).collect();
        for packet in self.claims.keys() {
            if !known.contains(packet) {
                v.push(format!("claims for unknown packet {packet}"));
            }
        }
        let escrow = self.stored_balances.get(&Account::PACKET_ESCROW.id()).copied().unwrap_or(0);
        if escrow != remaining_total {
            v.push(format!(
                "packet escrow holds {escrow} fen but open packets' remainders sum to {remaining_total} fen"
            ));
        }
    }

    /// Every campaign: escrow = funded - won - refunded; closed ones hold
    /// nothing; refunded at most once.
    fn check_campaigns(&self, v: &mut Vec<String>) {
        for c in &self.campaigns {
            let funded = self.sum(EntryKind::CampaignFund, c.id);
            let won = self.sum(EntryKind::ShakeWin, c.id);
            let refunded = self.sum(EntryKind::CampaignRefund, c.id);
            let escrow = self.stored_balances.get(&Account::campaign(c.id).id()).copied().unwrap_or(0);
            if funded != c.total_fen {
                v.push(format!("campaign {}: total {} fen but funded {} fen", c.id, c.total_fen, funded));
            }
            if escrow != funded - won - refunded {
                v.push(format!(
                    "campaign {}: escrow {escrow} fen != funded {funded} - won {won} - refunded {refunded}",
                    c.id
                ));
            }
            if c.status.is_closed() && escrow != 0 {
                v.push(format!("campaign {} is {} but its escrow still holds {escrow} fen", c.id, c.status.as_str()));
            }
            if self.count(EntryKind::CampaignRefund, c.id) > 1 {
                v.push(format!("campaign {} was refunded more than once", c.id));
            }
        }
    }

    fn check_packet(&self, p: &PacketRecord, v: &mut Vec<String>) {
        let id = p.id;
        let claims = self.claims.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let funded = self.sum(EntryKind::PacketFund, id);
        let opened = self.sum(EntryKind::PacketOpen, id);
        let refunded = self.sum(EntryKind::PacketRefund, id);
        let claimed: i64 = claims.iter().map(|c| c.amount_fen).sum();
        if funded != p.total_fen {
            v.push(format!("packet {id}: total {} fen but funded {funded} fen", p.total_fen));
        }
        if opened != claimed {
            v.push(format!("packet {id}: claims sum to {claimed} fen but open entries to {opened} fen"));
        }
        if p.total_fen != claimed + refunded + p.remaining_fen {
            v.push(format!(
                "packet {id}: funded {} != opened {claimed} + refunded {refunded} + remaining {}",
                p.total_fen, p.remaining_fen
            ));
        }
        if refunded != p.refunded_fen {
            v.push(format!("packet {id}: refund entries {refunded} fen, packet says {} fen", p.refunded_fen));
        }
        if self.count(EntryKind::PacketRefund, id) > 1 {
            v.push(format!("packet {id} was refunded more than once"));
        }
        if claims.len() > p.count as usize {
            v.push(format!("packet {id}: {} opens for {} shares", claims.len(), p.count));
        }
        let mut users = HashSet::new();
        let (mut rem, mut left) = (p.total_fen, p.count as i64);
        for c in claims {
            if c.amount_fen < 1 {
                v.push(format!("packet {id}: user {} got {} fen (< 1)", c.user, c.amount_fen));
            }
            if !users.insert(c.user) {
                v.push(format!("packet {id}: user {} opened it twice", c.user));
            }
            if self.open_entries.get(&(id, c.user)) != Some(&c.amount_fen) {
                v.push(format!("packet {id}: claim of user {} has no matching ledger entry", c.user));
            }
            match p.kind {
                SplitKind::Fixed if c.amount_fen * p.count as i64 != p.total_fen => {
                    v.push(format!("packet {id}: fixed share {} fen is not total/count", c.amount_fen));
                }
                SplitKind::Lucky if left > 1 && c.amount_fen > 2 * rem / left => {
                    v.push(format!("packet {id}: share {} fen breaks the double-average bound", c.amount_fen));
                }
                _ => {}
            }
            rem -= c.amount_fen;
            left -= 1;
        }
        match p.status {
            PacketStatus::Finished => {
                if p.remaining_fen != 0 || claims.len() != p.count as usize {
                    v.push(format!(
                        "packet {id} is finished with {} fen and {} claims left open",
                        p.remaining_fen,
                        p.count as usize - claims.len()
                    ));
                }
                if p.best_luck != best_luck_of(claims) {
                    v.push(format!("packet {id}: best luck {:?}, claims say {:?}", p.best_luck, best_luck_of(claims)));
                }
            }
            PacketStatus::Refunded if p.remaining_fen != 0 => {
                v.push(format!("packet {id} is refunded but still holds {} fen", p.remaining_fen));
            }
            PacketStatus::Open if p.refunded_fen != 0 => {
                v.push(format!("packet {id} is open but was refunded"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        id: i64,
        from: Account,
        to: Account,
        amount: i64,
        kind: EntryKind,
        reference: u64,
        user: Option<u64>,
    ) -> EntryRecord {
        EntryRecord { id, from: from.id(), to: to.id(), amount_fen: amount, kind, reference, user }
    }

    fn consistent() -> Auditor {
        let mut a = Auditor::default();
        let p = crate::ids::make_packet_id(0, 0, 1);
        a.entry(entry(1, Account::WORLD, Account::user(1), 100, EntryKind::Deposit, 0, None));
        a.entry(entry(2, Account::user(1), Account::PACKET_ESCROW, 10, EntryKind::PacketFund, p, None));
        a.entry(entry(3, Account::PACKET_ESCROW, Account::user(2), 4, EntryKind::PacketOpen, p, Some(2)));
        a.claim(p, Claim { user: 2, amount_fen: 4, at_ms: 1 });
        a.packet(PacketRecord {
            id: p,
            sender: 1,
            kind: SplitKind::Lucky,
            total_fen: 10,
            count: 2,
            remaining_fen: 6,
            refunded_fen: 0,
            status: PacketStatus::Open,
            best_luck: None,
        });
        a
    }

    fn balances(a: &mut Auditor, user1: i64) {
        a.account(Account::WORLD.id(), -100);
        a.account(Account::user(1).id(), user1);
        a.account(Account::user(2).id(), 4);
        a.account(Account::PACKET_ESCROW.id(), 6);
    }

    #[test]
    fn a_consistent_ledger_passes() {
        let mut a = consistent();
        balances(&mut a, 90);
        let r = a.finish();
        assert!(r.passed(), "{:?}", r.violations);
    }

    #[test]
    fn a_tampered_balance_is_reported_precisely() {
        let mut a = consistent();
        balances(&mut a, 91);
        let r = a.finish();
        assert!(r.violations.iter().any(|s| s.contains("account 1: stored balance Some(91)")), "{:?}", r.violations);
        assert!(r.violations.iter().any(|s| s.contains("sum to 1 fen")));
    }
}
