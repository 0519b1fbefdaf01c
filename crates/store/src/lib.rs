//! Storage (stub; being implemented).
use std::path::Path;
pub use hongbao_core::audit::AuditReport;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Corrupt(String),
}

/// Re-derives every balance and packet in the data directory `dir` and checks
/// every invariant. Read-only: safe to run against a live server's data.
pub fn audit_dir(dir: &Path) -> Result<AuditReport, StoreError> {
    let _ = dir;
    todo!()
}
