//! The PostgreSQL schema: numbered migrations, embedded in the binary and
//! applied at start-up, each in its own transaction (PostgreSQL's DDL is
//! transactional, so a migration is applied whole or not at all).
//!
//! The tables carry the same rows and the same uniqueness rules as SQLite's
//! (`sqlite/schema.rs`); the user column is `user_id` (`user` is reserved
//! here). Message ids are handed out by the writer in blocks of a sequence
//! (`message_id_blocks`), so a batch's messages are written in one statement
//! and their ids are known before it runs.

use postgres::Client;

use crate::StoreError;

/// Each migration: the version it brings the database to, and its SQL.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    r#"
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
-- Stored balances; audit re-derives each from `entries`.
CREATE TABLE accounts (
    id      bigint PRIMARY KEY,  -- core::ledger::Account::id (kind << 56 | owner)
    balance bigint NOT NULL
);
-- The double-entry journal: each row moves `amount` from one account to another.
CREATE TABLE entries (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    from_account bigint NOT NULL,
    to_account   bigint NOT NULL,
    amount       bigint NOT NULL CHECK (amount > 0),
    kind         text   NOT NULL,
    reference    bigint NOT NULL,  -- packet or campaign id (0 for deposits)
    user_id      bigint,           -- the user credited by an open or a win
    at_ms        bigint NOT NULL
);
CREATE INDEX entries_by_reference ON entries (kind, reference);
CREATE TABLE packets (
    id          bigint  PRIMARY KEY,
    sender      bigint  NOT NULL,
    kind        text    NOT NULL,
    total       bigint  NOT NULL CHECK (total > 0),
    count       integer NOT NULL CHECK (count > 0),
    target      text    NOT NULL,  -- 'group', 'users' or 'user'
    grp         bigint,
    recipients  bytea   NOT NULL,  -- sorted little-endian u64 user ids
    greeting    text    NOT NULL,
    created_ms  bigint  NOT NULL,
    expires_ms  bigint  NOT NULL,
    remaining   bigint  NOT NULL CHECK (remaining >= 0),
    refunded    bigint  NOT NULL DEFAULT 0,
    status      text    NOT NULL,
    best_luck   bigint,
    idem_key    text    NOT NULL,
    UNIQUE (sender, idem_key)
);
CREATE INDEX packets_open ON packets (id) WHERE status = 'open';
-- One row per open; the primary key is the at-most-one-open-per-user rule.
CREATE TABLE claims (
    packet  bigint  NOT NULL,
    user_id bigint  NOT NULL,
    seq     integer NOT NULL,  -- open order within the packet, from 0
    amount  bigint  NOT NULL CHECK (amount > 0),
    at_ms   bigint  NOT NULL,
    PRIMARY KEY (packet, user_id),
    UNIQUE (packet, seq)
);
CREATE TABLE campaigns (
    id          bigint PRIMARY KEY,
    funder      bigint NOT NULL,
    total       bigint NOT NULL CHECK (total > 0),
    rule        text   NOT NULL,  -- JSON of core::campaign::AmountRule
    rate_per_s  bigint NOT NULL,
    win_cap     bigint,
    status      text   NOT NULL,
    created_ms  bigint NOT NULL,
    idem_key    text   NOT NULL UNIQUE
);
CREATE TABLE shake_wins (
    packet   bigint PRIMARY KEY,
    campaign bigint NOT NULL,
    user_id  bigint NOT NULL,
    amount   bigint NOT NULL CHECK (amount > 0),
    at_ms    bigint NOT NULL,
    idem_key text
);
CREATE INDEX shake_wins_by_campaign ON shake_wins (campaign, user_id);
CREATE UNIQUE INDEX shake_wins_by_key ON shake_wins (user_id, idem_key) WHERE idem_key IS NOT NULL;
-- Results of keyed deposits, withdrawals: a retry returns the first result.
CREATE TABLE idempotency (
    scope   text NOT NULL,
    key     text NOT NULL,
    request text NOT NULL,
    result  text NOT NULL,
    PRIMARY KEY (scope, key)
);
-- Per-shard packet-id high-water marks, persisted before ids below them are used.
CREATE TABLE id_marks (
    shard integer PRIMARY KEY,
    mark  bigint  NOT NULL
);
CREATE TABLE group_members (
    grp     bigint NOT NULL,
    user_id bigint NOT NULL,
    PRIMARY KEY (grp, user_id)
);
-- Persistent push messages not yet acknowledged. `kind` is 'user' (another
-- user's notice, capped per recipient and per sender) or 'system'.
CREATE TABLE messages (
    id         bigint PRIMARY KEY,
    user_id    bigint NOT NULL,
    body       bytea  NOT NULL,
    created_ms bigint NOT NULL,
    kind       text   NOT NULL,
    sender     bigint NOT NULL
);
CREATE INDEX messages_by_user_kind ON messages (user_id, kind, id);
-- Each value is a block of `MESSAGE_ID_BLOCK` message ids for the writer.
CREATE SEQUENCE message_id_blocks;
-- The writer's last committed batch, read back when a commit's outcome was unknown.
INSERT INTO meta (key, value) VALUES ('last_batch', '');
"#,
)];

/// The version the migrations bring a database to.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Brings the database to `SCHEMA_VERSION`. The caller holds the writer's
/// advisory lock, so two servers never migrate at once.
pub(crate) fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let has_meta: bool = client
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])?
        .get(0);
    let mut version: i64 = if has_meta {
        let stored: Option<String> = client
            .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])?
            .map(|r| r.get(0));
        let stored = stored.ok_or_else(|| StoreError::Corrupt("table meta has no schema_version".into()))?;
        stored.parse().map_err(|_| StoreError::Corrupt(format!("schema version {stored:?}")))?
    } else {
        0
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "schema version {version}, this build knows up to {SCHEMA_VERSION}"
        )));
    }
    let from = version;
    for &(to, sql) in MIGRATIONS.iter().filter(|(to, _)| *to > from) {
        let mut tx = client.transaction()?;
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&to.to_string()],
        )?;
        tx.commit()?;
        tracing::info!(from = version, to, "database schema migrated");
        version = to;
    }
    Ok(())
}

/// What the writer starts from, read from the committed rows.
pub(crate) fn load_writer_memory(client: &mut Client) -> Result<crate::apply::WriterMemory, StoreError> {
    let balances = client
        .query("SELECT id, balance FROM accounts", &[])?
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
        .collect();
    let max_campaign: Option<i64> = client.query_one("SELECT max(id) FROM campaigns", &[])?.get(0);
    let pending = client
        .query("SELECT sender, count(*) FROM messages WHERE kind = 'user' GROUP BY sender", &[])?
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u32))
        .collect();
    crate::apply::WriterMemory::from_stored(balances, max_campaign, pending)
}
