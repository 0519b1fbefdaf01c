//! The SQLite schema and its migrations.
//!
//! Money columns are integer fen. Each table says which invariant it carries;
//! `hongbao audit` re-derives everything from `entries`, `claims`, `packets`
//! and `campaigns` and compares.

use rusqlite::Connection;

/// The version `SCHEMA` plus every migration below brings a database to.
pub const SCHEMA_VERSION: i64 = 3;

pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Stored balances; audit re-derives each from `entries`.
CREATE TABLE IF NOT EXISTS accounts (
    id      INTEGER PRIMARY KEY,  -- core::ledger::Account::id (kind << 56 | owner)
    balance INTEGER NOT NULL
);
-- The double-entry journal: each row moves `amount` from one account to another.
CREATE TABLE IF NOT EXISTS entries (
    id           INTEGER PRIMARY KEY,
    from_account INTEGER NOT NULL,
    to_account   INTEGER NOT NULL,
    amount       INTEGER NOT NULL CHECK (amount > 0),
    kind         TEXT    NOT NULL,
    reference    INTEGER NOT NULL,  -- packet or campaign id (0 for deposits)
    user         INTEGER,           -- the user credited by an open or a win
    at_ms        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_reference ON entries (kind, reference);
CREATE TABLE IF NOT EXISTS packets (
    id          INTEGER PRIMARY KEY,
    sender      INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    total       INTEGER NOT NULL CHECK (total > 0),
    count       INTEGER NOT NULL CHECK (count > 0),
    target      TEXT    NOT NULL,  -- 'group', 'users' or 'user'
    grp         INTEGER,
    recipients  BLOB    NOT NULL,  -- sorted little-endian u64 user ids
    greeting    TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    remaining   INTEGER NOT NULL CHECK (remaining >= 0),
    refunded    INTEGER NOT NULL DEFAULT 0,
    status      TEXT    NOT NULL,
    best_luck   INTEGER,
    idem_key    TEXT    NOT NULL,
    UNIQUE (sender, idem_key)
);
CREATE INDEX IF NOT EXISTS packets_open ON packets (status) WHERE status = 'open';
-- One row per open; the primary key is the at-most-one-open-per-user rule.
CREATE TABLE IF NOT EXISTS claims (
    packet INTEGER NOT NULL,
    user   INTEGER NOT NULL,
    seq    INTEGER NOT NULL,  -- open order within the packet, from 0
    amount INTEGER NOT NULL CHECK (amount > 0),
    at_ms  INTEGER NOT NULL,
    PRIMARY KEY (packet, user),
    UNIQUE (packet, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS campaigns (
    id          INTEGER PRIMARY KEY,
    funder      INTEGER NOT NULL,
    total       INTEGER NOT NULL CHECK (total > 0),
    rule        TEXT    NOT NULL,  -- JSON of core::campaign::AmountRule
    rate_per_s  INTEGER NOT NULL,
    win_cap     INTEGER,
    status      TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    idem_key    TEXT    NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS shake_wins (
    packet   INTEGER PRIMARY KEY,
    campaign INTEGER NOT NULL,
    user     INTEGER NOT NULL,
    amount   INTEGER NOT NULL CHECK (amount > 0),
    at_ms    INTEGER NOT NULL,
    idem_key TEXT
);
CREATE INDEX IF NOT EXISTS shake_wins_by_campaign ON shake_wins (campaign, user);
CREATE UNIQUE INDEX IF NOT EXISTS shake_wins_by_key ON shake_wins (user, idem_key) WHERE idem_key IS NOT NULL;
-- Results of keyed deposits, withdrawals: a retry returns the first result.
CREATE TABLE IF NOT EXISTS idempotency (
    scope   TEXT NOT NULL,
    key     TEXT NOT NULL,
    request TEXT NOT NULL,
    result  TEXT NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
-- Per-shard packet-id high-water marks, persisted before ids below them are used.
CREATE TABLE IF NOT EXISTS id_marks (
    shard INTEGER PRIMARY KEY,
    mark  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS group_members (
    grp  INTEGER NOT NULL,
    user INTEGER NOT NULL,
    PRIMARY KEY (grp, user)
) WITHOUT ROWID;
-- Persistent push messages not yet acknowledged.
CREATE TABLE IF NOT EXISTS messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user       INTEGER NOT NULL,
    body       BLOB    NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_user ON messages (user, id);
"#;

/// How long a statement waits for a lock another process holds (the sqlite3
/// shell, a backup) before it fails: a transient lock is waited out, a
/// lasting one fails the batch and the writer retries with backoff.
pub const BUSY_TIMEOUT_MS: u64 = 5_000;

/// Opens a connection with the settings every connection needs: WAL so
/// readers never block the writer, synchronous=FULL so a commit is fsync'd
/// before it returns (DESIGN.md §4.2), and a busy timeout.
pub(crate) fn connect(path: &std::path::Path, read_only: bool) -> rusqlite::Result<Connection> {
    use rusqlite::OpenFlags;
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Numbered changes after version 1 (`SCHEMA`), each applied once, in its
/// own transaction, in order.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        2,
        // A message's kind and sender: user notices (a packet's
        // `packet_received`) are capped per recipient apart from system messages
        // (operator pushes, refunds), so user traffic never evicts those, and
        // each sender has a budget of undelivered notices. Older rows were
        // stored before the split; they count as system messages.
        "ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'system';
         ALTER TABLE messages ADD COLUMN sender INTEGER NOT NULL DEFAULT 0;
         CREATE INDEX IF NOT EXISTS messages_by_user_kind ON messages (user, kind, id);",
    ),
    (
        3,
        // The cross-SET outbox and inbox (`core::cross`). `cross_out`: what
        // this SET wrote for another, in the commit that decided it (a share
        // paid into the other SET's transit account, a notice), one per
        // (kind, packet, user); `id` is the order they were written in, and
        // the unpublished ones are found through a partial index, never a
        // scan. `cross_in`: what another SET wrote and this one applied, once
        // per key, with when it was written and applied (the lag).
        "CREATE TABLE cross_out (
             id         INTEGER PRIMARY KEY,
             kind       TEXT    NOT NULL,  -- 'credit' or 'notice'
             to_set     INTEGER NOT NULL,
             packet     INTEGER NOT NULL,
             user       INTEGER NOT NULL,
             amount     INTEGER NOT NULL CHECK (amount >= 0),  -- a credit's; 0 for a notice
             body       BLOB,                                  -- a notice's stored push
             created_ms INTEGER NOT NULL,
             published  INTEGER NOT NULL DEFAULT 0,
             UNIQUE (kind, packet, user)
         );
         CREATE INDEX cross_out_unpublished ON cross_out (id) WHERE published = 0;
         CREATE TABLE cross_in (
             from_set   INTEGER NOT NULL,
             kind       TEXT    NOT NULL,
             packet     INTEGER NOT NULL,
             user       INTEGER NOT NULL,
             amount     INTEGER NOT NULL CHECK (amount >= 0),
             created_ms INTEGER NOT NULL,
             applied_ms INTEGER NOT NULL,
             PRIMARY KEY (from_set, kind, packet, user)
         ) WITHOUT ROWID;",
    ),
];
const _: () = assert!(MIGRATIONS[MIGRATIONS.len() - 1].0 == SCHEMA_VERSION);

pub(crate) fn migrate(conn: &Connection) -> Result<(), crate::StoreError> {
    conn.execute_batch(SCHEMA)?;
    let version: Option<String> =
        conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).ok();
    let mut version = match version {
        None => {
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')", [])?;
            1
        }
        Some(v) => v.parse::<i64>().map_err(|_| crate::StoreError::Corrupt(format!("schema version {v:?}")))?,
    };
    if version > SCHEMA_VERSION {
        return Err(crate::StoreError::Corrupt(format!(
            "schema version {version}, this build knows up to {SCHEMA_VERSION}"
        )));
    }
    let from = version;
    for &(to, sql) in MIGRATIONS.iter().filter(|(to, _)| *to > from) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'schema_version'", [to.to_string()])?;
        tx.commit()?;
        tracing::info!(from = version, to, "database schema migrated");
        version = to;
    }
    Ok(())
}

/// What the writer starts from: every balance as committed (checked to sum
/// to zero), the id the next campaign gets, undelivered user notices by
/// sender (each sender's budget is checked against these), and the outbox
/// rows not yet published.
pub(crate) fn load_writer_memory(conn: &Connection) -> Result<crate::apply::WriterMemory, crate::StoreError> {
    let mut stmt = conn.prepare("SELECT id, balance FROM accounts")?;
    let balances = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let max_campaign: Option<i64> =
        conn.query_row("SELECT max(id % 281474976710656) FROM campaigns", [], |r| r.get(0))?;
    let mut stmt = conn.prepare("SELECT sender, count(*) FROM messages WHERE kind = 'user' GROUP BY sender")?;
    let pending = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, u32>(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let backlog: i64 = conn.query_row("SELECT count(*) FROM cross_out WHERE published = 0", [], |r| r.get(0))?;
    crate::apply::WriterMemory::from_stored(balances, max_campaign, pending, backlog as u64)
}
