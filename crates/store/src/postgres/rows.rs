//! `Rows` on PostgreSQL: a round trip per statement is what costs here, so
//! a batch's hot writes (journal entries, claims, packet rows, shake wins,
//! messages, balances) are collected column by column and sent as one
//! `INSERT … SELECT FROM unnest(…)` (or `UPDATE … FROM unnest(…)`) per table,
//! and the hot reads (a packet's remaining money, a shake key's first win,
//! whether a campaign packet was won, whether a cross-SET message was
//! applied) are asked for the whole batch in one query each before it is
//! applied. The cross-SET outbox and inbox rows are collected the same way.
//!
//! The rule that keeps this equal to one statement at a time: every read
//! sees every write made before it in the batch. A read the prefetch
//! answered is kept up to date by the writes of this batch that touch it;
//! any other read, and every write that is not collected, first sends what
//! is collected.

use std::collections::{BTreeSet, HashMap};

use hongbao_core::campaign::CampaignSpec;
use hongbao_core::cross::CrossKind;
use hongbao_core::ledger::{Account, Transfer};
use hongbao_core::sets::SetId;
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use postgres::types::ToSql;
use postgres::{Client, Statement};

use crate::ops::{Command, ExistingPacket, FirstWin, NewPacket, OpenShare, ShakeWin};
use crate::rows::{encode_users, target_of, CrossIn, CrossOut, EntryMeta, KeyedCampaign, MessageKind, RowResult, Rows};
use crate::StoreError;

/// Message ids per value of the `message_id_blocks` sequence.
const MESSAGE_ID_BLOCK: u64 = 1024;

/// Message ids the writer may hand out: `next..end`.
#[derive(Default)]
pub(crate) struct MessageIds {
    next: u64,
    end: u64,
}

/// Every statement the writer runs, prepared once per connection.
pub(crate) struct Statements {
    keyed_result: Statement,
    insert_keyed_result: Statement,
    packet_by_key: Statement,
    insert_packets: Statement,
    open_remaining: Statement,
    open_remaining_many: Statement,
    insert_claims: Statement,
    claim_amount: Statement,
    write_opens: Statement,
    refund_packet: Statement,
    raise_id_mark: Statement,
    campaign_by_key: Statement,
    insert_campaign: Statement,
    start_campaign: Statement,
    campaign_state: Statement,
    set_campaign_status: Statement,
    win_by_key: Statement,
    wins_by_key_many: Statement,
    packet_won: Statement,
    packets_won_many: Statement,
    insert_wins: Statement,
    insert_messages: Statement,
    count_messages: Statement,
    prune_messages: Statement,
    uncount_messages: Statement,
    delete_message: Statement,
    message_id_block: Statement,
    group_members: Statement,
    delete_group: Statement,
    insert_group: Statement,
    insert_entries: Statement,
    write_balances: Statement,
    insert_cross_outs: Statement,
    cross_in_amount: Statement,
    cross_in_many: Statement,
    insert_cross_ins: Statement,
    mark_cross_published: Statement,
}

impl Statements {
    pub(crate) fn prepare(c: &mut Client) -> Result<Statements, StoreError> {
        Ok(Statements {
            keyed_result: c.prepare("SELECT request, result FROM idempotency WHERE scope = $1 AND key = $2")?,
            insert_keyed_result: c
                .prepare("INSERT INTO idempotency (scope, key, request, result) VALUES ($1, $2, $3, $4)")?,
            packet_by_key: c.prepare(
                "SELECT packet, total, count, expires_ms, kind FROM all_packet_keys WHERE sender = $1 AND idem_key = $2",
            )?,
            insert_packets: c.prepare(
                "WITH new AS (
                     SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::int[], $7::text[], $8::bigint[], $9::bytea[], $10::text[], $11::bigint[], $12::bigint[], $13::text[])
                       AS t(day, id, sender, kind, total, count, target, grp, recipients, greeting, created_ms, expires_ms, idem_key)
                 ), keys AS (
                     INSERT INTO packet_keys (sender, idem_key, packet, day, kind, total, count, expires_ms)
                     SELECT sender, idem_key, id, day, kind, total, count, expires_ms FROM new
                 )
                 INSERT INTO packets (day, id, sender, kind, total, count, target, grp, recipients, greeting, created_ms, expires_ms, remaining, status, idem_key)
                 SELECT day, id, sender, kind, total, count, target, grp, recipients, greeting, created_ms, expires_ms, total, 'open', idem_key FROM new",
            )?,
            open_remaining: c
                .prepare("SELECT remaining FROM packets WHERE id = $1 AND day = $2 AND status = 'open'")?,
            open_remaining_many: c.prepare(
                "SELECT id, remaining FROM packets WHERE id = ANY($1::bigint[]) AND day = ANY($2::int[]) AND status = 'open'",
            )?,
            insert_claims: c.prepare(
                "INSERT INTO claims (day, packet, user_id, seq, amount, at_ms)
                 SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::int[], $5::bigint[], $6::bigint[])",
            )?,
            claim_amount: c
                .prepare("SELECT amount FROM all_claims WHERE packet = $1 AND day = $2 AND user_id = $3")?,
            write_opens: c.prepare(
                "UPDATE packets p SET remaining = p.remaining - u.taken, status = u.status, best_luck = u.best_luck
                 FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[]) AS u(day, id, taken, status, best_luck)
                 WHERE p.day = u.day AND p.id = u.id AND p.status = 'open' AND p.remaining >= u.taken
                   AND p.day = ANY($1::int[])",
            )?,
            refund_packet: c.prepare(
                "UPDATE packets SET status = 'refunded', refunded = remaining, remaining = 0
                 WHERE id = $1 AND day = $2 AND status = 'open' AND remaining = $3",
            )?,
            raise_id_mark: c.prepare(
                "INSERT INTO id_marks (shard, mark) VALUES ($1, $2) ON CONFLICT (shard) DO UPDATE SET mark = greatest(id_marks.mark, excluded.mark)",
            )?,
            campaign_by_key: c.prepare("SELECT id, funder, total, rule FROM campaigns WHERE idem_key = $1")?,
            insert_campaign: c.prepare(
                "INSERT INTO campaigns (id, funder, total, rule, rate_per_s, win_cap, status, created_ms, idem_key) VALUES ($1, $2, $3, $4, $5, $6, 'created', $7, $8)",
            )?,
            start_campaign: c.prepare(
                "UPDATE campaigns SET status = 'running' WHERE id = $1 AND status NOT IN ('stopped', 'finished')",
            )?,
            campaign_state: c.prepare("SELECT funder, status FROM campaigns WHERE id = $1")?,
            set_campaign_status: c.prepare("UPDATE campaigns SET status = $2 WHERE id = $1")?,
            win_by_key: c
                .prepare("SELECT campaign, packet, amount FROM all_shake_keys WHERE user_id = $1 AND idem_key = $2")?,
            wins_by_key_many: c.prepare(
                "SELECT w.user_id, w.idem_key, w.campaign, w.packet, w.amount FROM all_shake_keys w
                 JOIN unnest($1::bigint[], $2::text[]) AS k(user_id, idem_key) ON w.user_id = k.user_id AND w.idem_key = k.idem_key",
            )?,
            packet_won: c.prepare("SELECT 1 FROM all_shake_wins WHERE packet = $1 AND day = $2")?,
            packets_won_many: c.prepare(
                "SELECT packet FROM all_shake_wins WHERE packet = ANY($1::bigint[]) AND day = ANY($2::int[])",
            )?,
            insert_wins: c.prepare(
                "WITH new AS (
                     SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::text[])
                       AS t(day, packet, campaign, user_id, amount, at_ms, idem_key)
                 ), keys AS (
                     INSERT INTO shake_keys (user_id, idem_key, campaign, packet, day, amount)
                     SELECT user_id, idem_key, campaign, packet, day, amount FROM new WHERE idem_key IS NOT NULL
                 )
                 INSERT INTO shake_wins (day, packet, campaign, user_id, amount, at_ms, idem_key) SELECT * FROM new",
            )?,
            insert_messages: c.prepare(
                "INSERT INTO messages (id, user_id, body, created_ms, kind, sender)
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bigint[], $5::text[], $6::bigint[])",
            )?,
            count_messages: c.prepare(
                "INSERT INTO message_counts (user_id, kind, n) SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[])
                 ON CONFLICT (user_id, kind) DO UPDATE SET n = message_counts.n + excluded.n
                 RETURNING user_id, kind, n",
            )?,
            prune_messages: c.prepare(
                "DELETE FROM messages m USING (
                     SELECT o.user_id, o.kind,
                            (SELECT x.id FROM messages x WHERE x.user_id = o.user_id AND x.kind = o.kind
                             ORDER BY x.id DESC OFFSET o.kept LIMIT 1) AS cut
                     FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS o(user_id, kind, kept)
                 ) c
                 WHERE m.user_id = c.user_id AND m.kind = c.kind AND m.id <= c.cut
                 RETURNING m.user_id, m.kind, m.sender",
            )?,
            uncount_messages: c.prepare(
                "UPDATE message_counts mc SET n = mc.n - u.gone
                 FROM unnest($1::bigint[], $2::text[], $3::int[]) AS u(user_id, kind, gone)
                 WHERE mc.user_id = u.user_id AND mc.kind = u.kind",
            )?,
            delete_message: c.prepare(
                "WITH gone AS (DELETE FROM messages WHERE id = $1 AND user_id = $2 RETURNING user_id, kind, sender),
                      counted AS (UPDATE message_counts mc SET n = mc.n - 1 FROM gone
                                  WHERE mc.user_id = gone.user_id AND mc.kind = gone.kind)
                 SELECT kind, sender FROM gone",
            )?,
            message_id_block: c.prepare("SELECT nextval('message_id_blocks')")?,
            group_members: c.prepare("SELECT user_id FROM group_members WHERE grp = $1")?,
            delete_group: c.prepare("DELETE FROM group_members WHERE grp = $1")?,
            insert_group: c.prepare(
                "INSERT INTO group_members (grp, user_id) SELECT $1, u FROM unnest($2::bigint[]) AS t(u)",
            )?,
            insert_entries: c.prepare(
                "INSERT INTO entries (from_account, to_account, amount, kind, reference, user_id, at_ms)
                 SELECT from_account, to_account, amount, kind, reference, user_id, at_ms
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[])
                   WITH ORDINALITY AS t(from_account, to_account, amount, kind, reference, user_id, at_ms, ord)
                 ORDER BY ord",
            )?,
            write_balances: c.prepare(
                "INSERT INTO accounts (id, balance) SELECT * FROM unnest($1::bigint[], $2::bigint[])
                 ON CONFLICT (id) DO UPDATE SET balance = excluded.balance",
            )?,
            insert_cross_outs: c.prepare(
                "INSERT INTO cross_out (kind, to_set, packet, user_id, amount, body, created_ms)
                 SELECT kind, to_set, packet, user_id, amount, body, created_ms
                 FROM unnest($1::text[], $2::smallint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bytea[], $7::bigint[])
                   WITH ORDINALITY AS t(kind, to_set, packet, user_id, amount, body, created_ms, ord)
                 ORDER BY ord",
            )?,
            cross_in_amount: c.prepare(
                "SELECT amount FROM cross_in WHERE packet = $1 AND user_id = $2 AND kind = $3 AND from_set = $4",
            )?,
            cross_in_many: c.prepare(
                "SELECT c.from_set, c.kind, c.packet, c.user_id, c.amount FROM cross_in c
                 JOIN unnest($1::smallint[], $2::text[], $3::bigint[], $4::bigint[]) AS k(from_set, kind, packet, user_id)
                   ON c.packet = k.packet AND c.user_id = k.user_id AND c.kind = k.kind AND c.from_set = k.from_set",
            )?,
            insert_cross_ins: c.prepare(
                "INSERT INTO cross_in (from_set, kind, packet, user_id, amount, created_ms, applied_ms)
                 SELECT * FROM unnest($1::smallint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])",
            )?,
            mark_cross_published: c.prepare(
                "UPDATE cross_out c SET published = true
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS k(kind, packet, user_id)
                 WHERE c.packet = k.packet AND c.user_id = k.user_id AND c.kind = k.kind AND NOT c.published",
            )?,
        })
    }
}

/// Writes collected for one bulk statement each, column by column.
#[derive(Default)]
struct Collected {
    entries: Entries,
    claims: Claims,
    opens: Opens,
    wins: Wins,
    messages: Messages,
    packets: Packets,
    cross_outs: CrossOuts,
    cross_ins: CrossIns,
}

#[derive(Default)]
struct CrossOuts {
    kind: Vec<&'static str>,
    to: Vec<i16>,
    packet: Vec<i64>,
    user: Vec<i64>,
    amount: Vec<i64>,
    body: Vec<Option<Vec<u8>>>,
    created_ms: Vec<i64>,
}

#[derive(Default)]
struct CrossIns {
    from: Vec<i16>,
    kind: Vec<&'static str>,
    packet: Vec<i64>,
    user: Vec<i64>,
    amount: Vec<i64>,
    created_ms: Vec<i64>,
    applied_ms: Vec<i64>,
}

#[derive(Default)]
struct Entries {
    from: Vec<i64>,
    to: Vec<i64>,
    amount: Vec<i64>,
    kind: Vec<&'static str>,
    reference: Vec<i64>,
    user: Vec<Option<i64>>,
    at_ms: Vec<i64>,
}

#[derive(Default)]
struct Claims {
    day: Vec<i32>,
    packet: Vec<i64>,
    user: Vec<i64>,
    seq: Vec<i32>,
    amount: Vec<i64>,
    at_ms: Vec<i64>,
}

#[derive(Default)]
struct Opens {
    day: Vec<i32>,
    packet: Vec<i64>,
    taken: Vec<i64>,
    status: Vec<&'static str>,
    best_luck: Vec<Option<i64>>,
}

#[derive(Default)]
struct Wins {
    day: Vec<i32>,
    packet: Vec<i64>,
    campaign: Vec<i64>,
    user: Vec<i64>,
    amount: Vec<i64>,
    at_ms: Vec<i64>,
    key: Vec<Option<String>>,
}

#[derive(Default)]
struct Messages {
    id: Vec<i64>,
    user: Vec<i64>,
    body: Vec<Vec<u8>>,
    created_ms: Vec<i64>,
    kind: Vec<&'static str>,
    sender: Vec<i64>,
}

#[derive(Default)]
struct Packets {
    day: Vec<i32>,
    id: Vec<i64>,
    sender: Vec<i64>,
    kind: Vec<&'static str>,
    total: Vec<i64>,
    count: Vec<i32>,
    target: Vec<&'static str>,
    group: Vec<Option<i64>>,
    recipients: Vec<Vec<u8>>,
    greeting: Vec<String>,
    created_ms: Vec<i64>,
    expires_ms: Vec<i64>,
    key: Vec<String>,
}

/// Answers read for the whole batch before it is applied, kept equal to
/// what the database would answer now, with this batch's writes.
#[derive(Default)]
struct Prefetched {
    /// A packet's remaining money if it is open (`None`: not open, or absent).
    open_remaining: HashMap<PacketId, Option<i64>>,
    win_by_key: HashMap<(UserId, String), Option<FirstWin>>,
    packet_won: HashMap<PacketId, bool>,
    /// The amount an inbox message was applied with (`None`: not applied).
    cross_in: HashMap<CrossInKey, Option<i64>>,
}

/// An inbox row's key: (from, kind, packet, user).
type CrossInKey = (SetId, CrossKind, PacketId, UserId);

/// One batch's rows on the writer's connection, inside its transaction.
pub(crate) struct PgRows<'a> {
    client: &'a mut Client,
    statements: &'a Statements,
    message_ids: &'a mut MessageIds,
    collected: Collected,
    prefetched: Prefetched,
    /// Messages this batch stored, by user and kind, not yet counted in
    /// `message_counts`.
    stored_messages: HashMap<(UserId, MessageKind), i32>,
    /// What `message_counts` says now of each user and kind this batch counted.
    counted: HashMap<(UserId, MessageKind), i32>,
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).expect("ids, amounts and times fit in i64")
}

impl PgRows<'_> {
    /// Adds the messages stored since the last count to `message_counts`
    /// (one statement) and remembers what it says now.
    fn count_stored(&mut self) -> RowResult<()> {
        if self.stored_messages.is_empty() {
            return Ok(());
        }
        let stored = std::mem::take(&mut self.stored_messages);
        let users: Vec<i64> = stored.keys().map(|(u, _)| as_i64(*u)).collect();
        let kinds: Vec<&str> = stored.keys().map(|(_, k)| k.as_str()).collect();
        let added: Vec<i32> = stored.values().copied().collect();
        for r in self.client.query(&self.statements.count_messages, &[&users, &kinds, &added])? {
            self.counted.insert((r.get::<_, i64>(0) as u64, MessageKind::parse(r.get(1))), r.get(2));
        }
        Ok(())
    }
}

/// The partition day of a packet's rows (`core::ids::day_of`).
pub(crate) fn day_of(packet: PacketId) -> i32 {
    hongbao_core::ids::day_of(packet) as i32
}

/// The distinct days of `packets`, for a query that names its partitions.
fn days_of(packets: &[i64]) -> Vec<i32> {
    let mut days: Vec<i32> = packets.iter().map(|p| day_of(*p as u64)).collect();
    days.sort_unstable();
    days.dedup();
    days
}

impl<'a> PgRows<'a> {
    pub(crate) fn new(
        client: &'a mut Client,
        statements: &'a Statements,
        message_ids: &'a mut MessageIds,
    ) -> PgRows<'a> {
        PgRows {
            client,
            statements,
            message_ids,
            collected: Collected::default(),
            prefetched: Prefetched::default(),
            stored_messages: HashMap::new(),
            counted: HashMap::new(),
        }
    }

    /// Asks, in one query each, what the batch's opens and shake wins will
    /// read: the remaining money of each packet opened, the first win of
    /// each shake key, and whether each campaign packet was won.
    pub(crate) fn prefetch(&mut self, batch: &[Command]) -> RowResult<()> {
        let mut opened: Vec<i64> = Vec::new();
        let (mut key_users, mut keys, mut won): (Vec<i64>, Vec<String>, Vec<i64>) = Default::default();
        let mut applied: Vec<CrossInKey> = Vec::new();
        for command in batch {
            match command {
                Command::ApplyCross(s) => {
                    let m = &s.op.msg;
                    applied.push((m.from, m.kind(), m.packet, m.user));
                }
                Command::OpenShare(s) => opened.push(as_i64(s.op.packet)),
                Command::ShakeWin(s) => {
                    won.push(as_i64(s.op.packet));
                    if let Some(key) = &s.op.key {
                        key_users.push(as_i64(s.op.user));
                        keys.push(key.clone());
                    }
                }
                _ => {}
            }
        }
        let p = &mut self.prefetched;
        if !opened.is_empty() {
            opened.sort_unstable();
            opened.dedup();
            for &id in &opened {
                p.open_remaining.insert(id as u64, None);
            }
            for row in self.client.query(&self.statements.open_remaining_many, &[&opened, &days_of(&opened)])? {
                p.open_remaining.insert(row.get::<_, i64>(0) as u64, Some(row.get(1)));
            }
        }
        if !keys.is_empty() {
            for (user, key) in key_users.iter().zip(&keys) {
                p.win_by_key.insert((*user as u64, key.clone()), None);
            }
            for row in self.client.query(&self.statements.wins_by_key_many, &[&key_users, &keys])? {
                let first = FirstWin {
                    campaign: row.get::<_, i64>(2) as u64,
                    packet: row.get::<_, i64>(3) as u64,
                    amount_fen: row.get(4),
                };
                p.win_by_key.insert((row.get::<_, i64>(0) as u64, row.get(1)), Some(first));
            }
        }
        if !won.is_empty() {
            for &packet in &won {
                p.packet_won.insert(packet as u64, false);
            }
            for row in self.client.query(&self.statements.packets_won_many, &[&won, &days_of(&won)])? {
                p.packet_won.insert(row.get::<_, i64>(0) as u64, true);
            }
        }
        if !applied.is_empty() {
            let from: Vec<i16> = applied.iter().map(|k| i16::from(k.0)).collect();
            let kinds: Vec<&str> = applied.iter().map(|k| k.1.as_str()).collect();
            let packets: Vec<i64> = applied.iter().map(|k| as_i64(k.2)).collect();
            let users: Vec<i64> = applied.iter().map(|k| as_i64(k.3)).collect();
            for key in applied {
                p.cross_in.insert(key, None);
            }
            for row in self.client.query(&self.statements.cross_in_many, &[&from, &kinds, &packets, &users])? {
                let Some(kind) = CrossKind::parse(row.get(1)) else { continue };
                let key =
                    (row.get::<_, i16>(0) as SetId, kind, row.get::<_, i64>(2) as u64, row.get::<_, i64>(3) as u64);
                p.cross_in.insert(key, Some(row.get(4)));
            }
        }
        Ok(())
    }

    /// Sends what is still collected, before COMMIT.
    pub(crate) fn finish(mut self) -> RowResult<()> {
        self.send_collected()
    }

    /// Sends every collected write, one statement per table, in an order
    /// that lets later tables build on earlier ones (a packet funded and
    /// opened in one batch is inserted before its opens update it).
    fn send_collected(&mut self) -> RowResult<()> {
        let c = std::mem::take(&mut self.collected);
        let (client, s) = (&mut *self.client, self.statements);
        let run = |client: &mut Client, statement: &Statement, params: &[&(dyn ToSql + Sync)]| {
            client.execute(statement, params)
        };
        let p = &c.packets;
        if !p.id.is_empty() {
            run(
                client,
                &s.insert_packets,
                &[
                    &p.day,
                    &p.id,
                    &p.sender,
                    &p.kind,
                    &p.total,
                    &p.count,
                    &p.target,
                    &p.group,
                    &p.recipients,
                    &p.greeting,
                    &p.created_ms,
                    &p.expires_ms,
                    &p.key,
                ],
            )?;
        }
        let e = &c.entries;
        if !e.from.is_empty() {
            run(client, &s.insert_entries, &[&e.from, &e.to, &e.amount, &e.kind, &e.reference, &e.user, &e.at_ms])?;
        }
        let cl = &c.claims;
        if !cl.packet.is_empty() {
            run(client, &s.insert_claims, &[&cl.day, &cl.packet, &cl.user, &cl.seq, &cl.amount, &cl.at_ms])?;
        }
        let o = &c.opens;
        if !o.packet.is_empty() {
            let updated = run(client, &s.write_opens, &[&o.day, &o.packet, &o.taken, &o.status, &o.best_luck])?;
            assert_eq!(
                updated as usize,
                o.packet.len(),
                "opens of packets {:?} do not match their stored state",
                o.packet
            );
        }
        let w = &c.wins;
        if !w.packet.is_empty() {
            run(client, &s.insert_wins, &[&w.day, &w.packet, &w.campaign, &w.user, &w.amount, &w.at_ms, &w.key])?;
        }
        let m = &c.messages;
        if !m.id.is_empty() {
            run(client, &s.insert_messages, &[&m.id, &m.user, &m.body, &m.created_ms, &m.kind, &m.sender])?;
        }
        let o = &c.cross_outs;
        if !o.packet.is_empty() {
            run(
                client,
                &s.insert_cross_outs,
                &[&o.kind, &o.to, &o.packet, &o.user, &o.amount, &o.body, &o.created_ms],
            )?;
        }
        let i = &c.cross_ins;
        if !i.packet.is_empty() {
            run(
                client,
                &s.insert_cross_ins,
                &[&i.from, &i.kind, &i.packet, &i.user, &i.amount, &i.created_ms, &i.applied_ms],
            )?;
        }
        Ok(())
    }
}

impl Rows for PgRows<'_> {
    fn keyed_result(&mut self, scope: &str, key: &str) -> RowResult<Option<(String, String)>> {
        self.send_collected()?;
        Ok(self.client.query_opt(&self.statements.keyed_result, &[&scope, &key])?.map(|r| (r.get(0), r.get(1))))
    }

    fn insert_keyed_result(&mut self, scope: &str, key: &str, request: &str, result: &str) -> RowResult<()> {
        self.send_collected()?;
        self.client.execute(&self.statements.insert_keyed_result, &[&scope, &key, &request, &result])?;
        Ok(())
    }

    fn packet_by_key(&mut self, sender: UserId, key: &str) -> RowResult<Option<(ExistingPacket, String)>> {
        // A packet of this batch with the same key is among the collected rows.
        let p = &self.collected.packets;
        if let Some(i) = (0..p.id.len()).find(|&i| p.sender[i] == as_i64(sender) && p.key[i] == key) {
            // Only the shard's own retry repeats a key in one batch; the
            // row is not in the database yet, so answer from what is collected.
            let existing = ExistingPacket {
                id: p.id[i] as u64,
                total_fen: p.total[i],
                count: p.count[i] as u32,
                expires_ms: p.expires_ms[i] as u64,
            };
            return Ok(Some((existing, p.kind[i].to_owned())));
        }
        Ok(self.client.query_opt(&self.statements.packet_by_key, &[&as_i64(sender), &key])?.map(|r| {
            let existing = ExistingPacket {
                id: r.get::<_, i64>(0) as u64,
                total_fen: r.get(1),
                count: r.get::<_, i32>(2) as u32,
                expires_ms: r.get::<_, i64>(3) as u64,
            };
            (existing, r.get(4))
        }))
    }

    fn insert_packet(&mut self, packet: &NewPacket, key: &str) -> RowResult<()> {
        let (target, group) = target_of(&packet.recipients);
        let p = &mut self.collected.packets;
        p.day.push(day_of(packet.id));
        p.id.push(as_i64(packet.id));
        p.sender.push(as_i64(packet.sender));
        p.kind.push(packet.kind.as_str());
        p.total.push(packet.total_fen);
        p.count.push(i32::try_from(packet.count).expect("a packet's share count fits in i32"));
        p.target.push(target);
        p.group.push(group);
        p.recipients.push(encode_users(packet.recipients.list()));
        p.greeting.push(packet.greeting.clone());
        p.created_ms.push(as_i64(packet.created_ms));
        p.expires_ms.push(as_i64(packet.expires_ms));
        p.key.push(key.to_owned());
        self.prefetched.open_remaining.insert(packet.id, Some(packet.total_fen));
        Ok(())
    }

    fn open_remaining(&mut self, packet: PacketId) -> RowResult<Option<i64>> {
        if let Some(remaining) = self.prefetched.open_remaining.get(&packet) {
            return Ok(*remaining);
        }
        self.send_collected()?;
        let found = self.client.query_opt(&self.statements.open_remaining, &[&as_i64(packet), &day_of(packet)])?;
        Ok(found.map(|r| r.get(0)))
    }

    fn insert_claim(&mut self, open: &OpenShare) -> RowResult<()> {
        let c = &mut self.collected.claims;
        c.day.push(day_of(open.packet));
        c.packet.push(as_i64(open.packet));
        c.user.push(as_i64(open.user));
        c.seq.push(i32::try_from(open.seq).expect("a packet's open order fits in i32"));
        c.amount.push(open.amount_fen);
        c.at_ms.push(as_i64(open.at_ms));
        Ok(())
    }

    fn claim_amount(&mut self, packet: PacketId, user: UserId) -> RowResult<Option<i64>> {
        self.send_collected()?;
        let found =
            self.client.query_opt(&self.statements.claim_amount, &[&as_i64(packet), &day_of(packet), &as_i64(user)])?;
        Ok(found.map(|r| r.get(0)))
    }

    fn write_opens(&mut self, packet: PacketId, taken_fen: i64, finished: Option<UserId>) -> RowResult<()> {
        let o = &mut self.collected.opens;
        if o.packet.contains(&as_i64(packet)) {
            // One row per packet per statement: send the earlier update first.
            self.send_collected()?;
        }
        let o = &mut self.collected.opens;
        o.day.push(day_of(packet));
        o.packet.push(as_i64(packet));
        o.taken.push(taken_fen);
        o.status.push(if finished.is_some() { "finished" } else { "open" });
        o.best_luck.push(finished.map(as_i64));
        let remaining = self.prefetched.open_remaining.get_mut(&packet);
        match (remaining, finished) {
            (Some(left), None) => *left = left.map(|l| l - taken_fen),
            (Some(left), Some(_)) => *left = None,
            (None, _) => {}
        }
        Ok(())
    }

    fn refund_packet(&mut self, packet: PacketId, amount_fen: i64) -> RowResult<bool> {
        self.send_collected()?;
        let changed =
            self.client.execute(&self.statements.refund_packet, &[&as_i64(packet), &day_of(packet), &amount_fen])?;
        if changed == 1 {
            self.prefetched.open_remaining.insert(packet, None);
        }
        Ok(changed == 1)
    }

    fn raise_id_mark(&mut self, shard: u16, mark: u64) -> RowResult<()> {
        self.send_collected()?;
        self.client.execute(&self.statements.raise_id_mark, &[&i32::from(shard), &as_i64(mark)])?;
        Ok(())
    }

    fn campaign_by_key(&mut self, key: &str) -> RowResult<Option<KeyedCampaign>> {
        self.send_collected()?;
        Ok(self.client.query_opt(&self.statements.campaign_by_key, &[&key])?.map(|r| KeyedCampaign {
            id: r.get::<_, i64>(0) as u64,
            funder: r.get::<_, i64>(1) as u64,
            total_fen: r.get(2),
            rule: r.get(3),
        }))
    }

    fn insert_campaign(
        &mut self,
        id: CampaignId,
        spec: &CampaignSpec,
        rule: &str,
        at_ms: u64,
        key: &str,
    ) -> RowResult<()> {
        self.send_collected()?;
        self.client.execute(
            &self.statements.insert_campaign,
            &[
                &as_i64(id),
                &as_i64(spec.funder),
                &spec.total_fen,
                &rule,
                &i64::from(spec.rate_per_s),
                &spec.win_cap_per_user.map(i64::from),
                &as_i64(at_ms),
                &key,
            ],
        )?;
        Ok(())
    }

    fn start_campaign(&mut self, id: CampaignId) -> RowResult<bool> {
        self.send_collected()?;
        Ok(self.client.execute(&self.statements.start_campaign, &[&as_i64(id)])? == 1)
    }

    fn campaign_state(&mut self, id: CampaignId) -> RowResult<Option<(UserId, String)>> {
        self.send_collected()?;
        Ok(self
            .client
            .query_opt(&self.statements.campaign_state, &[&as_i64(id)])?
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1))))
    }

    fn set_campaign_status(&mut self, id: CampaignId, status: &str) -> RowResult<()> {
        self.send_collected()?;
        self.client.execute(&self.statements.set_campaign_status, &[&as_i64(id), &status])?;
        Ok(())
    }

    fn shake_win_by_key(&mut self, user: UserId, key: &str) -> RowResult<Option<FirstWin>> {
        if let Some(first) = self.prefetched.win_by_key.get(&(user, key.to_owned())) {
            return Ok(*first);
        }
        self.send_collected()?;
        Ok(self.client.query_opt(&self.statements.win_by_key, &[&as_i64(user), &key])?.map(|r| FirstWin {
            campaign: r.get::<_, i64>(0) as u64,
            packet: r.get::<_, i64>(1) as u64,
            amount_fen: r.get(2),
        }))
    }

    fn packet_won(&mut self, packet: PacketId) -> RowResult<bool> {
        if let Some(won) = self.prefetched.packet_won.get(&packet) {
            return Ok(*won);
        }
        self.send_collected()?;
        Ok(self.client.query_opt(&self.statements.packet_won, &[&as_i64(packet), &day_of(packet)])?.is_some())
    }

    fn insert_shake_win(&mut self, win: &ShakeWin) -> RowResult<()> {
        let w = &mut self.collected.wins;
        w.day.push(day_of(win.packet));
        w.packet.push(as_i64(win.packet));
        w.campaign.push(as_i64(win.campaign));
        w.user.push(as_i64(win.user));
        w.amount.push(win.amount_fen);
        w.at_ms.push(as_i64(win.at_ms));
        w.key.push(win.key.clone());
        self.prefetched.packet_won.insert(win.packet, true);
        if let Some(key) = &win.key {
            let first = FirstWin { campaign: win.campaign, packet: win.packet, amount_fen: win.amount_fen };
            self.prefetched.win_by_key.insert((win.user, key.clone()), Some(first));
        }
        Ok(())
    }

    fn insert_message(
        &mut self,
        user: UserId,
        body: &[u8],
        at_ms: u64,
        kind: MessageKind,
        sender: UserId,
    ) -> RowResult<u64> {
        if self.message_ids.next >= self.message_ids.end {
            let block: i64 = self.client.query_one(&self.statements.message_id_block, &[])?.get(0);
            let start = u64::try_from(block).expect("sequence values are positive") * MESSAGE_ID_BLOCK;
            *self.message_ids = MessageIds { next: start, end: start + MESSAGE_ID_BLOCK };
        }
        let id = self.message_ids.next;
        self.message_ids.next += 1;
        let m = &mut self.collected.messages;
        m.id.push(as_i64(id));
        m.user.push(as_i64(user));
        m.body.push(body.to_vec());
        m.created_ms.push(as_i64(at_ms));
        m.kind.push(kind.as_str());
        m.sender.push(as_i64(sender));
        *self.stored_messages.entry((user, kind)).or_insert(0) += 1;
        Ok(id)
    }

    /// Counts the batch's messages into `message_counts` in one statement;
    /// only the users that end up over a cap have their oldest cut (rare:
    /// an offline user with a full box), and their counts follow the cut.
    fn prune_messages(
        &mut self,
        owners: &BTreeSet<(UserId, MessageKind)>,
        kept: impl Fn(MessageKind) -> usize,
    ) -> RowResult<Vec<(MessageKind, UserId)>> {
        self.send_collected()?;
        self.count_stored()?;
        let over: Vec<(UserId, MessageKind)> = owners
            .iter()
            .filter(|owner| self.counted.get(owner).is_some_and(|n| *n as usize > kept(owner.1)))
            .copied()
            .collect();
        if over.is_empty() {
            return Ok(Vec::new());
        }
        let users: Vec<i64> = over.iter().map(|(u, _)| as_i64(*u)).collect();
        let kinds: Vec<&str> = over.iter().map(|(_, k)| k.as_str()).collect();
        let caps: Vec<i64> = over.iter().map(|(_, k)| kept(*k) as i64).collect();
        let cut = self.client.query(&self.statements.prune_messages, &[&users, &kinds, &caps])?;
        let mut gone: HashMap<(UserId, MessageKind), i32> = HashMap::new();
        let mut dropped = Vec::with_capacity(cut.len());
        for r in &cut {
            let kind = MessageKind::parse(r.get(1));
            *gone.entry((r.get::<_, i64>(0) as u64, kind)).or_insert(0) += 1;
            dropped.push((kind, r.get::<_, i64>(2) as u64));
        }
        let users: Vec<i64> = gone.keys().map(|(u, _)| as_i64(*u)).collect();
        let kinds: Vec<&str> = gone.keys().map(|(_, k)| k.as_str()).collect();
        let counts: Vec<i32> = gone.values().copied().collect();
        self.client.execute(&self.statements.uncount_messages, &[&users, &kinds, &counts])?;
        for (owner, n) in gone {
            *self.counted.entry(owner).or_insert(n) -= n;
        }
        Ok(dropped)
    }

    fn delete_message(&mut self, id: u64, user: UserId) -> RowResult<Option<(MessageKind, UserId)>> {
        self.send_collected()?;
        // A message of this very batch is counted before its delete uncounts it.
        self.count_stored()?;
        let deleted = self
            .client
            .query_opt(&self.statements.delete_message, &[&as_i64(id), &as_i64(user)])?
            .map(|r| (MessageKind::parse(r.get(0)), r.get::<_, i64>(1) as u64));
        if let Some((kind, _)) = deleted {
            if let Some(n) = self.counted.get_mut(&(user, kind)) {
                *n -= 1;
            }
        }
        Ok(deleted)
    }

    fn group_members(&mut self, group: GroupId) -> RowResult<Vec<UserId>> {
        self.send_collected()?;
        Ok(self
            .client
            .query(&self.statements.group_members, &[&as_i64(group)])?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }

    fn replace_group(&mut self, group: GroupId, members: &BTreeSet<UserId>) -> RowResult<()> {
        self.send_collected()?;
        self.client.execute(&self.statements.delete_group, &[&as_i64(group)])?;
        let members: Vec<i64> = members.iter().map(|u| as_i64(*u)).collect();
        self.client.execute(&self.statements.insert_group, &[&as_i64(group), &members])?;
        Ok(())
    }

    fn insert_cross_out(&mut self, r: &CrossOut<'_>) -> RowResult<()> {
        let o = &mut self.collected.cross_outs;
        o.kind.push(r.kind.as_str());
        o.to.push(i16::from(r.to));
        o.packet.push(as_i64(r.packet));
        o.user.push(as_i64(r.user));
        o.amount.push(r.amount_fen);
        o.body.push(r.body.map(<[u8]>::to_vec));
        o.created_ms.push(as_i64(r.created_ms));
        Ok(())
    }

    fn cross_in_amount(
        &mut self,
        from: SetId,
        kind: CrossKind,
        packet: PacketId,
        user: UserId,
    ) -> RowResult<Option<i64>> {
        if let Some(applied) = self.prefetched.cross_in.get(&(from, kind, packet, user)) {
            return Ok(*applied);
        }
        self.send_collected()?;
        let found = self.client.query_opt(
            &self.statements.cross_in_amount,
            &[&as_i64(packet), &as_i64(user), &kind.as_str(), &i16::from(from)],
        )?;
        Ok(found.map(|r| r.get(0)))
    }

    fn insert_cross_in(&mut self, r: &CrossIn) -> RowResult<()> {
        let i = &mut self.collected.cross_ins;
        i.from.push(i16::from(r.from));
        i.kind.push(r.kind.as_str());
        i.packet.push(as_i64(r.packet));
        i.user.push(as_i64(r.user));
        i.amount.push(r.amount_fen);
        i.created_ms.push(as_i64(r.created_ms));
        i.applied_ms.push(as_i64(r.applied_ms));
        self.prefetched.cross_in.insert((r.from, r.kind, r.packet, r.user), Some(r.amount_fen));
        Ok(())
    }

    fn mark_cross_published(&mut self, keys: &[(CrossKind, PacketId, UserId)]) -> RowResult<u64> {
        // Rows of this very batch are inserted before they are marked.
        self.send_collected()?;
        let kinds: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let packets: Vec<i64> = keys.iter().map(|k| as_i64(k.1)).collect();
        let users: Vec<i64> = keys.iter().map(|k| as_i64(k.2)).collect();
        Ok(self.client.execute(&self.statements.mark_cross_published, &[&kinds, &packets, &users])?)
    }

    fn insert_entry(&mut self, t: &Transfer, meta: EntryMeta) -> RowResult<()> {
        let e = &mut self.collected.entries;
        e.from.push(t.from.id());
        e.to.push(t.to.id());
        e.amount.push(t.amount_fen);
        e.kind.push(meta.kind.as_str());
        e.reference.push(as_i64(meta.reference));
        e.user.push(meta.user.map(as_i64));
        e.at_ms.push(as_i64(meta.at_ms));
        Ok(())
    }

    fn write_balances(&mut self, balances: &[(Account, i64)]) -> RowResult<()> {
        if balances.is_empty() {
            return Ok(());
        }
        self.send_collected()?;
        let ids: Vec<i64> = balances.iter().map(|(a, _)| a.id()).collect();
        let values: Vec<i64> = balances.iter().map(|(_, b)| *b).collect();
        self.client.execute(&self.statements.write_balances, &[&ids, &values])?;
        Ok(())
    }
}
