//! Extractors whose rejections are JSON errors in our format. axum's own
//! `Json` and `Path` reject with plain-text bodies and, for type errors, a
//! 422; an operator's script should see one error shape and a 400 for every
//! request it got wrong.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use hongbao_proto::ErrorCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON request body. The content type is not checked, so a bare
/// `curl -d '{...}'` works; the body must still parse as the route's type.
/// The size limit is the router's `DefaultBodyLimit` (`BODY_BYTES_MAX`).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    ErrorCode::InvalidRequest,
                    format!("request body larger than {} bytes", crate::BODY_BYTES_MAX),
                )
            } else {
                ApiError::invalid(format!("cannot read request body: {}", rejection.body_text()))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a body, telling broken JSON apart from JSON of the wrong shape
/// (a missing field, a string where a number belongs, a number out of range).
///
/// The body is checked to be UTF-8 first: `serde_json::from_slice` checks
/// only the strings it keeps, so bytes that are not UTF-8 inside a field it
/// skips (an unknown field of a nested object) passed as JSON (found by
/// fuzzing, docs/fuzzing.md).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::invalid("request body is empty; expected a JSON object"));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|e| ApiError::invalid(format!("malformed JSON body: not UTF-8 ({e})")))?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid(format!("invalid request body: {e}")),
        _ => ApiError::invalid(format!("malformed JSON body: {e}")),
    })
}

/// The single numeric id in a route's path (`/v1/packets/{id}` and the like).
pub struct PathId(pub u64);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<u64>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(PathId(id)),
            Err(rejection) => Err(ApiError::invalid(format!(
                "the id in the path must be a non-negative integer: {}",
                rejection.body_text()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_core::campaign::AmountRule;

    #[test]
    fn bodies_that_are_not_utf8_are_refused_even_where_skipped() {
        // A campaign's rule skips fields it does not know.
        let good = b"{\"range\": {\"min_fen\": 1, \"max_fen\": 9, \"note\": \"x\"}}";
        assert_eq!(parse_json::<AmountRule>(good), Ok(AmountRule::Range { min_fen: 1, max_fen: 9 }));
        // The same body with a byte that is not UTF-8 in the skipped field,
        // then in a skipped key.
        for bad in [
            &b"{\"range\": {\"min_fen\": 1, \"max_fen\": 9, \"note\": \"\xff\"}}"[..],
            &b"{\"range\": {\"min_fen\": 1, \"max_fen\": 9, \"n\xa3\": 2}}"[..],
        ] {
            let e = parse_json::<AmountRule>(bad).unwrap_err();
            assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest));
            assert!(e.message.contains("not UTF-8"), "{}", e.message);
        }
    }
}
