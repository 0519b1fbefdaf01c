//! Storage: the embedded SQLite database, the group-commit writer, reads of
//! committed state, recovery at start-up, and the audit's data feed.
//!
//! Owns: every line of SQL in the project, the schema, durability (WAL,
//! synchronous=FULL: a commit is fsync'd before any completion runs), and the
//! in-memory balances the writer decides payments with.
//!
//! Must not: decide packet shares, campaign releases or routing (the shards
//! do), or know about sockets and client messages. Push bodies arrive as
//! opaque bytes.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use hongbao_core::audit::AuditReport;

mod apply;
mod audit;
mod committed;
pub mod ops;
mod reader;
mod schema;
mod writer;

pub use committed::CommittedBalances;
pub use ops::{Op, OpError};
pub use reader::{CampaignRow, MoneyTotals, Reader};
pub use writer::{StorageFailure, Writer, WriterStats};

pub use audit::audit_dir;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("data directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("data directory {0} is in use by another hongbao server")]
    Locked(PathBuf),
    #[error("no hongbao database in {0}")]
    Missing(PathBuf),
}

/// File name of the database inside a data directory.
pub const DB_FILE: &str = "hongbao.db";
/// Locked by the running server so two servers never share a data directory.
pub const LOCK_FILE: &str = "hongbao.lock";

/// An open data directory: the writer thread, a reader, and the join handle
/// of the writer (it ends when every `Writer` handle is dropped).
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
    /// One operation per transaction and fsync. Durability is the same: an
    /// operation's completion runs only after its transaction committed.
    PerOp,
}

impl Store {
    /// Opens or creates `dir/hongbao.db`, migrates it, loads balances and
    /// starts the writer (group commit).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_batched(dir, hongbao_core::limits::COMMIT_BATCH_RECORDS_MAX)
    }

    /// `open` with a chosen commit mode (benchmark baseline only).
    #[cfg(feature = "per-op-baseline")]
    pub fn open_with(dir: &Path, mode: CommitMode) -> Result<Store, StoreError> {
        match mode {
            CommitMode::Group => Store::open(dir),
            CommitMode::PerOp => Store::open_batched(dir, 1),
        }
    }

    fn open_batched(dir: &Path, batch_ops_max: usize) -> Result<Store, StoreError> {
        prepare_data_dir(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(|source| StoreError::Io { path: lock_path.clone(), source })?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        let path = dir.join(DB_FILE);
        private_db_files(&path)?;
        let conn = schema::connect(&path, false)?;
        schema::migrate(&conn)?;
        let readers = (0..hongbao_core::limits::STORAGE_READS_INFLIGHT_MAX)
            .map(|_| schema::connect(&path, true))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let reader = Reader::new(readers);
        let (ledger, next_campaign) = schema::load_writer_state(&conn)?;
        let (writer, writer_thread) = Writer::start(path, conn, ledger, next_campaign, lock, batch_ops_max)?;
        Ok(Store { writer, reader, writer_thread })
    }
}

/// The data directory holds money records and the server's secrets: only
/// the server's user may list, read or write it.
const DIR_MODE: u32 = 0o700;
/// Every file the store creates: readable and writable by the server's user only.
const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and its parents) if needed and makes it private to this
/// user, also when it already existed with wider permissions.
pub fn prepare_data_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| StoreError::Io { path: dir.to_owned(), source };
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(io)
}

/// The database file is created private before SQLite opens it (SQLite gives
/// its WAL and shared-memory files the database file's permissions), and
/// files of an older data directory are made private too.
fn private_db_files(db: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |path: &Path, source| StoreError::Io { path: path.to_owned(), source };
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(FILE_MODE)
        .open(db)
        .map_err(|e| io(db, e))?;
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", db.display()));
        match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(FILE_MODE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&path, e)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
