//! The embedded store: one SQLite file in the data directory, WAL, and
//! synchronous=FULL (a commit is fsync'd before it returns).
//!
//! A transaction takes the write lock up front (`BEGIN IMMEDIATE`) and waits
//! out a lock held elsewhere (the sqlite3 shell, a backup) for up to
//! `schema::BUSY_TIMEOUT_MS`; past it the batch fails and the writer retries
//! with backoff. SQLite rolls back a transaction whose COMMIT failed, so a
//! commit's outcome is never unknown here.

pub(crate) mod audit;
pub(crate) mod reader;
mod rows;
pub(crate) mod schema;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hongbao_core::ledger::Account;
use rusqlite::{Connection, TransactionBehavior};

use crate::apply::{BatchTx, WriterMemory};
use crate::ops::Command;
use crate::writer::{Backend, CommitError, Recovered};
use crate::StoreError;

/// File name of the database inside a data directory.
pub const DB_FILE: &str = "hongbao.db";
/// Locked by the running server so two servers never share a data directory.
pub const LOCK_FILE: &str = "hongbao.lock";

/// The data directory holds money records and the server's secrets: only
/// the server's user may list, read or write it.
const DIR_MODE: u32 = 0o700;
/// Every file the store creates: readable and writable by the server's user only.
const FILE_MODE: u32 = 0o600;

/// The writer's side of a data directory.
pub(crate) struct SqliteBackend {
    /// Held for the writer's life: one server per data directory.
    _lock: std::fs::File,
    /// The database, reopened after a failure.
    path: PathBuf,
    conn: Connection,
}

/// Opens `dir/hongbao.db` (creating and migrating it), locks the directory,
/// and returns the writer's backend, the writer's memory and the readers'
/// connections.
pub(crate) fn open(dir: &Path, readers: usize) -> Result<(SqliteBackend, WriterMemory, Vec<Connection>), StoreError> {
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
        return Err(StoreError::Locked(dir.display().to_string()));
    }
    let path = dir.join(DB_FILE);
    private_db_files(&path)?;
    let conn = schema::connect(&path, false)?;
    schema::migrate(&conn)?;
    let reader_conns = (0..readers).map(|_| schema::connect(&path, true)).collect::<rusqlite::Result<Vec<_>>>()?;
    let memory = schema::load_writer_memory(&conn)?;
    Ok((SqliteBackend { _lock: lock, path, conn }, memory, reader_conns))
}

impl Backend for SqliteBackend {
    /// The write lock is taken up front, so a lock held elsewhere is waited
    /// out (up to the busy timeout) before anything is applied.
    fn commit(&mut self, batch: &mut [Command], memory: &mut WriterMemory) -> Result<Vec<(Account, i64)>, CommitError> {
        let failed = |e: StoreError| CommitError::Failed(e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| failed(e.into()))?;
        let mut rows = rows::SqliteRows { tx: &tx };
        let mut applying = BatchTx::new(&mut rows, memory);
        for command in batch.iter_mut() {
            applying.apply(command).map_err(failed)?;
        }
        let changed = applying.finish().map_err(failed)?;
        tx.commit().map_err(|e| failed(e.into()))?;
        Ok(changed)
    }

    /// Reopens the database, reloads what is committed, and commits a probe.
    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let mut conn = schema::connect(&self.path, false)?;
        let memory = schema::load_writer_memory(&conn)?;
        let probe = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        probe.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('writer_probe_ms', ?1)",
            [crate::unix_ms().to_string()],
        )?;
        probe.commit()?;
        self.conn = conn;
        Ok(Recovered { memory, unknown_batch_committed: None })
    }
}

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
