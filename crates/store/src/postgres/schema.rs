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
const MIGRATIONS: &[(i64, &str)] = &[
    (
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

-- A packet's rows live in the partition of its day and its id's hash
-- (WeChat's db_xx.t_y_dd): `day` is days since 2020-01-01, which the id
-- itself carries (core::ids: bits 26..40), so a lookup by id names its
-- partition. `hongbao_ensure_day` creates a day's partitions; `hongbao
-- archive` moves settled days to the `*_archive` tables.
CREATE TABLE packets (
    day         integer NOT NULL,
    id          bigint  NOT NULL,
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
    PRIMARY KEY (id, day),
    CHECK (day = (id & 1099511627775) >> 26)
) PARTITION BY RANGE (day);
CREATE INDEX packets_open ON packets (id) WHERE status = 'open';
-- One row per open; the primary key is the at-most-one-open-per-user rule
-- (`day` is the packet's: a function of `packet`).
CREATE TABLE claims (
    day     integer NOT NULL,
    packet  bigint  NOT NULL,
    user_id bigint  NOT NULL,
    seq     integer NOT NULL,  -- open order within the packet, from 0
    amount  bigint  NOT NULL CHECK (amount > 0),
    at_ms   bigint  NOT NULL,
    PRIMARY KEY (packet, user_id, day),
    UNIQUE (packet, seq, day),
    CHECK (day = (packet & 1099511627775) >> 26)
) PARTITION BY RANGE (day);
-- A campaign packet is won once: the primary key.
CREATE TABLE shake_wins (
    day      integer NOT NULL,
    packet   bigint  NOT NULL,
    campaign bigint  NOT NULL,
    user_id  bigint  NOT NULL,
    amount   bigint  NOT NULL CHECK (amount > 0),
    at_ms    bigint  NOT NULL,
    idem_key text,
    PRIMARY KEY (packet, day),
    CHECK (day = (packet & 1099511627775) >> 26)
) PARTITION BY RANGE (day);
CREATE INDEX shake_wins_by_campaign ON shake_wins (campaign, user_id);
-- Idempotency keys cannot be unique in a table split by day (a unique
-- index of a partitioned table must hold the partition key): one send per
-- (sender, key) and one win per (user, key) are these tables' primary keys.
CREATE TABLE packet_keys (
    sender     bigint  NOT NULL,
    idem_key   text    NOT NULL,
    packet     bigint  NOT NULL,
    day        integer NOT NULL,
    kind       text    NOT NULL,
    total      bigint  NOT NULL,
    count      integer NOT NULL,
    expires_ms bigint  NOT NULL,
    PRIMARY KEY (sender, idem_key)
);
CREATE INDEX packet_keys_by_day ON packet_keys (day);
CREATE TABLE shake_keys (
    user_id  bigint  NOT NULL,
    idem_key text    NOT NULL,
    campaign bigint  NOT NULL,
    packet   bigint  NOT NULL,
    day      integer NOT NULL,
    amount   bigint  NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);
CREATE INDEX shake_keys_by_day ON shake_keys (day);
-- Settled days, moved out of the hot tables by `hongbao archive`: same
-- rows, same rules, and still read by lookups and the audit (`all_*`).
CREATE TABLE packets_archive (LIKE packets INCLUDING ALL) PARTITION BY RANGE (day);
CREATE TABLE claims_archive (LIKE claims INCLUDING ALL) PARTITION BY RANGE (day);
CREATE TABLE shake_wins_archive (LIKE shake_wins INCLUDING ALL) PARTITION BY RANGE (day);
CREATE TABLE packet_keys_archive (LIKE packet_keys INCLUDING ALL);
CREATE TABLE shake_keys_archive (LIKE shake_keys INCLUDING ALL);
CREATE VIEW all_packets AS SELECT * FROM packets UNION ALL SELECT * FROM packets_archive;
CREATE VIEW all_claims AS SELECT * FROM claims UNION ALL SELECT * FROM claims_archive;
CREATE VIEW all_shake_wins AS SELECT * FROM shake_wins UNION ALL SELECT * FROM shake_wins_archive;
CREATE VIEW all_packet_keys AS SELECT * FROM packet_keys UNION ALL SELECT * FROM packet_keys_archive;
CREATE VIEW all_shake_keys AS SELECT * FROM shake_keys UNION ALL SELECT * FROM shake_keys_archive;

-- Creates day `d`'s partitions of packets, claims and shake wins (each
-- split by the hash of the packet id into 4), unless they exist (also when
-- archived: an archived day is never made again). Names carry the date:
-- packets_d20261129_h0 … h3. A day is built on its own and then attached,
-- which takes only a SHARE UPDATE EXCLUSIVE lock on the hot table: reads
-- and writes of the other days go on meanwhile. Its bound is a constraint
-- of its own, so attaching it (here, or to an archive table later) scans
-- nothing.
CREATE FUNCTION hongbao_ensure_day(d integer) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    suffix text := to_char(DATE '2020-01-01' + d, 'YYYYMMDD');
    t text;
    key text;
    day_table text;
BEGIN
    FOREACH t IN ARRAY ARRAY['packets', 'claims', 'shake_wins'] LOOP
        day_table := t || '_d' || suffix;
        CONTINUE WHEN to_regclass(day_table) IS NOT NULL;
        key := CASE t WHEN 'packets' THEN 'id' ELSE 'packet' END;
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING ALL) PARTITION BY HASH (%I)', day_table, t, key);
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (day >= %s AND day < %s)',
                       day_table, day_table || '_bound', d, d + 1);
        FOR h IN 0..3 LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES WITH (MODULUS 4, REMAINDER %s)',
                           day_table || '_h' || h, day_table, h);
        END LOOP;
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', t, day_table, d, d + 1);
    END LOOP;
END
$fn$;

-- Persistent push messages not yet acknowledged, split by the user's hash:
-- every read is one user's. `kind` is 'user' (another user's notice,
-- capped per recipient and per sender) or 'system'.
CREATE TABLE messages (
    id         bigint NOT NULL,
    user_id    bigint NOT NULL,
    body       bytea  NOT NULL,
    created_ms bigint NOT NULL,
    kind       text   NOT NULL,
    sender     bigint NOT NULL,
    PRIMARY KEY (user_id, id)
) PARTITION BY HASH (user_id);
CREATE TABLE messages_h0 PARTITION OF messages FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE messages_h1 PARTITION OF messages FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE messages_h2 PARTITION OF messages FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE messages_h3 PARTITION OF messages FOR VALUES WITH (MODULUS 4, REMAINDER 3);
CREATE INDEX messages_by_user_kind ON messages (user_id, kind, id);
CREATE INDEX messages_by_sender ON messages (sender) WHERE kind = 'user';
-- How many messages of each kind each user holds, kept with every insert and
-- delete: the per-user caps are checked against these (a cut reads a user's
-- messages only once the user is over a cap).
CREATE TABLE message_counts (
    user_id bigint  NOT NULL,
    kind    text    NOT NULL,
    n       integer NOT NULL CHECK (n >= 0),
    PRIMARY KEY (user_id, kind)
);
-- Each value is a block of `MESSAGE_ID_BLOCK` message ids for the writer.
CREATE SEQUENCE message_id_blocks;

-- Results of keyed deposits, withdrawals: a retry returns the first result.
CREATE TABLE idempotency (
    scope   text NOT NULL,
    key     text NOT NULL,
    request text NOT NULL,
    result  text NOT NULL,
    PRIMARY KEY (scope, key)
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
-- The writer's last committed batch, read back when a commit's outcome was unknown.
INSERT INTO meta (key, value) VALUES ('last_batch', '');
"#,
    ),
    (
        2,
        r#"
-- The cross-SET outbox and inbox (`core::cross`). `cross_out`: what this
-- SET wrote for another, in the commit that decided it (a share paid into
-- the other SET's transit account, a notice), one per (kind, packet, user);
-- `id` is the order they were written in, and the unpublished ones are
-- found through a partial index, never a scan. `cross_in`: what another SET
-- wrote and this one applied, once per key, with when it was written and
-- applied (the lag). Neither is split: a row per open of a foreign user,
-- read whole only by the audit.
CREATE TABLE cross_out (
    id         bigint   GENERATED ALWAYS AS IDENTITY,
    kind       text     NOT NULL,  -- 'credit' or 'notice'
    to_set     smallint NOT NULL,
    packet     bigint   NOT NULL,
    user_id    bigint   NOT NULL,
    amount     bigint   NOT NULL CHECK (amount >= 0),  -- a credit's; 0 for a notice
    body       bytea,                                  -- a notice's stored push
    created_ms bigint   NOT NULL,
    published  boolean  NOT NULL DEFAULT false,
    PRIMARY KEY (packet, user_id, kind)
);
CREATE INDEX cross_out_unpublished ON cross_out (id) WHERE NOT published;
CREATE TABLE cross_in (
    from_set   smallint NOT NULL,
    kind       text     NOT NULL,
    packet     bigint   NOT NULL,
    user_id    bigint   NOT NULL,
    amount     bigint   NOT NULL CHECK (amount >= 0),
    created_ms bigint   NOT NULL,
    applied_ms bigint   NOT NULL,
    PRIMARY KEY (packet, user_id, kind, from_set)
);
"#,
    ),
];

/// The version the migrations bring a database to.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Brings the database to `SCHEMA_VERSION`. The caller holds the writer's
/// advisory lock, so two servers never migrate at once.
pub(crate) fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let has_meta: bool = client.query_one("SELECT to_regclass('meta') IS NOT NULL", &[])?.get(0);
    let mut version: i64 = if has_meta {
        let stored: Option<String> =
            client.query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])?.map(|r| r.get(0));
        let stored = stored.ok_or_else(|| StoreError::Corrupt("table meta has no schema_version".into()))?;
        stored.parse().map_err(|_| StoreError::Corrupt(format!("schema version {stored:?}")))?
    } else {
        0
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!("schema version {version}, this build knows up to {SCHEMA_VERSION}")));
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
    let max_campaign: Option<i64> = client.query_one("SELECT max(id % 281474976710656) FROM campaigns", &[])?.get(0);
    let pending = client
        .query("SELECT sender, count(*) FROM messages WHERE kind = 'user' GROUP BY sender", &[])?
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u32))
        .collect();
    let backlog: i64 = client.query_one("SELECT count(*) FROM cross_out WHERE NOT published", &[])?.get(0);
    crate::apply::WriterMemory::from_stored(balances, max_campaign, pending, backlog as u64)
}
