//! The conservation proof behind `hongbao audit`, as pure code: storage feeds
//! it every record, it re-derives every balance and packet and reports each
//! broken invariant of DESIGN.md §4 precisely.
//!
//! `Auditor` proves one SET's store. `ClusterAuditor` proves a cluster from
//! each SET's report and its cross-SET rows (`crate::cross`): every credit
//! applied on a user's SET was written by the packet's SET, with the same
//! amount, once; and what is still in flight between SETs closes the
//! cluster's books.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::campaign::CampaignStatus;
use crate::cross::CrossKind;
use crate::ledger::{Account, AccountKind};
use crate::packet::{best_luck_of, Claim, PacketStatus};
use crate::sets::{home_set, SetId};
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
    /// Transit account of the packet's SET → a user homed here: a share of
    /// a packet of another SET, applied from that SET's credit
    /// (`reference` is the packet).
    CrossCredit,
    /// On a campaign's home SET: campaign escrow → transit account of
    /// another SET, that SET's part of the budget (`reference` is the
    /// campaign, `user` none), with an outbox `fund` in the same commit.
    CampaignFundOut,
    /// On another SET: the home SET's transit account → the campaign part's
    /// escrow, applied from its `fund` (`user` is this SET's number, the
    /// message's key).
    CampaignFundIn,
    /// On another SET: a closed campaign part's escrow → the home SET's
    /// transit account, with an outbox `refund` (`user` is the funder).
    CampaignRefundOut,
    /// On the home SET: another SET's transit account → the funder, applied
    /// from that SET's `refund` (`user` is the funder).
    CampaignRefundIn,
}

impl EntryKind {
    pub const ALL: [EntryKind; 13] = [
        EntryKind::Deposit,
        EntryKind::Withdraw,
        EntryKind::PacketFund,
        EntryKind::PacketOpen,
        EntryKind::PacketRefund,
        EntryKind::CampaignFund,
        EntryKind::ShakeWin,
        EntryKind::CampaignRefund,
        EntryKind::CrossCredit,
        EntryKind::CampaignFundOut,
        EntryKind::CampaignFundIn,
        EntryKind::CampaignRefundOut,
        EntryKind::CampaignRefundIn,
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
            EntryKind::CrossCredit => "cross_credit",
            EntryKind::CampaignFundOut => "campaign_fund_out",
            EntryKind::CampaignFundIn => "campaign_fund_in",
            EntryKind::CampaignRefundOut => "campaign_refund_out",
            EntryKind::CampaignRefundIn => "campaign_refund_in",
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

/// A row of the cross-SET outbox: a message this SET wrote for SET `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CrossOutRecord {
    pub to: SetId,
    pub kind: CrossKind,
    pub packet: PacketId,
    pub user: UserId,
    /// A credit's amount; 0 for a notice.
    pub amount_fen: i64,
    pub created_ms: u64,
    pub published: bool,
}

/// A row of the cross-SET inbox: a message from SET `from` applied here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CrossInRecord {
    pub from: SetId,
    pub kind: CrossKind,
    pub packet: PacketId,
    pub user: UserId,
    /// A credit's amount; 0 for a notice.
    pub amount_fen: i64,
    pub created_ms: u64,
    pub applied_ms: u64,
}

/// Every cross-SET row of one store, read in the same snapshot as its audit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CrossRows {
    pub outs: Vec<CrossOutRecord>,
    pub ins: Vec<CrossInRecord>,
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
    /// What this SET owes the other SETs, net (0 on a single node).
    pub transit_fen: i64,
    /// The same by peer SET: what this SET owes each (negative: is owed).
    pub transit_by_set: BTreeMap<SetId, i64>,
    pub cross_out_rows: u64,
    pub cross_in_rows: u64,
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
    /// Money paid into a transit account, per outbox key (kind, packet or
    /// campaign, user): (peer, amount), to match against outbox rows.
    transit_outs: HashMap<(CrossKind, u64, UserId), (SetId, i64)>,
    /// Money applied from a transit account, per inbox key (peer, kind,
    /// packet or campaign, user), to match against inbox rows.
    transit_ins: HashMap<(SetId, CrossKind, u64, UserId), i64>,
    cross_outs: Vec<CrossOutRecord>,
    cross_ins: Vec<CrossInRecord>,
    totals: AuditTotals,
    violations: Vec<String>,
}

/// The peer SET of a transit account id.
fn transit_peer(id: i64) -> Option<SetId> {
    Account::from_id(id).filter(|a| a.kind == AccountKind::Transit).and_then(|a| SetId::try_from(a.owner).ok())
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
                    if let Some(peer) = transit_peer(e.to) {
                        self.transit_outs.insert((CrossKind::Credit, e.reference, user), (peer, e.amount_fen));
                    }
                }
            }
            EntryKind::CrossCredit => match (transit_peer(e.from), e.user) {
                (Some(peer), Some(user)) if e.to == Account::user(user).id() => {
                    if self.transit_ins.insert((peer, CrossKind::Credit, e.reference, user), e.amount_fen).is_some() {
                        self.violations
                            .push(format!("packet {} of SET {peer}: user {user} was credited twice", e.reference));
                    }
                }
                _ => self.violations.push(format!(
                    "entry {} (cross_credit) does not move money from a transit account to its user",
                    e.id
                )),
            },
            EntryKind::CampaignFundOut | EntryKind::CampaignRefundOut => {
                let (kind, user) = match (e.kind, transit_peer(e.to)) {
                    (EntryKind::CampaignFundOut, Some(peer)) => (CrossKind::Fund, Some(u64::from(peer))),
                    (_, Some(_)) => (CrossKind::Refund, e.user),
                    (_, None) => (CrossKind::Refund, None),
                };
                match (transit_peer(e.to), user) {
                    (Some(peer), Some(user)) if e.from == Account::campaign(e.reference).id() => {
                        if self.transit_outs.insert((kind, e.reference, user), (peer, e.amount_fen)).is_some() {
                            self.violations.push(format!(
                                "campaign {}: a {} for SET {peer} was paid twice",
                                e.reference,
                                kind.as_str()
                            ));
                        }
                    }
                    _ => self.violations.push(format!(
                        "entry {} ({}) does not move money from its campaign's escrow to a transit account",
                        e.id,
                        e.kind.as_str()
                    )),
                }
            }
            EntryKind::CampaignFundIn | EntryKind::CampaignRefundIn => {
                let (kind, to) = match (e.kind, e.user) {
                    (EntryKind::CampaignFundIn, _) => (CrossKind::Fund, Account::campaign(e.reference).id()),
                    (_, user) => (CrossKind::Refund, Account::user(user.unwrap_or(0)).id()),
                };
                match (transit_peer(e.from), e.user) {
                    (Some(peer), Some(user)) if e.to == to => {
                        if self.transit_ins.insert((peer, kind, e.reference, user), e.amount_fen).is_some() {
                            self.violations.push(format!(
                                "campaign {}: the {} of SET {peer} was applied twice",
                                e.reference,
                                kind.as_str()
                            ));
                        }
                    }
                    _ => self.violations.push(format!(
                        "entry {} ({}) does not move money from a transit account to its campaign or funder",
                        e.id,
                        e.kind.as_str()
                    )),
                }
            }
            _ => {}
        }
        // Only these move money through a transit account.
        let through_transit = transit_peer(e.from).is_some() || transit_peer(e.to).is_some();
        let allowed = match e.kind {
            EntryKind::PacketOpen | EntryKind::CampaignFundOut | EntryKind::CampaignRefundOut => {
                transit_peer(e.from).is_none()
            }
            EntryKind::CrossCredit | EntryKind::CampaignFundIn | EntryKind::CampaignRefundIn => {
                transit_peer(e.to).is_none()
            }
            _ => false,
        };
        if through_transit && !allowed {
            self.violations.push(format!("entry {} ({}) moves money through a transit account", e.id, e.kind.as_str()));
        }
    }

    /// An outbox row of this store.
    pub fn cross_out(&mut self, r: CrossOutRecord) {
        self.totals.cross_out_rows += 1;
        self.cross_outs.push(r);
    }

    /// An inbox row of this store.
    pub fn cross_in(&mut self, r: CrossInRecord) {
        self.totals.cross_in_rows += 1;
        self.cross_ins.push(r);
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
        self.check_cross(&mut v);
        AuditReport { totals: self.totals, violations: v }
    }

    /// Every stored balance equals the one re-derived from entries; double
    /// entry: all balances sum to zero, and what users and escrow hold, plus
    /// what this SET owes other SETs (transit), is exactly deposits minus
    /// withdrawals.
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
                Some(a) if a.kind == AccountKind::Transit => {
                    self.totals.transit_fen += balance;
                    match SetId::try_from(a.owner) {
                        Ok(peer) if peer < crate::sets::SETS_MAX => {
                            *self.totals.transit_by_set.entry(peer).or_insert(0) += balance
                        }
                        _ => v.push(format!("account {id} is a transit account of no SET")),
                    }
                }
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
            + self.totals.campaign_escrow_fen as i128
            + self.totals.transit_fen as i128;
        if held != net_deposits as i128 {
            v.push(format!("users + escrow + transit hold {held} fen, deposits - withdrawals = {net_deposits} fen"));
        }
    }

    /// Every share paid into a transit account has its outbox credit (same
    /// peer, same amount) and every outbox credit its share; every credit
    /// applied here has its inbox row and every inbox credit its entry; no
    /// message is in a box twice; and each transit account holds exactly
    /// the credits written for its SET less those applied from it.
    fn check_cross(&mut self, v: &mut Vec<String>) {
        let mut net: BTreeMap<SetId, i64> = BTreeMap::new();
        let mut seen_out = HashSet::new();
        for r in std::mem::take(&mut self.cross_outs) {
            let what = format!("outbox {} of packet {} for user {} (SET {})", r.kind.as_str(), r.packet, r.user, r.to);
            if !seen_out.insert((r.kind, r.packet, r.user)) {
                v.push(format!("{what} is in the outbox twice"));
            }
            match r.kind {
                kind if kind.moves_money() => {
                    *net.entry(r.to).or_insert(0) += r.amount_fen;
                    match self.transit_outs.remove(&(kind, r.packet, r.user)) {
                        Some((peer, amount)) if peer == r.to && amount == r.amount_fen => {}
                        Some((peer, amount)) => v.push(format!(
                            "{what}: {} fen, but the share was paid to SET {peer}'s transit: {amount} fen",
                            r.amount_fen
                        )),
                        None => v.push(format!("{what}: {} fen, with no share paid into transit", r.amount_fen)),
                    }
                }
                _ if r.amount_fen != 0 => v.push(format!("{what} carries {} fen", r.amount_fen)),
                _ => {}
            }
        }
        let mut unmatched: Vec<_> = self.transit_outs.drain().collect();
        unmatched.sort_unstable();
        for ((kind, packet, user), (peer, amount)) in unmatched {
            match kind {
                CrossKind::Credit => v.push(format!(
                    "packet {packet}: the share of user {user} ({amount} fen) went to SET {peer}'s transit with no outbox credit"
                )),
                _ => v.push(format!(
                    "campaign {packet}: {amount} fen went to SET {peer}'s transit with no outbox {}",
                    kind.as_str()
                )),
            }
        }
        let mut seen_in = HashSet::new();
        for r in std::mem::take(&mut self.cross_ins) {
            let what =
                format!("inbox {} of packet {} for user {} from SET {}", r.kind.as_str(), r.packet, r.user, r.from);
            if !seen_in.insert((r.from, r.kind, r.packet, r.user)) {
                v.push(format!("{what} was applied twice"));
            }
            match r.kind {
                kind if kind.moves_money() => {
                    *net.entry(r.from).or_insert(0) -= r.amount_fen;
                    match self.transit_ins.remove(&(r.from, kind, r.packet, r.user)) {
                        Some(amount) if amount == r.amount_fen => {}
                        Some(amount) => {
                            v.push(format!("{what}: {} fen, but the ledger credited {amount} fen", r.amount_fen))
                        }
                        None => v.push(format!("{what}: {} fen, with no ledger entry", r.amount_fen)),
                    }
                }
                _ if r.amount_fen != 0 => v.push(format!("{what} carries {} fen", r.amount_fen)),
                _ => {}
            }
        }
        let mut unmatched: Vec<_> = self.transit_ins.drain().collect();
        unmatched.sort_unstable();
        for ((peer, kind, packet, user), amount) in unmatched {
            match kind {
                CrossKind::Credit => v.push(format!(
                    "packet {packet} of SET {peer}: user {user} was credited {amount} fen with no inbox row"
                )),
                _ => v.push(format!(
                    "campaign {packet}: the {} of SET {peer} ({amount} fen) was applied with no inbox row",
                    kind.as_str()
                )),
            }
        }
        let peers: std::collections::BTreeSet<SetId> =
            net.keys().chain(self.totals.transit_by_set.keys()).copied().collect();
        for peer in peers {
            let held = self.totals.transit_by_set.get(&peer).copied().unwrap_or(0);
            let rows = net.get(&peer).copied().unwrap_or(0);
            if held != rows {
                v.push(format!(
                    "transit account of SET {peer} holds {held} fen, but credits written for it less credits applied from it are {rows} fen"
                ));
            }
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

    /// Every campaign (or this SET's part of one split over the cluster):
    /// escrow = funded - won - refunded, where funded is what its funder
    /// paid in (or its home SET sent: `fund` in) less the other SETs' parts
    /// sent out, and refunded is what went back to the funder here or to
    /// the home SET (`refund` out); closed ones hold nothing; refunded at
    /// most once.
    fn check_campaigns(&self, v: &mut Vec<String>) {
        for c in &self.campaigns {
            let funded = self.sum(EntryKind::CampaignFund, c.id) + self.sum(EntryKind::CampaignFundIn, c.id)
                - self.sum(EntryKind::CampaignFundOut, c.id);
            let won = self.sum(EntryKind::ShakeWin, c.id);
            let refunded = self.sum(EntryKind::CampaignRefund, c.id) + self.sum(EntryKind::CampaignRefundOut, c.id);
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
            if self.count(EntryKind::CampaignRefund, c.id) + self.count(EntryKind::CampaignRefundOut, c.id) > 1 {
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

/// One SET as the cluster audit saw it.
#[derive(Clone, Debug, Serialize)]
pub struct SetSummary {
    pub set: SetId,
    /// Its own audit passed.
    pub passed: bool,
    pub totals: AuditTotals,
}

/// Messages written by SET `from` for SET `to` and not applied there yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InFlight {
    pub from: SetId,
    pub to: SetId,
    pub credits: u64,
    /// Campaign `fund` and `refund` messages in flight.
    pub campaign_moves: u64,
    /// What the credits, funds and refunds in flight carry: money no user
    /// balance or escrow holds yet.
    pub amount_fen: i64,
    pub notices: u64,
    /// When the oldest of them was written (wall-clock ms).
    pub oldest_created_ms: Option<u64>,
}

/// The cluster's books, summed over its SETs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterTotals {
    pub sets: u8,
    pub deposits_fen: i64,
    pub withdrawals_fen: i64,
    pub user_balances_fen: i64,
    /// Packet and campaign escrow of every SET.
    pub escrow_fen: i64,
    /// Credits, campaign funds and refunds written and not yet applied,
    /// over every pair of SETs.
    pub in_flight_fen: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    pub totals: ClusterTotals,
    pub sets: Vec<SetSummary>,
    /// Each ordered pair of SETs with anything in flight.
    pub in_flight: Vec<InFlight>,
    pub violations: Vec<String>,
}

impl ClusterReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The cluster audit: every SET's own audit and cross-SET rows (each read
/// in one snapshot of its store), checked against each other.
///
/// It proves: each SET passed its own audit; every inbox row has its outbox
/// row on the SET it names, same kind, packet, user and amount, and is
/// applied once; rows name SETs of the cluster and users homed where they
/// say; for each pair of SETs, what they owe each other (their transit
/// accounts) is what is in flight between them; and all users and escrows,
/// plus what is in flight, hold exactly all deposits less withdrawals.
///
/// Rows of SETs read one after another while they run can straddle a
/// message: a credit applied after its SET's snapshot but written after the
/// other's looks like an inbox row without its outbox row. The answer is
/// exact on SETs read while no message moves (or read again).
pub struct ClusterAuditor {
    sets: u8,
    parts: BTreeMap<SetId, (AuditReport, CrossRows)>,
    violations: Vec<String>,
}

/// An outbox row as the cluster audit indexes it: (from, to, kind, packet, user).
type OutKey = (SetId, SetId, CrossKind, PacketId, UserId);

impl ClusterAuditor {
    /// A cluster of `sets` SETs (`1..=SETS_MAX`).
    pub fn new(sets: u8) -> ClusterAuditor {
        ClusterAuditor { sets, parts: BTreeMap::new(), violations: Vec::new() }
    }

    /// SET `set`'s audit report and its cross-SET rows.
    pub fn add_set(&mut self, set: SetId, report: AuditReport, rows: CrossRows) {
        if set >= self.sets {
            self.violations.push(format!("SET {set} is not one of the cluster's {} SETs", self.sets));
        } else if self.parts.insert(set, (report, rows)).is_some() {
            self.violations.push(format!("SET {set} was given twice"));
        }
    }

    pub fn finish(self) -> ClusterReport {
        let ClusterAuditor { sets, parts, mut violations } = self;
        let v = &mut violations;
        for set in 0..sets {
            if !parts.contains_key(&set) {
                v.push(format!("SET {set} was not audited"));
            }
        }
        for (set, (report, _)) in &parts {
            v.extend(report.violations.iter().map(|x| format!("SET {set}: {x}")));
            for (&peer, &fen) in &report.totals.transit_by_set {
                if (peer >= sets || peer == *set) && fen != 0 {
                    v.push(format!("SET {set}: its transit account of SET {peer} holds {fen} fen"));
                }
            }
        }
        let mut outs = index_outs(sets, &parts, v);
        match_ins(sets, &parts, &mut outs, v);
        let flights = in_flight(&outs);
        check_pairs(&parts, &flights, v);

        let mut totals = ClusterTotals { sets, ..ClusterTotals::default() };
        for (report, _) in parts.values() {
            let t = &report.totals;
            totals.deposits_fen += t.deposits_fen;
            totals.withdrawals_fen += t.withdrawals_fen;
            totals.user_balances_fen += t.user_balances_fen;
            totals.escrow_fen += t.packet_escrow_fen + t.campaign_escrow_fen;
        }
        totals.in_flight_fen = flights.values().map(|f| f.amount_fen).sum();
        let held =
            i128::from(totals.user_balances_fen) + i128::from(totals.escrow_fen) + i128::from(totals.in_flight_fen);
        let owed = i128::from(totals.deposits_fen) - i128::from(totals.withdrawals_fen);
        if held != owed {
            v.push(format!(
                "users {} + escrow {} + in flight {} = {held} fen, but deposits - withdrawals = {owed} fen",
                totals.user_balances_fen, totals.escrow_fen, totals.in_flight_fen
            ));
        }
        let summaries = parts
            .into_iter()
            .map(|(set, (report, _))| SetSummary { set, passed: report.passed(), totals: report.totals })
            .collect();
        ClusterReport { totals, sets: summaries, in_flight: flights.into_values().collect(), violations }
    }
}

/// Every outbox row of the cluster by its key, with its amount, when it was
/// written, and whether an inbox row was found for it. Rows that name the
/// wrong SETs are reported.
fn index_outs(
    sets: u8,
    parts: &BTreeMap<SetId, (AuditReport, CrossRows)>,
    v: &mut Vec<String>,
) -> BTreeMap<OutKey, (i64, u64, bool)> {
    let mut outs = BTreeMap::new();
    for (&set, (_, rows)) in parts {
        for o in &rows.outs {
            let what = format!(
                "SET {set} wrote a {} of packet {} for user {} to SET {}",
                o.kind.as_str(),
                o.packet,
                o.user,
                o.to
            );
            if o.to == set || o.to >= sets {
                v.push(format!("{what}: not another SET of the cluster"));
            }
            check_names(sets, set, o.to, o.kind, o.packet, o.user, &what, v);
            outs.insert((set, o.to, o.kind, o.packet, o.user), (o.amount_fen, o.created_ms, false));
        }
    }
    outs
}

/// What an outbox row of SET `from` for SET `to` must name: a credit or a
/// notice, a packet of `from` and a user homed on `to`; a fund, a campaign
/// of `from` and `to` itself (its key); a refund, a campaign of `to` and a
/// funder homed there.
#[allow(clippy::too_many_arguments)]
fn check_names(
    sets: u8,
    from: SetId,
    to: SetId,
    kind: CrossKind,
    packet: u64,
    user: UserId,
    what: &str,
    v: &mut Vec<String>,
) {
    let (owner, what_of) = match kind {
        CrossKind::Refund => (to, "a campaign"),
        CrossKind::Fund => (from, "a campaign"),
        CrossKind::Credit | CrossKind::Notice => (from, "a packet"),
    };
    if crate::ids::set_of(packet) != owner {
        v.push(format!("{what}: {what_of} of SET {}", crate::ids::set_of(packet)));
    }
    if kind == CrossKind::Fund {
        if user != u64::from(to) {
            v.push(format!("{what}: a fund keyed for SET {user}"));
        }
    } else if home_set(user, sets) != to {
        v.push(format!("{what}: the user is homed on SET {}", home_set(user, sets)));
    }
}

/// Each inbox row against the outbox row it was applied from.
fn match_ins(
    sets: u8,
    parts: &BTreeMap<SetId, (AuditReport, CrossRows)>,
    outs: &mut BTreeMap<OutKey, (i64, u64, bool)>,
    v: &mut Vec<String>,
) {
    for (&set, (_, rows)) in parts {
        let mut seen = HashSet::new();
        for i in &rows.ins {
            let what = format!(
                "SET {set} applied a {} of packet {} for user {} from SET {}",
                i.kind.as_str(),
                i.packet,
                i.user,
                i.from
            );
            if !seen.insert((i.from, i.kind, i.packet, i.user)) {
                v.push(format!("{what} twice"));
                continue;
            }
            if i.from == set || i.from >= sets {
                v.push(format!("{what}: not another SET of the cluster"));
            }
            if i.kind == CrossKind::Fund {
                if i.user != u64::from(set) {
                    v.push(format!("{what}: a fund keyed for SET {}", i.user));
                }
            } else if home_set(i.user, sets) != set {
                v.push(format!("{what}: the user is homed on SET {}", home_set(i.user, sets)));
            }
            match outs.get_mut(&(i.from, set, i.kind, i.packet, i.user)) {
                Some((amount, _, matched)) => {
                    *matched = true;
                    if *amount != i.amount_fen {
                        v.push(format!("{what}: {} fen, but SET {} wrote {amount} fen", i.amount_fen, i.from));
                    }
                }
                // A SET not audited is reported as that.
                None if parts.contains_key(&i.from) => v.push(format!("{what}, which SET {} never wrote", i.from)),
                None => {}
            }
        }
    }
}

/// What is written and not applied, per ordered pair of SETs.
fn in_flight(outs: &BTreeMap<OutKey, (i64, u64, bool)>) -> BTreeMap<(SetId, SetId), InFlight> {
    let mut flights: BTreeMap<(SetId, SetId), InFlight> = BTreeMap::new();
    for (&(from, to, kind, _, _), &(amount_fen, created_ms, matched)) in outs {
        if matched {
            continue;
        }
        let f = flights.entry((from, to)).or_insert_with(|| InFlight { from, to, ..InFlight::default() });
        match kind {
            CrossKind::Credit => {
                f.credits += 1;
                f.amount_fen += amount_fen;
            }
            CrossKind::Notice => f.notices += 1,
            CrossKind::Fund | CrossKind::Refund => {
                f.campaign_moves += 1;
                f.amount_fen += amount_fen;
            }
        }
        f.oldest_created_ms = Some(f.oldest_created_ms.map_or(created_ms, |t| t.min(created_ms)));
    }
    flights
}

/// For each pair of SETs: what A owes B plus what B owes A is the money in
/// flight between them, both ways.
fn check_pairs(
    parts: &BTreeMap<SetId, (AuditReport, CrossRows)>,
    flights: &BTreeMap<(SetId, SetId), InFlight>,
    v: &mut Vec<String>,
) {
    let owes = |a: SetId, b: SetId| parts[&a].0.totals.transit_by_set.get(&b).copied().unwrap_or(0);
    let flying = |a: SetId, b: SetId| flights.get(&(a, b)).map_or(0, |f| f.amount_fen);
    for &a in parts.keys() {
        for &b in parts.keys().filter(|&&b| b > a) {
            let (ab, ba) = (owes(a, b), owes(b, a));
            let between = flying(a, b) + flying(b, a);
            if ab + ba != between {
                v.push(format!(
                    "SETs {a} and {b}: SET {a} owes SET {b} {ab} fen and SET {b} owes SET {a} {ba} fen, \
                     but {between} fen of credits are in flight between them"
                ));
            }
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

    /// SET 0 of 2: user 2 sends packet P (10 fen, 2 shares) to users 3
    /// (homed on SET 1) and 4; both open it. User 3's share goes to SET 1's
    /// transit, with an outbox credit.
    fn set_zero() -> (Auditor, u64) {
        let mut a = Auditor::default();
        let p = crate::ids::make_packet_id(0, 0, 1);
        a.entry(entry(1, Account::WORLD, Account::user(2), 100, EntryKind::Deposit, 0, None));
        a.entry(entry(2, Account::user(2), Account::PACKET_ESCROW, 10, EntryKind::PacketFund, p, None));
        a.entry(entry(3, Account::PACKET_ESCROW, Account::transit(1), 6, EntryKind::PacketOpen, p, Some(3)));
        a.entry(entry(4, Account::PACKET_ESCROW, Account::user(4), 4, EntryKind::PacketOpen, p, Some(4)));
        a.claim(p, Claim { user: 3, amount_fen: 6, at_ms: 1 });
        a.claim(p, Claim { user: 4, amount_fen: 4, at_ms: 2 });
        a.packet(PacketRecord {
            id: p,
            sender: 2,
            kind: SplitKind::Lucky,
            total_fen: 10,
            count: 2,
            remaining_fen: 0,
            refunded_fen: 0,
            status: PacketStatus::Finished,
            best_luck: Some(3),
        });
        for (id, balance) in
            [(Account::WORLD, -100), (Account::user(2), 90), (Account::user(4), 4), (Account::transit(1), 6)]
        {
            a.account(id.id(), balance);
        }
        a.account(Account::PACKET_ESCROW.id(), 0);
        (a, p)
    }

    fn credit_out(p: u64) -> CrossOutRecord {
        CrossOutRecord {
            to: 1,
            kind: CrossKind::Credit,
            packet: p,
            user: 3,
            amount_fen: 6,
            created_ms: 1,
            published: true,
        }
    }

    fn credit_in(p: u64) -> CrossInRecord {
        CrossInRecord {
            from: 0,
            kind: CrossKind::Credit,
            packet: p,
            user: 3,
            amount_fen: 6,
            created_ms: 1,
            applied_ms: 9,
        }
    }

    /// SET 1 of 2: user 1 deposited 50; with `applied`, SET 0's credit of 6
    /// fen to user 3 is applied.
    fn set_one(p: u64, applied: bool) -> (AuditReport, CrossRows) {
        let mut a = Auditor::default();
        a.entry(entry(1, Account::WORLD, Account::user(1), 50, EntryKind::Deposit, 0, None));
        a.account(Account::WORLD.id(), -50);
        a.account(Account::user(1).id(), 50);
        let mut rows = CrossRows::default();
        if applied {
            a.entry(entry(2, Account::transit(0), Account::user(3), 6, EntryKind::CrossCredit, p, Some(3)));
            a.account(Account::transit(0).id(), -6);
            a.account(Account::user(3).id(), 6);
            a.cross_in(credit_in(p));
            rows.ins.push(credit_in(p));
        }
        (a.finish(), rows)
    }

    fn cluster(zero: (AuditReport, CrossRows), one: (AuditReport, CrossRows)) -> ClusterReport {
        let mut c = ClusterAuditor::new(2);
        c.add_set(0, zero.0, zero.1);
        c.add_set(1, one.0, one.1);
        c.finish()
    }

    fn set_zero_report() -> (AuditReport, CrossRows, u64) {
        let (mut a, p) = set_zero();
        a.cross_out(credit_out(p));
        (a.finish(), CrossRows { outs: vec![credit_out(p)], ins: vec![] }, p)
    }

    #[test]
    fn a_share_paid_into_transit_passes_with_its_outbox_credit_and_shows_per_set() {
        let (report, _, _) = set_zero_report();
        assert!(report.passed(), "{:?}", report.violations);
        assert_eq!(report.totals.transit_fen, 6);
        assert_eq!(report.totals.transit_by_set, BTreeMap::from([(1, 6)]));
        assert_eq!(report.totals.cross_out_rows, 1);
        // Without its outbox row, the share is reported.
        let (a, _) = set_zero();
        let r = a.finish();
        assert!(r.violations.iter().any(|v| v.contains("with no outbox credit")), "{:?}", r.violations);
        assert!(r.violations.iter().any(|v| v.contains("transit account of SET 1 holds 6 fen")), "{:?}", r.violations);
    }

    #[test]
    fn the_cluster_passes_with_credits_in_flight_and_after_they_are_applied() {
        let (zero, rows, p) = set_zero_report();
        let before = cluster((zero.clone(), rows.clone()), set_one(p, false));
        assert!(before.passed(), "{:?}", before.violations);
        let flight = InFlight {
            from: 0,
            to: 1,
            credits: 1,
            campaign_moves: 0,
            amount_fen: 6,
            notices: 0,
            oldest_created_ms: Some(1),
        };
        assert_eq!(before.in_flight, vec![flight]);
        assert_eq!(before.totals.in_flight_fen, 6);
        assert_eq!(
            (before.totals.user_balances_fen, before.totals.deposits_fen),
            (90 + 4 + 50, 150),
            "users + in flight = deposits"
        );
        let after = cluster((zero, rows), set_one(p, true));
        assert!(after.passed(), "{:?}", after.violations);
        assert_eq!((after.in_flight.len(), after.totals.in_flight_fen), (0, 0));
        assert_eq!(after.sets.iter().map(|s| s.totals.transit_fen).collect::<Vec<_>>(), vec![6, -6]);
    }

    #[test]
    fn a_tampered_inbox_row_fails_the_cluster() {
        let (zero, rows, p) = set_zero_report();
        let (one, mut one_rows) = set_one(p, true);
        one_rows.ins[0].amount_fen = 7;
        let r = cluster((zero, rows), (one, one_rows));
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("applied a credit of packet") && v.contains("7 fen, but SET 0 wrote 6")),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn a_credit_applied_twice_fails_both_audits() {
        let (zero, rows, p) = set_zero_report();
        // SET 1's own audit: a second inbox row and a second entry.
        let mut a = Auditor::default();
        a.entry(entry(1, Account::WORLD, Account::user(1), 50, EntryKind::Deposit, 0, None));
        a.entry(entry(2, Account::transit(0), Account::user(3), 6, EntryKind::CrossCredit, p, Some(3)));
        a.entry(entry(3, Account::transit(0), Account::user(3), 6, EntryKind::CrossCredit, p, Some(3)));
        for (id, balance) in
            [(Account::WORLD, -50), (Account::user(1), 50), (Account::transit(0), -12), (Account::user(3), 12)]
        {
            a.account(id.id(), balance);
        }
        a.cross_in(credit_in(p));
        a.cross_in(credit_in(p));
        let one = a.finish();
        assert!(one.violations.iter().any(|v| v.contains("was applied twice")), "{:?}", one.violations);
        assert!(one.violations.iter().any(|v| v.contains("was credited twice")), "{:?}", one.violations);
        let r = cluster((zero, rows), (one, CrossRows { outs: vec![], ins: vec![credit_in(p), credit_in(p)] }));
        assert!(
            r.violations.iter().any(|v| v.starts_with("SET 1 applied") && v.ends_with("twice")),
            "{:?}",
            r.violations
        );
        assert!(r.violations.iter().any(|v| v.starts_with("SETs 0 and 1")), "{:?}", r.violations);
    }

    #[test]
    fn a_credit_applied_without_its_outbox_row_fails_the_cluster() {
        let (zero, _, p) = set_zero_report();
        let r = cluster((zero, CrossRows::default()), set_one(p, true));
        assert!(r.violations.iter().any(|v| v.contains("which SET 0 never wrote")), "{:?}", r.violations);
        // A SET left out, or named twice, is reported as that.
        let mut c = ClusterAuditor::new(2);
        let (zero, rows, _) = set_zero_report();
        c.add_set(0, zero.clone(), rows.clone());
        c.add_set(0, zero.clone(), rows.clone());
        c.add_set(5, zero, rows);
        let r = c.finish();
        for expected in ["SET 0 was given twice", "SET 5 is not one of the cluster's 2 SETs", "SET 1 was not audited"] {
            assert!(r.violations.iter().any(|v| v == expected), "{expected}: {:?}", r.violations);
        }
    }
}
