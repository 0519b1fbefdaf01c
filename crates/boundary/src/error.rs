//! The one error type that crosses the boundary.

use hongbao_proto::{ErrorCode, Reply};

/// Errors at the engine boundary; each maps to one client error code and
/// one HTTP status in the admin API.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("insufficient funds: balance {balance_fen} fen, needs {needed_fen} fen")]
    InsufficientFunds { balance_fen: i64, needed_fen: i64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("idempotency key was used for a different request")]
    KeyConflict,
    #[error("server over capacity, retry later")]
    Overload,
    #[error("internal error: {0}")]
    Internal(String),
    /// Storage cannot commit right now; nothing was done.
    #[error("storage unavailable: {0}; nothing was done, retry later")]
    Unavailable(String),
    #[error("{0}")]
    RateLimited(String),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Invalid(_) => ErrorCode::InvalidRequest,
            EngineError::InsufficientFunds { .. } => ErrorCode::InsufficientFunds,
            EngineError::NotFound(_) => ErrorCode::NotFound,
            EngineError::Conflict(_) => ErrorCode::InvalidRequest,
            EngineError::KeyConflict => ErrorCode::KeyConflict,
            EngineError::Overload => ErrorCode::Overload,
            EngineError::Internal(_) => ErrorCode::Internal,
            EngineError::Unavailable(_) => ErrorCode::Unavailable,
            EngineError::RateLimited(_) => ErrorCode::RateLimited,
        }
    }

    pub fn to_reply(&self) -> Reply {
        Reply::error(self.code(), self.to_string())
    }
}
