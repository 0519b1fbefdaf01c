//! The PostgreSQL store: the same writer contract as SQLite's on a database
//! server, for events where the money must outlive a disk or a host.
//!
//! One connection for the writer (it holds a session advisory lock, so two
//! servers never write one database), a few for reads, through tokio-postgres
//! behind its blocking client (`postgres`): the writer and the readers are
//! threads of their own already, so a blocking call there costs nothing.
//!
//! A batch is one transaction: its reads are mostly answered by a few bulk
//! queries made up front (`rows::PgRows::prefetch`), its writes collected
//! and sent as one multi-row `INSERT … SELECT FROM unnest(…)` per table. The
//! server commits with `synchronous_commit = on` (asked for on every
//! connection, whatever the server's default), so COMMIT returns only once
//! the commit record is flushed — and, with a synchronous standby, received
//! by it.
//!
//! When COMMIT's answer is lost (the connection broke), the outcome is
//! unknown: every batch writes its own tag into `meta.last_batch`, and
//! recovery reads it back on a new connection before anything of the batch
//! is answered.

pub(crate) mod archive;
pub(crate) mod audit;
pub(crate) mod reader;
mod rows;
pub(crate) mod schema;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hongbao_core::ledger::Account;
use postgres::{Client, NoTls};

use crate::apply::{BatchTx, WriterMemory};
use crate::ops::Command;
use crate::writer::{Backend, CommitError, Recovered};
use crate::StoreError;

/// The advisory lock the writer's session holds: "hongbao" in ASCII.
const WRITER_LOCK: i64 = 0x0068_6f6e_6762_616f;
/// Days of partitions kept ready beyond today (and one before, for a clock
/// a little behind the database's).
const PARTITION_DAYS_AHEAD: u32 = 3;
/// How long a starting server waits for the writer's lock: the session of
/// a server that was just killed lasts until its database backend notices
/// the closed connection, which on a live network is a moment.
const START_LOCK_WAIT: Duration = Duration::from_secs(3);
/// How long the idle writer's check of its connection may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection attempt may take before the store counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that stops answering is noticed by TCP within about this, so a
/// half-open connection fails the batch instead of hanging the writer.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// A PostgreSQL database to connect to, from a `postgres://` URL. Several
/// hosts and `target_session_attrs=read-write` are understood, so after a
/// failover a reconnect finds the new primary.
#[derive(Clone)]
pub struct PgTarget {
    /// Boxed: a `Config` is some 300 bytes, and `StoreLocation` is passed around.
    config: Box<postgres::Config>,
    /// The URL without its password, for logs.
    shown: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PartialEq for PgTarget {
    fn eq(&self, other: &Self) -> bool {
        self.shown == other.shown
    }
}

impl Eq for PgTarget {}

impl std::fmt::Display for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PgTarget {
    pub fn parse(url: &str) -> Result<PgTarget, StoreError> {
        let mut config: postgres::Config =
            url.parse().map_err(|e: postgres::Error| StoreError::Location(hide_password(url), e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        config.keepalives(true);
        if config.get_application_name().is_none() {
            config.application_name("hongbao");
        }
        Ok(PgTarget { config: Box::new(config), shown: hide_password(url) })
    }

    /// A new connection with the settings every connection needs.
    pub(crate) fn connect(&self) -> Result<Client, StoreError> {
        let mut client = self.config.connect(NoTls)?;
        // Durability is not left to the server's defaults: a commit returns
        // once it is flushed (and received by a synchronous standby, if any).
        client.batch_execute("SET synchronous_commit = on")?;
        Ok(client)
    }
}

/// `url` with any password replaced by `***`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_owned() };
            format!("{scheme}://{masked}@{hosts}{tail}")
        }
        None => url.to_owned(),
    }
}

/// The server's own message (and detail) when there is one: the driver's
/// `Display` alone says only "db error".
pub(crate) fn describe_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// True when `e` ended the session (the connection broke, or the server
/// ended it with FATAL or PANIC), as opposed to an error in a statement
/// that left the session usable.
pub(crate) fn session_lost(e: &postgres::Error) -> bool {
    e.as_db_error().is_none_or(|db| db.severity() != "ERROR")
}

/// The writer's store: where it connects, and its session while it has one.
pub(crate) struct PgBackend {
    target: PgTarget,
    /// `None` after a failure until recovery connects again: the old
    /// connection is closed first, so the writer's lock it held is let go.
    session: Option<Session>,
    /// Tags batches uniquely: this writer's start time and a count.
    tag_prefix: String,
    batches: u64,
    /// The tag of a batch whose COMMIT's outcome is unknown.
    unknown: Option<String>,
}

/// One connection of the writer and what is only good on it.
struct Session {
    client: Client,
    statements: rows::Statements,
    message_ids: rows::MessageIds,
    /// Days whose partitions exist (made by `hongbao_ensure_day` on this
    /// connection, or found there).
    days_ready: HashSet<i32>,
    /// The day for which the days ahead were last made ready, and when to
    /// try again if that failed.
    ready_ahead_of: Option<u32>,
    ahead_retry_at: Option<Instant>,
}

/// How often the days ahead are tried again after they could not be made.
const AHEAD_RETRY: Duration = Duration::from_secs(60);
/// How long making a day's partitions may wait for a lock before it gives up
/// (attaching a day takes a lock that only other schema changes hold).
const PARTITION_LOCK_TIMEOUT: &str = "2s";

impl Session {
    /// A writer's connection: the lock taken, the schema current, the
    /// statements prepared, the days around today made ready (as far as
    /// they can be).
    /// `lock_wait`: how long to wait for the writer's lock if another
    /// session holds it.
    fn open(target: &PgTarget, lock_wait: Duration) -> Result<Session, StoreError> {
        let mut client = target.connect()?;
        let give_up = Instant::now() + lock_wait;
        loop {
            let locked: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK])?.get(0);
            if locked {
                break;
            }
            if Instant::now() >= give_up {
                return Err(StoreError::Locked(format!("database {target}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        schema::migrate(&mut client)?;
        let statements = rows::Statements::prepare(&mut client)?;
        let mut session = Session {
            client,
            statements,
            message_ids: rows::MessageIds::default(),
            days_ready: HashSet::new(),
            ready_ahead_of: None,
            ahead_retry_at: None,
        };
        session.ensure_days_ahead();
        Ok(session)
    }

    /// Makes the partitions of yesterday, today and the days ahead, once a
    /// day. Best effort: a batch needs only its own days (`ensure_day`), so
    /// a failure here is logged and tried again a minute later.
    fn ensure_days_ahead(&mut self) {
        let today = hongbao_core::ids::day_of_unix_ms(crate::unix_ms());
        let retry_due = self.ahead_retry_at.is_none_or(|at| Instant::now() >= at);
        if self.ready_ahead_of == Some(today) || !retry_due {
            return;
        }
        let made: Result<(), StoreError> =
            (today.saturating_sub(1)..=today + PARTITION_DAYS_AHEAD).try_for_each(|day| self.ensure_day(day as i32));
        match made {
            Ok(()) => {
                self.ready_ahead_of = Some(today);
                self.ahead_retry_at = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not make the partitions of the days ahead; tried again in a minute");
                self.ahead_retry_at = Some(Instant::now() + AHEAD_RETRY);
            }
        }
    }

    /// Makes sure every day the batch writes packet rows for has its
    /// partitions, before the batch's transaction begins.
    fn ensure_batch_days(&mut self, batch: &[Command]) -> Result<(), StoreError> {
        for command in batch {
            let packet = match command {
                Command::FundPacket(s) => s.op.packet.id,
                Command::OpenShare(s) => s.op.packet,
                Command::ShakeWin(s) => s.op.packet,
                _ => continue,
            };
            self.ensure_day(rows::day_of(packet))?;
        }
        Ok(())
    }

    /// `hongbao_ensure_day` in a transaction of its own, waiting for its
    /// lock at most `PARTITION_LOCK_TIMEOUT`.
    fn ensure_day(&mut self, day: i32) -> Result<(), StoreError> {
        if self.days_ready.contains(&day) {
            return Ok(());
        }
        let made = self.client.batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = '{PARTITION_LOCK_TIMEOUT}'; SELECT hongbao_ensure_day({day}); COMMIT"
        ));
        if let Err(e) = made {
            let _ = self.client.batch_execute("ROLLBACK");
            return Err(e.into());
        }
        self.days_ready.insert(day);
        Ok(())
    }

    /// Everything of the batch up to (not including) COMMIT.
    fn apply(
        &mut self,
        batch: &mut [Command],
        memory: &mut WriterMemory,
        tag: &str,
    ) -> Result<Vec<(Account, i64)>, StoreError> {
        // The tag goes first, in the same round trip as BEGIN (it is made
        // here of hex digits, dashes and digits: nothing to escape).
        debug_assert!(tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        self.client.batch_execute(&format!("BEGIN; UPDATE meta SET value = '{tag}' WHERE key = 'last_batch'"))?;
        let mut rows = rows::PgRows::new(&mut self.client, &self.statements, &mut self.message_ids);
        rows.prefetch(batch)?;
        let mut applying = BatchTx::new(&mut rows, memory);
        for command in batch.iter_mut() {
            applying.apply(command)?;
        }
        let changed = applying.finish()?;
        rows.finish()?;
        Ok(changed)
    }

    /// After a failure: reads back whether the batch tagged `unknown`
    /// committed, reloads the writer's memory and commits a probe.
    fn recover(&mut self, unknown: Option<&str>) -> Result<Recovered, StoreError> {
        let memory = schema::load_writer_memory(&mut self.client)?;
        let unknown_batch_committed = match unknown {
            Some(tag) => {
                let last: Option<String> =
                    self.client.query_opt("SELECT value FROM meta WHERE key = 'last_batch'", &[])?.map(|r| r.get(0));
                Some(last.as_deref() == Some(tag))
            }
            None => None,
        };
        self.client.execute(
            "INSERT INTO meta (key, value) VALUES ('writer_probe_ms', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&crate::unix_ms().to_string()],
        )?;
        Ok(Recovered { memory, unknown_batch_committed })
    }
}

/// Connects, takes the writer's lock, migrates, and loads the writer's
/// memory; also opens the readers.
pub(crate) fn open(
    target: &PgTarget,
    readers: usize,
) -> Result<(PgBackend, WriterMemory, reader::PgReader), StoreError> {
    let mut session = Session::open(target, START_LOCK_WAIT)?;
    let memory = schema::load_writer_memory(&mut session.client)?;
    let backend = PgBackend {
        target: target.clone(),
        session: Some(session),
        tag_prefix: format!("{:x}-{}", crate::unix_ms(), std::process::id()),
        batches: 0,
        unknown: None,
    };
    let reader = reader::PgReader::new(target.clone(), readers)?;
    tracing::info!(store = %target, "PostgreSQL store open");
    Ok((backend, memory, reader))
}

fn not_connected() -> StoreError {
    StoreError::Location("the writer's PostgreSQL session".into(), "not connected".into())
}

impl Backend for PgBackend {
    fn commit(&mut self, batch: &mut [Command], memory: &mut WriterMemory) -> Result<Vec<(Account, i64)>, CommitError> {
        self.batches += 1;
        let tag = format!("{}-{}", self.tag_prefix, self.batches);
        let session = self.session.as_mut().ok_or_else(|| CommitError::Failed(not_connected()))?;
        session.ensure_days_ahead();
        session.ensure_batch_days(batch).map_err(CommitError::Failed)?;
        let changed = match session.apply(batch, memory, &tag) {
            Ok(changed) => changed,
            Err(e) => {
                // Nothing was committed; a broken connection is replaced by recovery.
                let _ = session.client.batch_execute("ROLLBACK");
                return Err(CommitError::Failed(e));
            }
        };
        match session.client.batch_execute("COMMIT") {
            Ok(()) => Ok(changed),
            // The server answered with an error and kept the session: it
            // rolled the transaction back.
            Err(e) if !session_lost(&e) => Err(CommitError::Failed(e.into())),
            // No answer, or the session ended (a server shutting down can
            // end it after committing): the commit may or may not have happened.
            Err(e) => {
                self.unknown = Some(tag);
                Err(CommitError::Unknown(e.into()))
            }
        }
    }

    fn check(&mut self) -> Result<(), StoreError> {
        let session = self.session.as_mut().ok_or_else(not_connected)?;
        Ok(session.client.is_valid(CHECK_TIMEOUT)?)
    }

    /// A session that survived the failure (a statement failed, the session
    /// did not) is kept: it still holds the writer's lock. Any other is
    /// closed (letting go of the lock) and a new one opened. A session that
    /// cannot finish recovery is closed too, so the next try starts afresh.
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let kept =
            self.session.as_mut().is_some_and(|s| !s.client.is_closed() && s.client.batch_execute("ROLLBACK").is_ok());
        if !kept {
            self.session = None;
            // No wait: the writer fails requests fast meanwhile, and tries again.
            self.session = Some(Session::open(&self.target, Duration::ZERO)?);
        }
        let session = self.session.as_mut().expect("opened above");
        match session.recover(self.unknown.as_deref()) {
            Ok(recovered) => {
                self.unknown = None;
                Ok(recovered)
            }
            Err(e) => {
                self.session = None;
                Err(e)
            }
        }
    }
}
