//! The API's OpenAPI 3.1 document, `GET /openapi.json`: built from the route
//! table (`crate::route_table`), never kept by hand.
//!
//! Each handler's `#[utoipa::path]` gives its method, path, parameters,
//! request body and the answers particular to it; the types' `ToSchema`
//! (here, and behind the `openapi` features of `hongbao-proto`,
//! `hongbao-core`, `hongbao-shard` and `hongbao-store`) give the bodies as
//! serde writes them. What every route of a kind shares is added here, from
//! the same rules the router and the extractors follow, so no annotation
//! can forget it:
//! - under `/v1` (`crate::needs_key`): the `bearer` or `api_key` security
//!   requirement, 401 and 500;
//! - a request body: 400, 408 and 413 (read before routing, `conn`);
//! - an id in the path: 400.
//!
//! Must not: change what the API does. The document describes the router;
//! the tests hold the two to the same routes (`tests::openapi`).

use std::sync::LazyLock;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use hongbao_proto::ErrorCode;
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::OpenApi as _;

use crate::error::{ApiError, ErrorBody};

/// What the derive fills in: the document's head and the schemas no
/// handler names directly.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "hongbao admin API",
        description = "The operator API of `hongbao serve` (docs/api.md). JSON in, JSON out, HTTP/1.1; money is \
                       integer fen. Every error is `{\"error\": {\"code\", \"message\"}}` (`ErrorBody`). Beyond \
                       what each operation lists: an unknown path is a 404 and a known path with another method \
                       a 405 (`not_found`, `invalid_request`); any request whose body is over 64 KiB is a 413, \
                       and one whose body does not arrive within 5 s of its head a 408 (both with \
                       `Connection: close`)."
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "health", description = "Liveness, metrics, this document: no key needed."),
        (name = "accounts", description = "Balances, deposits and withdrawals."),
        (name = "groups", description = "Group membership, the recipients of group packets."),
        (name = "packets", description = "Group packets sent on a user's behalf."),
        (name = "campaigns", description = "Shake campaigns."),
        (name = "push", description = "Notices and broadcast tasks."),
        (name = "tokens", description = "Client tokens."),
        (name = "stats", description = "Live counters and money totals."),
        (name = "live", description = "The live figures of every second and the alerts judged on them."),
    )
)]
struct Head;

/// The whole document.
pub fn document() -> OpenApi {
    let mut doc = Head::openapi();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("`Authorization: Bearer <admin key>`"))
                .build(),
        ),
    );
    components.add_security_scheme(
        API_KEY,
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "x-api-key",
            "`x-api-key: <admin key>`, the same key as `bearer`",
        ))),
    );
    for (schemas, paths, _) in crate::route_table() {
        components.schemas.extend(schemas);
        doc.paths.merge(paths);
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        for operation in operations(item) {
            add_shared(path, operation);
        }
    }
    doc
}

/// The names of the two security schemes (either carries the admin key).
const BEARER: &str = "bearer";
const API_KEY: &str = "api_key";

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// The answers and the security every operation of a kind shares.
fn add_shared(path: &str, op: &mut Operation) {
    let has_body = op.request_body.is_some();
    let has_path_id = op.parameters.iter().flatten().any(|p| p.parameter_in == ParameterIn::Path);
    if crate::needs_key(path) {
        let either = [BEARER, API_KEY].map(|name| SecurityRequirement::new(name, Vec::<String>::new()));
        op.security = Some(either.into());
        add_error(op, StatusCode::UNAUTHORIZED, "Missing or wrong admin key (`bad_token`).");
        add_error(op, StatusCode::INTERNAL_SERVER_ERROR, "A bug (`internal`).");
    }
    if has_body || has_path_id {
        add_error(
            op,
            StatusCode::BAD_REQUEST,
            "Malformed JSON, an empty body, a field missing, unknown or of the wrong type, a value out of range, \
             an id in the path that is not a non-negative integer, or a value the engine refuses \
             (`invalid_request`).",
        );
    }
    if has_body {
        add_error(
            op,
            StatusCode::REQUEST_TIMEOUT,
            "The body did not arrive within 5 s of the head (`idle_timeout`); the connection is closed.",
        );
        add_error(
            op,
            StatusCode::PAYLOAD_TOO_LARGE,
            "The body is over 64 KiB (`invalid_request`); refused unread, the connection is closed.",
        );
    }
}

/// Adds an error answer with `ErrorBody`, unless the annotation has one
/// for the status (its description is the more precise).
fn add_error(op: &mut Operation, status: StatusCode, description: &str) {
    let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    let response = ResponseBuilder::new().description(description).content("application/json", body).build();
    op.responses.responses.entry(status.as_u16().to_string()).or_insert(RefOr::T(response));
}

/// The document as served, rendered once.
static DOCUMENT_JSON: LazyLock<Result<String, String>> =
    LazyLock::new(|| document().to_json().map_err(|e| e.to_string()));

/// `GET /openapi.json`. No key: it is the contract, not data.
#[utoipa::path(
    get,
    path = "/openapi.json",
    summary = "This OpenAPI document",
    tag = "health",
    responses((status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json", body = Object))
)]
pub(crate) async fn serve_document() -> Response {
    match DOCUMENT_JSON.as_ref() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json.clone()).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("the OpenAPI document does not serialise: {e}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests;
