//! One error type for every handler, rendered as
//! `{"error":{"code":"<ErrorCode>","message":"..."}}` with a status that
//! tells the operator's tooling whether to fix the request, retry, or page
//! someone.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hongbao_boundary::EngineError;
use hongbao_proto::ErrorCode;
use serde::Serialize;
use utoipa::ToSchema;

/// A failed API call: the HTTP status, the stable error code and a message
/// for a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    /// Status 400: the request itself is wrong; retrying it unchanged will not help.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// Status 401. The protocol has no "unauthorized" code, so this uses
    /// `bad_token`, the one clients already know for a refused credential.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::BadToken, message)
    }

    /// The error for a `Reply::Error` the engine sent back to a request made
    /// on a user's behalf.
    pub fn from_reply(code: ErrorCode, message: String) -> ApiError {
        ApiError::new(status_for(code), code, message)
    }
}

/// The HTTP status for a protocol error code.
///
/// 409 covers "the request is well-formed but conflicts with current
/// state" (no money, packet gone or finished, key reused); 503 tells a
/// caller that retrying later is the right move.
pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest
        | ErrorCode::Malformed
        | ErrorCode::FrameTooLarge
        | ErrorCode::UnknownOp
        | ErrorCode::HelloRequired => StatusCode::BAD_REQUEST,
        ErrorCode::BadToken | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::InsufficientFunds
        | ErrorCode::KeyConflict
        | ErrorCode::NotEligible
        | ErrorCode::Finished
        | ErrorCode::Expired => StatusCode::CONFLICT,
        ErrorCode::Overload | ErrorCode::ShuttingDown | ErrorCode::SlowConsumer | ErrorCode::IdleTimeout => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        // Mapped from the variant, not from `code()`: `Conflict` shares the
        // `invalid_request` code with `Invalid` on the client protocol, but
        // an operator needs to tell "fix your request" (400) from "the state
        // does not allow it now" (409).
        let status = match &e {
            EngineError::Invalid(_) => StatusCode::BAD_REQUEST,
            EngineError::InsufficientFunds { .. } | EngineError::Conflict(_) | EngineError::KeyConflict => {
                StatusCode::CONFLICT
            }
            EngineError::NotFound(_) => StatusCode::NOT_FOUND,
            EngineError::Overload | EngineError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

/// The body of every error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable protocol error code (the same names clients see).
    pub code: ErrorCode,
    /// For humans; may change.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = self.code.as_str(), message = %self.message, "admin request failed");
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code, message: self.message } };
        (self.status, Json(body)).into_response()
    }
}
