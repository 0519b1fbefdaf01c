//! Storage: the store of record (SQLite embedded by default, or a
//! PostgreSQL server), the group-commit writer, reads of committed state,
//! recovery at start-up, and the audit's data feed.
//!
//! Owns: every line of SQL in the project, both schemas and their
//! migrations, durability (a commit is durable — fsync'd by SQLite, or
//! committed with `synchronous_commit = on` by PostgreSQL — before any
//! completion runs), and the in-memory balances the writer decides payments
//! with. The decision on each operation is written once (`apply.rs`) and
//! reaches a store through `rows::Rows`. Also the cross-SET outbox (what
//! this SET owes other SETs' users, written in the commit that decided it)
//! and inbox (their messages, applied once).
//!
//! Must not: decide packet shares, campaign releases or routing (the shards
//! do), or know about sockets and client messages. Push bodies arrive as
//! opaque bytes. Nor send anything to another SET (the transport does, from
//! the outbox) or know which SET it is (each op says what crosses, and where).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use hongbao_core::audit::{AuditReport, CrossRows};

mod apply;
mod audit;
mod committed;
pub mod ops;
mod postgres;
mod reader;
mod rows;
mod sqlite;
mod writer;

pub use committed::CommittedBalances;
pub use ops::{Op, OpError};
pub use reader::{CampaignRow, MoneyTotals, Reader};
pub use writer::{StorageFailure, Writer, WriterStats};

pub use audit::{audit, audit_dir, audit_with_cross};
pub use postgres::archive::{ArchiveReport, ArchivedDay, KeptDay};
pub use postgres::PgTarget;
pub use sqlite::{prepare_data_dir, DB_FILE, LOCK_FILE};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgresql: {}", postgres::describe_error(.0))]
    Postgres(#[from] ::postgres::Error),
    #[error("data directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("{0} is in use by another hongbao server")]
    Locked(String),
    #[error("no hongbao database in {0}")]
    Missing(PathBuf),
    #[error("store {0:?}: {1}")]
    Location(String, String),
}

/// Where the store of record lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// SQLite in this data directory: the zero-configuration default.
    Sqlite(PathBuf),
    /// A PostgreSQL database, by connection string (`postgres://…`).
    Postgres(PgTarget),
}

impl StoreLocation {
    /// `store` as given by `--store`, `HONGBAO_STORE` or `store =` in the
    /// configuration file: a `postgres://` or `postgresql://` URL; without
    /// one, SQLite in `data`.
    pub fn resolve(store: Option<&str>, data: &Path) -> Result<StoreLocation, StoreError> {
        match store.map(str::trim) {
            None | Some("") => Ok(StoreLocation::Sqlite(data.to_owned())),
            Some(url) => StoreLocation::postgres(url),
        }
    }

    /// A PostgreSQL database by its `postgres://` or `postgresql://` URL.
    pub fn postgres(url: &str) -> Result<StoreLocation, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreLocation::Postgres(PgTarget::parse(url)?))
        } else {
            Err(StoreError::Location(
                url.into(),
                "expected a postgres:// URL (without --store, SQLite in the data directory)".into(),
            ))
        }
    }

    /// For logs and the ready line: the directory, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Sqlite(dir) => dir.display().to_string(),
            StoreLocation::Postgres(target) => target.to_string(),
        }
    }
}

/// An open store: the writer thread, a reader, and the join handle of the
/// writer (it ends when every `Writer` handle is dropped).
pub struct Store {
    pub writer: Writer,
    pub reader: Reader,
    pub writer_thread: std::thread::JoinHandle<()>,
}

/// How the writer groups operations into transactions, for the benchmark
/// that measures group commit against its baseline. Only with the
/// `per-op-baseline` feature, which the measuring tools enable and the
/// server never does: the product always commits in groups.
#[cfg(feature = "per-op-baseline")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitMode {
    /// Everything queued, up to `COMMIT_BATCH_RECORDS_MAX` ops, in one transaction.
    #[default]
    Group,
    /// One operation per transaction and commit. Durability is the same: an
    /// operation's completion runs only after its transaction committed.
    PerOp,
}

impl Store {
    /// Opens or creates `dir/hongbao.db` (SQLite), migrates it, loads
    /// balances and starts the writer (group commit).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_at(&StoreLocation::Sqlite(dir.to_owned()))
    }

    /// Opens the store at `location`: creates or migrates its schema, loads
    /// balances and starts the writer (group commit).
    pub fn open_at(location: &StoreLocation) -> Result<Store, StoreError> {
        Store::open_batched(location, hongbao_core::limits::COMMIT_BATCH_RECORDS_MAX)
    }

    /// `open_at` with a chosen commit mode (benchmark baseline only).
    #[cfg(feature = "per-op-baseline")]
    pub fn open_with(location: &StoreLocation, mode: CommitMode) -> Result<Store, StoreError> {
        match mode {
            CommitMode::Group => Store::open_at(location),
            CommitMode::PerOp => Store::open_batched(location, 1),
        }
    }

    fn open_batched(location: &StoreLocation, batch_ops_max: usize) -> Result<Store, StoreError> {
        let readers = hongbao_core::limits::STORAGE_READS_INFLIGHT_MAX;
        let (backend, memory, reader): (Box<dyn writer::Backend>, _, _) = match location {
            StoreLocation::Sqlite(dir) => {
                let (backend, memory, conns) = sqlite::open(dir, readers)?;
                (Box::new(backend), memory, Reader::sqlite(sqlite::reader::SqliteReader::new(conns)))
            }
            StoreLocation::Postgres(target) => {
                let (backend, memory, reader) = postgres::open(target, readers)?;
                (Box::new(backend), memory, Reader::postgres(reader))
            }
        };
        let (writer, writer_thread) = Writer::start(backend, memory, batch_ops_max);
        Ok(Store { writer, reader, writer_thread })
    }
}

/// `hongbao archive`: moves the settled days before `before` (`YYYY-MM-DD`)
/// out of the hot tables of a PostgreSQL store. SQLite keeps one file and
/// has nothing to move.
pub fn archive(location: &StoreLocation, before: &str) -> Result<ArchiveReport, StoreError> {
    match location {
        StoreLocation::Postgres(target) => postgres::archive::archive(target, before),
        StoreLocation::Sqlite(dir) => Err(StoreError::Location(
            dir.display().to_string(),
            "archiving moves days between PostgreSQL partitions; the SQLite store has none (give --store)".into(),
        )),
    }
}

/// Wall-clock milliseconds, for probes and failure reports.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests;
