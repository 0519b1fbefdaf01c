//! `hongbao audit`'s data feed: every stored record of a store, read in one
//! consistent snapshot, given to `core::audit::Auditor`.

use std::path::Path;

use hongbao_core::audit::{
    AuditReport, Auditor, CampaignRecord, CrossInRecord, CrossOutRecord, CrossRows, EntryKind, EntryRecord,
    PacketRecord,
};
use hongbao_core::campaign::CampaignStatus;
use hongbao_core::cross::CrossKind;
use hongbao_core::packet::{Claim, PacketStatus};
use hongbao_core::split::SplitKind;

use crate::{StoreError, StoreLocation};

/// Re-derives every balance and packet in the store at `location` and
/// checks every invariant. Read-only and one snapshot, so it is safe to run
/// against a live server's store.
pub fn audit(location: &StoreLocation) -> Result<AuditReport, StoreError> {
    audit_with_cross(location).map(|(report, _)| report)
}

/// `audit`, and every cross-SET outbox and inbox row of the store, read in
/// the same snapshot: one SET's part of a cluster audit
/// (`hongbao_core::audit::ClusterAuditor::add_set`).
pub fn audit_with_cross(location: &StoreLocation) -> Result<(AuditReport, CrossRows), StoreError> {
    match location {
        StoreLocation::Sqlite(dir) => crate::sqlite::audit::audit_dir(dir),
        StoreLocation::Postgres(target) => crate::postgres::audit::audit(target),
    }
}

/// `audit` of the SQLite store in the data directory `dir`.
pub fn audit_dir(dir: &Path) -> Result<AuditReport, StoreError> {
    crate::sqlite::audit::audit_dir(dir).map(|(report, _)| report)
}

/// Turns stored rows into the auditor's records, for every store: a kind or
/// status this build does not know is reported as corrupt.
#[derive(Default)]
pub(crate) struct Feed {
    auditor: Auditor,
    /// The cross-SET rows, also handed back for a cluster audit.
    rows: CrossRows,
}

fn bad(what: String) -> StoreError {
    StoreError::Corrupt(what)
}

/// How a store names what the audit reads.
pub(crate) struct AuditNames {
    /// The column of the user an entry or claim is for: `user` on SQLite,
    /// `user_id` on PostgreSQL (where `user` is reserved).
    pub user: &'static str,
    /// Every packet, claim and shake win: hot and archived ones alike.
    pub packets: &'static str,
    pub claims: &'static str,
    pub shake_wins: &'static str,
}

/// The audit's queries: accounts, entries, packets, claims, campaigns, and
/// the count and sum of shake wins and of their ledger entries.
pub(crate) fn audit_queries(n: &AuditNames) -> [String; 7] {
    let AuditNames { user, packets, claims, shake_wins } = n;
    [
        "SELECT id, balance FROM accounts".into(),
        format!("SELECT id, from_account, to_account, amount, kind, reference, {user} FROM entries ORDER BY id"),
        format!("SELECT id, sender, kind, total, count, remaining, refunded, status, best_luck FROM {packets}"),
        format!("SELECT packet, {user}, amount, at_ms FROM {claims} ORDER BY packet, seq"),
        "SELECT id, funder, total, status FROM campaigns".into(),
        format!("SELECT count(*), CAST(coalesce(sum(amount), 0) AS BIGINT) FROM {shake_wins}"),
        "SELECT count(*), CAST(coalesce(sum(amount), 0) AS BIGINT) FROM entries WHERE kind = 'shake_win'".into(),
    ]
}

/// The queries of every outbox and inbox row, each in the order written.
pub(crate) fn cross_queries(n: &AuditNames) -> [String; 2] {
    let user = n.user;
    [
        format!("SELECT to_set, kind, packet, {user}, amount, created_ms, published FROM cross_out ORDER BY id"),
        format!(
            "SELECT from_set, kind, packet, {user}, amount, created_ms, applied_ms FROM cross_in ORDER BY applied_ms"
        ),
    ]
}

fn cross_kind(kind: &str, what: impl Fn() -> String) -> Result<CrossKind, StoreError> {
    CrossKind::parse(kind).ok_or_else(|| bad(format!("{} has unknown kind {kind}", what())))
}

fn set_id(set: i64, what: impl Fn() -> String) -> Result<hongbao_core::sets::SetId, StoreError> {
    u8::try_from(set).map_err(|_| bad(format!("{} names SET {set}", what())))
}

impl Feed {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cross_out(
        &mut self,
        to: i64,
        kind: &str,
        packet: i64,
        user: i64,
        amount_fen: i64,
        created_ms: i64,
        published: bool,
    ) -> Result<(), StoreError> {
        let what = || format!("outbox row of packet {packet} for user {user}");
        let r = CrossOutRecord {
            to: set_id(to, what)?,
            kind: cross_kind(kind, what)?,
            packet: packet as u64,
            user: user as u64,
            amount_fen,
            created_ms: created_ms as u64,
            published,
        };
        self.auditor.cross_out(r.clone());
        self.rows.outs.push(r);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cross_in(
        &mut self,
        from: i64,
        kind: &str,
        packet: i64,
        user: i64,
        amount_fen: i64,
        created_ms: i64,
        applied_ms: i64,
    ) -> Result<(), StoreError> {
        let what = || format!("inbox row of packet {packet} for user {user}");
        let r = CrossInRecord {
            from: set_id(from, what)?,
            kind: cross_kind(kind, what)?,
            packet: packet as u64,
            user: user as u64,
            amount_fen,
            created_ms: created_ms as u64,
            applied_ms: applied_ms as u64,
        };
        self.auditor.cross_in(r.clone());
        self.rows.ins.push(r);
        Ok(())
    }

    pub(crate) fn account(&mut self, id: i64, balance: i64) {
        self.auditor.account(id, balance);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn entry(
        &mut self,
        id: i64,
        from: i64,
        to: i64,
        amount_fen: i64,
        kind: &str,
        reference: i64,
        user: Option<i64>,
    ) -> Result<(), StoreError> {
        let kind = EntryKind::parse(kind).ok_or_else(|| bad(format!("entry {id} has unknown kind {kind}")))?;
        let (reference, user) = (reference as u64, user.map(|u| u as u64));
        self.auditor.entry(EntryRecord { id, from, to, amount_fen, kind, reference, user });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn packet(
        &mut self,
        id: i64,
        sender: i64,
        kind: &str,
        total_fen: i64,
        count: i64,
        remaining_fen: i64,
        refunded_fen: i64,
        status: &str,
        best_luck: Option<i64>,
    ) -> Result<(), StoreError> {
        let id = id as u64;
        self.auditor.packet(PacketRecord {
            id,
            sender: sender as u64,
            kind: SplitKind::parse(kind).ok_or_else(|| bad(format!("packet {id} has kind {kind}")))?,
            total_fen,
            count: u32::try_from(count).map_err(|_| bad(format!("packet {id} has count {count}")))?,
            remaining_fen,
            refunded_fen,
            status: PacketStatus::parse(status).ok_or_else(|| bad(format!("packet {id} has status {status}")))?,
            best_luck: best_luck.map(|u| u as u64),
        });
        Ok(())
    }

    pub(crate) fn claim(&mut self, packet: i64, user: i64, amount_fen: i64, at_ms: i64) {
        self.auditor.claim(packet as u64, Claim { user: user as u64, amount_fen, at_ms: at_ms as u64 });
    }

    pub(crate) fn campaign(&mut self, id: i64, funder: i64, total_fen: i64, status: &str) -> Result<(), StoreError> {
        let id = id as u64;
        let status = CampaignStatus::parse(status).ok_or_else(|| bad(format!("campaign {id} has status {status}")))?;
        self.auditor.campaign(CampaignRecord { id, funder: funder as u64, total_fen, status });
        Ok(())
    }

    /// The report, with shake wins matched against their ledger entries one
    /// for one: `(count, sum)` of each.
    /// The cross-SET rows come back with it, as read.
    pub(crate) fn finish(self, wins: (i64, i64), win_entries: (i64, i64)) -> (AuditReport, CrossRows) {
        let mut report = self.auditor.finish();
        if wins != win_entries {
            report.violations.push(format!(
                "shake wins: {} rows / {} fen, ledger entries: {} / {} fen",
                wins.0, wins.1, win_entries.0, win_entries.1
            ));
        }
        (report, self.rows)
    }
}
