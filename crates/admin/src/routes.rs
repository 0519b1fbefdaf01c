//! The handlers. Each one parses its input, makes one or two `Engine` calls
//! and shapes the answer; none of them decides anything about money.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hongbao_core::campaign::{AmountRule, CampaignSpec};
use hongbao_core::ID_MAX;
use hongbao_proto::{PushBody, Reply, Request, SplitKind, Target};
use hongbao_shard::PushTarget;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::extract::{ApiJson, PathId};
use crate::{AppState, Caller};

#[cfg(fuzzing)]
pub mod fuzz;

type Shared = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

/// Default lifetime of a token issued by `POST /v1/tokens`: one day.
pub const TOKEN_TTL_S_DEFAULT: u64 = 86_400;
/// Longest lifetime of an issued token: 31 days. A token cannot be revoked
/// short of rotating the secret, so a leaked one must die on its own.
pub const TOKEN_TTL_S_MAX: u64 = 31 * 86_400;

/// User ids come from the app server and must survive a JavaScript number
/// (see `hongbao_core::ID_MAX`); 0 is never a user.
fn check_user(user: u64, what: &str) -> Result<(), ApiError> {
    if user == 0 || user > ID_MAX {
        return Err(ApiError::invalid(format!("{what} must be a user id between 1 and {ID_MAX}, got {user}")));
    }
    Ok(())
}

fn ok<T: serde::Serialize>(status: StatusCode, body: T) -> ApiResult {
    Ok((status, Json(body)).into_response())
}

/// 200 `{"status":"ok"}` while the server can move money; 503 with the
/// storage failure while it cannot (it recovers by itself; the answer turns
/// 200 again when it has).
pub(crate) async fn health(State(app): Shared) -> Response {
    match app.engine.storage_failure() {
        None => Json(json!({"status": "ok"})).into_response(),
        Some(failure) => {
            let body = json!({"status": "unavailable", "storage": failure});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// Prometheus text. Operational metrics for anyone; the money totals (the
/// same figures `/v1/stats` guards with the key) only for a scrape that
/// carries the key, or when no key is configured. A wrong key is a 401, as
/// on `/v1`, so a scraper with a stale key fails loudly instead of quietly
/// losing the money gauges.
pub(crate) async fn metrics(State(app): Shared, headers: HeaderMap) -> Response {
    let with_money = match crate::caller(app.api_key.as_deref(), &headers) {
        Caller::Operator => true,
        Caller::Anonymous => false,
        Caller::Refused => return ApiError::unauthorized(crate::WRONG_KEY).into_response(),
    };
    // Levels (queue depths, what is in memory) are read at scrape time, so
    // they are never stale and cost nothing between scrapes.
    let s = app.stats().await;
    let levels: [(&'static str, f64); 5] = [
        ("hongbao_users_online", s.users_online as f64),
        ("hongbao_packets_in_memory", s.packets_in_memory as f64),
        ("hongbao_campaigns_running", s.campaigns_running as f64),
        ("hongbao_writer_queue_depth", s.writer_queue_depth as f64),
        ("hongbao_shard_queue_depth", s.shard_queue_depth as f64),
    ];
    for (name, value) in levels {
        metrics::gauge!(name).set(value);
    }
    let mut text = app.prometheus.render();
    if with_money {
        append_money(&mut text, &s);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The money totals as Prometheus gauges. Written here rather than kept in
/// the metrics recorder, which renders everything it holds for every
/// scrape; integers, so the figures are exact.
fn append_money(text: &mut String, s: &hongbao_shard::Stats) {
    use std::fmt::Write;
    let money: [(&str, &str, i64); 4] = [
        ("hongbao_user_balances_fen", "Sum of user balances, fen (committed).", s.user_balances_fen),
        ("hongbao_packet_escrow_fen", "Money in unopened packet shares, fen (committed).", s.packet_escrow_fen),
        (
            "hongbao_campaign_escrow_fen",
            "Money in campaign budgets not yet won, fen (committed).",
            s.campaign_escrow_fen,
        ),
        (
            "hongbao_deposits_minus_withdrawals_fen",
            "Deposits minus withdrawals, fen (committed); equals the three totals above.",
            s.deposits_minus_withdrawals_fen,
        ),
    ];
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    for (name, help, value) in money {
        // Writing to a String cannot fail.
        let _ = write!(text, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
    }
}

// ---- accounts -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MoneyRequest {
    amount_fen: i64,
    /// Idempotency key: a retry with the same key returns the first receipt.
    key: String,
}

pub(crate) async fn deposit(
    State(app): Shared,
    PathId(user): PathId,
    ApiJson(body): ApiJson<MoneyRequest>,
) -> ApiResult {
    check_user(user, "user")?;
    ok(StatusCode::OK, app.engine.deposit(user, body.amount_fen, &body.key).await?)
}

pub(crate) async fn withdraw(
    State(app): Shared,
    PathId(user): PathId,
    ApiJson(body): ApiJson<MoneyRequest>,
) -> ApiResult {
    check_user(user, "user")?;
    ok(StatusCode::OK, app.engine.withdraw(user, body.amount_fen, &body.key).await?)
}

pub(crate) async fn account(State(app): Shared, PathId(user): PathId) -> ApiResult {
    check_user(user, "user")?;
    let balance_fen = app.engine.balance(user).await?;
    ok(StatusCode::OK, json!({"user": user, "balance_fen": balance_fen}))
}

// ---- groups ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupRequest {
    members: Vec<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MembersRequest {
    #[serde(default)]
    add: Vec<u64>,
    #[serde(default)]
    remove: Vec<u64>,
}

pub(crate) async fn set_group(
    State(app): Shared,
    PathId(group): PathId,
    ApiJson(body): ApiJson<GroupRequest>,
) -> ApiResult {
    let members = app.engine.set_group(group, body.members).await?;
    ok(StatusCode::OK, json!({"group": group, "members": members}))
}

/// Adds, then removes. The engine offers the two as separate commands, so
/// if the removal is refused the additions stay; the error says so.
pub(crate) async fn change_members(
    State(app): Shared,
    PathId(group): PathId,
    ApiJson(body): ApiJson<MembersRequest>,
) -> ApiResult {
    if body.add.is_empty() && body.remove.is_empty() {
        return Err(ApiError::invalid("nothing to change: give `add`, `remove` or both"));
    }
    let mut members = None;
    if !body.add.is_empty() {
        members = Some(app.engine.add_members(group, body.add).await?);
    }
    if !body.remove.is_empty() {
        let added = members.is_some();
        members = Some(app.engine.remove_members(group, body.remove).await.map_err(|e| {
            let mut err = ApiError::from(e);
            if added {
                err.message = format!("members were added, but removing failed: {}", err.message);
            }
            err
        })?);
    }
    ok(StatusCode::OK, json!({"group": group, "members": members.unwrap_or_default()}))
}

pub(crate) async fn group(State(app): Shared, PathId(group): PathId) -> ApiResult {
    match app.engine.group(group) {
        Some(members) => ok(StatusCode::OK, json!({"group": group, "members": members})),
        None => Err(ApiError::not_found(format!("group {group} not found"))),
    }
}

// ---- packets --------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendRequest {
    /// The user whose balance funds the packet.
    sender: u64,
    amount_fen: i64,
    count: u32,
    kind: SplitKind,
    to: Target,
    #[serde(default)]
    greeting: String,
    key: String,
}

/// Sends a packet on a user's behalf, exactly as if the user had sent it
/// over a connection: same checks, same idempotency, same pushes.
pub(crate) async fn send_packet(State(app): Shared, ApiJson(body): ApiJson<SendRequest>) -> ApiResult {
    check_user(body.sender, "sender")?;
    let req = Request::Send {
        amount_fen: body.amount_fen,
        count: body.count,
        kind: body.kind,
        to: body.to,
        greeting: body.greeting,
        key: body.key,
    };
    match app.engine.call(body.sender, req).await {
        Reply::Sent { packet, amount_fen, count, expires_ms, repeat } => ok(
            StatusCode::CREATED,
            json!({"packet": packet, "amount_fen": amount_fen, "count": count, "expires_ms": expires_ms, "repeat": repeat}),
        ),
        Reply::Error { code, message } => Err(ApiError::from_reply(code, message)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            hongbao_proto::ErrorCode::Internal,
            format!("unexpected engine reply to send: {other:?}"),
        )),
    }
}

pub(crate) async fn packet(State(app): Shared, PathId(packet): PathId) -> ApiResult {
    ok(StatusCode::OK, app.engine.packet_detail(packet).await?)
}

// ---- campaigns ------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CampaignRequest {
    funder: u64,
    total_fen: i64,
    rule: AmountRule,
    rate_per_s: u32,
    #[serde(default)]
    win_cap_per_user: Option<u32>,
    key: String,
}

pub(crate) async fn create_campaign(State(app): Shared, ApiJson(body): ApiJson<CampaignRequest>) -> ApiResult {
    let spec = CampaignSpec {
        funder: body.funder,
        total_fen: body.total_fen,
        rule: body.rule,
        rate_per_s: body.rate_per_s,
        win_cap_per_user: body.win_cap_per_user,
    };
    ok(StatusCode::CREATED, app.engine.create_campaign(spec, &body.key).await?)
}

pub(crate) async fn start_campaign(State(app): Shared, PathId(id): PathId) -> ApiResult {
    ok(StatusCode::OK, app.engine.start_campaign(id).await?)
}

pub(crate) async fn stop_campaign(State(app): Shared, PathId(id): PathId) -> ApiResult {
    ok(StatusCode::OK, app.engine.stop_campaign(id).await?)
}

pub(crate) async fn campaign(State(app): Shared, PathId(id): PathId) -> ApiResult {
    ok(StatusCode::OK, app.engine.campaign(id).await?)
}

pub(crate) async fn campaigns(State(app): Shared) -> ApiResult {
    ok(StatusCode::OK, app.engine.campaigns().await?)
}

// ---- push -----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PushRequest {
    target: PushTarget,
    /// Stored for offline users until acknowledged, instead of only reaching
    /// those online now.
    #[serde(default)]
    persistent: bool,
    topic: String,
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BroadcastRequest {
    topic: String,
    text: String,
}

pub(crate) async fn push(State(app): Shared, ApiJson(body): ApiJson<PushRequest>) -> ApiResult {
    let notice = PushBody::Notice { topic: body.topic, text: body.text };
    ok(StatusCode::OK, app.engine.push(body.target, notice, body.persistent).await?)
}

/// 202: the broadcast runs as a background task; its progress is at
/// `/v1/tasks/{id}`.
pub(crate) async fn broadcast(State(app): Shared, ApiJson(body): ApiJson<BroadcastRequest>) -> ApiResult {
    let notice = PushBody::Notice { topic: body.topic, text: body.text };
    ok(StatusCode::ACCEPTED, app.engine.broadcast(notice)?)
}

pub(crate) async fn tasks(State(app): Shared) -> ApiResult {
    ok(StatusCode::OK, app.engine.tasks())
}

pub(crate) async fn task(State(app): Shared, PathId(id): PathId) -> ApiResult {
    match app.engine.task(id) {
        Some(info) => ok(StatusCode::OK, info),
        None => Err(ApiError::not_found(format!("task {id} not found"))),
    }
}

pub(crate) async fn stop_task(State(app): Shared, PathId(id): PathId) -> ApiResult {
    match app.engine.stop_task(id) {
        Some(info) => ok(StatusCode::OK, info),
        None => Err(ApiError::not_found(format!("task {id} not found"))),
    }
}

// ---- tokens and stats -----------------------------------------------------

fn ttl_default() -> u64 {
    TOKEN_TTL_S_DEFAULT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRequest {
    user: u64,
    #[serde(default = "ttl_default")]
    ttl_s: u64,
}

/// Issues a client token with the gateway's secret, for app servers that
/// would rather ask us than hold the secret and sign tokens themselves.
pub(crate) async fn issue_token(State(app): Shared, ApiJson(body): ApiJson<TokenRequest>) -> ApiResult {
    check_user(body.user, "user")?;
    if body.ttl_s == 0 || body.ttl_s > TOKEN_TTL_S_MAX {
        return Err(ApiError::invalid(format!("ttl_s must be between 1 and {TOKEN_TTL_S_MAX}, got {}", body.ttl_s)));
    }
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let token = app.signer.issue(body.user, body.ttl_s, now_s);
    ok(StatusCode::OK, json!({"user": body.user, "token": token, "expires_s": now_s + body.ttl_s}))
}

pub(crate) async fn stats(State(app): Shared) -> ApiResult {
    ok(StatusCode::OK, app.stats().await)
}

/// Every path that matches no route.
pub(crate) async fn no_route() -> ApiError {
    ApiError::not_found("no such route; see docs/api.md")
}

pub(crate) async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        hongbao_proto::ErrorCode::InvalidRequest,
        "method not allowed on this route",
    )
}
