//! The handlers. Each one parses its input, makes one or two `Engine` calls
//! and shapes the answer; none of them decides anything about money.
//!
//! Each handler's `#[utoipa::path]` names its method and path (the router
//! registers it there, `crate::route_table`) and the statuses it answers
//! itself; the statuses every route of a kind shares (401 under `/v1`, 400,
//! 408 and 413 for a body, 500) are added by `crate::openapi`. Every body
//! is a typed struct with `ToSchema`, so the document shows what serde
//! writes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hongbao_core::campaign::{AmountRule, CampaignSpec};
use hongbao_core::openapi::Id;
use hongbao_core::ID_MAX;
use hongbao_proto::{PacketDetail, PushBody, Reply, Request, SplitKind, Target};
use hongbao_shard::{CampaignInfo, MoneyReceipt, PushReceipt, PushTarget, Stats, StorageFailure, TaskInfo};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
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

fn ok<T: Serialize>(status: StatusCode, body: T) -> ApiResult {
    Ok((status, Json(body)).into_response())
}

// ---- path parameters --------------------------------------------------------
//
// Never built: they only describe, in the document, the id `PathId` takes
// from the path. The ranges are the ones the handlers and the engine check
// (a test compares them with `ID_MAX` and the largest packet id).

/// `{user}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct UserPath {
    /// A user id, 1 to 2^53 − 1.
    #[param(minimum = 1, maximum = 9007199254740991_u64, example = 1)]
    user: u64,
}

/// `{id}` of a group.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct GroupPath {
    /// A group id, 1 to 2^53 − 1.
    #[param(minimum = 1, maximum = 9007199254740991_u64, example = 9)]
    id: u64,
}

/// `{id}` of a packet.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct PacketPath {
    /// A packet id (`set << 48 | shard << 40 | day << 26 | n`), below 2^53.
    #[param(minimum = 0, maximum = 9007199254740991_u64)]
    id: u64,
}

/// `{id}` of a campaign.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct CampaignPath {
    /// A campaign id, 1 to 2^53 − 1.
    #[param(minimum = 1, maximum = 9007199254740991_u64, example = 1)]
    id: u64,
}

/// `{id}` of a broadcast task.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct TaskPath {
    /// A task id, 1 to 2^53 − 1.
    #[param(minimum = 1, maximum = 9007199254740991_u64, example = 1)]
    id: u64,
}

// ---- health and metrics -----------------------------------------------------

/// `/health`'s body.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    pub status: HealthStatus,
    /// Why storage fails, since when and how often; only while it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub storage: Option<StorageFailure>,
    /// Why a dependency other than storage fails (a SET's link to NATS, over
    /// which credits and notices for other SETs travel); only while it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub dependency: Option<String>,
}

#[derive(Serialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HealthStatus {
    /// The server can move money.
    Ok,
    /// Storage cannot commit now; the server recovers by itself.
    Unavailable,
    /// Money moves, but a dependency fails (`dependency` says which): a SET
    /// whose NATS is away keeps its cross-SET messages in its outbox until
    /// it is back.
    Degraded,
}

/// 200 `{"status":"ok"}` while the server can move money; 503 with the
/// storage failure while it cannot (it recovers by itself; the answer turns
/// 200 again when it has).
#[utoipa::path(
    get,
    path = "/health",
    summary = "Liveness: can the server move money now?",
    tag = "health",
    responses(
        (status = 200, description = "The server can move money: `{\"status\": \"ok\"}`, or `degraded` with the failing dependency.", body = Health),
        (status = 503, description = "Storage cannot commit now; the answer turns 200 by itself once it can.", body = Health),
    )
)]
pub(crate) async fn health(State(app): Shared) -> Response {
    let dependency = app.dependency.as_ref().and_then(|probe| (probe.0)());
    match app.engine.storage_failure() {
        None => {
            let status = if dependency.is_some() { HealthStatus::Degraded } else { HealthStatus::Ok };
            Json(Health { status, storage: None, dependency }).into_response()
        }
        Some(failure) => {
            let body = Health { status: HealthStatus::Unavailable, storage: Some(failure), dependency };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// Prometheus text. Operational metrics for anyone; the money totals (the
/// same figures `/v1/stats` guards with the key) only for a scrape that
/// carries the key, or when no key is configured. A wrong key is a 401, as
/// on `/v1`, so a scraper with a stale key fails loudly instead of quietly
/// losing the money gauges.
#[utoipa::path(
    get,
    path = "/metrics",
    summary = "Prometheus metrics",
    tag = "health",
    description = "Prometheus text exposition. No key needed; the money totals are added only when the \
                   scrape carries the admin key (`Authorization: Bearer` or `x-api-key`), or when the \
                   server has none.",
    responses(
        (status = 200, description = "The metrics.", content_type = "text/plain", body = String),
        (status = 401, description = "A key was offered and it is wrong (`bad_token`).", body = ErrorBody),
    )
)]
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
    let money: [(&str, &str, i64); 5] = [
        ("hongbao_user_balances_fen", "Sum of user balances, fen (committed).", s.user_balances_fen),
        ("hongbao_packet_escrow_fen", "Money in unopened packet shares, fen (committed).", s.packet_escrow_fen),
        (
            "hongbao_campaign_escrow_fen",
            "Money in campaign budgets not yet won, fen (committed).",
            s.campaign_escrow_fen,
        ),
        (
            "hongbao_transit_fen",
            "What this SET owes the other SETs of its cluster, net, fen (committed; 0 on a single node).",
            s.transit_fen,
        ),
        (
            "hongbao_deposits_minus_withdrawals_fen",
            "Deposits minus withdrawals, fen (committed); equals the four totals above.",
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"amount_fen": 1000000, "key": "dep-1-0001"}))]
pub(crate) struct MoneyRequest {
    /// Fen, 1 to 10^12.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    amount_fen: i64,
    /// Idempotency key, 1 to 64 bytes: a retry with the same key returns the
    /// first receipt.
    #[schema(min_length = 1, max_length = 64)]
    key: String,
}

/// `GET /v1/accounts/{user}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Balance {
    pub balance_fen: i64,
    pub user: u64,
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{user}/deposit",
    summary = "Deposit into a user's balance",
    description = "Idempotent by `key` over all deposits: a retry returns the first receipt with `repeat: true`.",
    tag = "accounts",
    params(UserPath),
    request_body = MoneyRequest,
    responses(
        (status = 200, description = "The receipt (of the first try, for a retry).", body = MoneyReceipt),
        (status = 409, description = "The key was used for another user or amount (`key_conflict`).", body = ErrorBody),
        (status = 503, description = "Over capacity or storage unavailable; nothing moved (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn deposit(
    State(app): Shared,
    PathId(user): PathId,
    ApiJson(body): ApiJson<MoneyRequest>,
) -> ApiResult {
    check_user(user, "user")?;
    ok(StatusCode::OK, app.engine.deposit(user, body.amount_fen, &body.key).await?)
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{user}/withdraw",
    summary = "Withdraw from a user's balance",
    description = "Idempotent by `key` over all withdrawals: a retry returns the first receipt with `repeat: true`.",
    tag = "accounts",
    params(UserPath),
    request_body = MoneyRequest,
    responses(
        (status = 200, description = "The receipt (of the first try, for a retry).", body = MoneyReceipt),
        (status = 409, description = "More than the balance (`insufficient_funds`), or the key was used for another \
                                      user or amount (`key_conflict`).", body = ErrorBody),
        (status = 503, description = "Over capacity or storage unavailable; nothing moved (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn withdraw(
    State(app): Shared,
    PathId(user): PathId,
    ApiJson(body): ApiJson<MoneyRequest>,
) -> ApiResult {
    check_user(user, "user")?;
    ok(StatusCode::OK, app.engine.withdraw(user, body.amount_fen, &body.key).await?)
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{user}",
    summary = "A user's balance",
    tag = "accounts",
    params(UserPath),
    responses(
        (status = 200, description = "The balance; 0 for a user money never reached.", body = Balance),
        (status = 503, description = "Over capacity or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn account(State(app): Shared, PathId(user): PathId) -> ApiResult {
    check_user(user, "user")?;
    let balance_fen = app.engine.balance(user).await?;
    ok(StatusCode::OK, Balance { balance_fen, user })
}

// ---- groups ---------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"members": [1, 2, 3]}))]
pub(crate) struct GroupRequest {
    /// User ids, at most 500; an empty list removes the group.
    #[schema(value_type = Vec<Id>, max_items = 500)]
    members: Vec<u64>,
}

/// Additions are applied first, then removals; at least one is non-empty.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"add": [4], "remove": [3]}))]
pub(crate) struct MembersRequest {
    #[serde(default)]
    #[schema(value_type = Vec<Id>, max_items = 500)]
    add: Vec<u64>,
    #[serde(default)]
    #[schema(value_type = Vec<Id>)]
    remove: Vec<u64>,
}

/// A group's members, sorted, without duplicates.
#[derive(Serialize, ToSchema)]
pub(crate) struct GroupMembers {
    pub group: u64,
    pub members: Vec<u64>,
}

#[utoipa::path(
    put,
    path = "/v1/groups/{id}",
    summary = "Replace a group's members",
    tag = "groups",
    params(GroupPath),
    request_body = GroupRequest,
    responses(
        (status = 200, description = "The members now.", body = GroupMembers),
        (status = 503, description = "Over capacity or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn set_group(
    State(app): Shared,
    PathId(group): PathId,
    ApiJson(body): ApiJson<GroupRequest>,
) -> ApiResult {
    let members = app.engine.set_group(group, body.members).await?;
    ok(StatusCode::OK, GroupMembers { group, members })
}

/// Adds, then removes. The engine offers the two as separate commands, so
/// if the removal is refused the additions stay; the error says so.
#[utoipa::path(
    post,
    path = "/v1/groups/{id}/members",
    summary = "Add and/or remove members",
    description = "Additions are applied first; if the removal is then refused, the additions stay and the error says so.",
    tag = "groups",
    params(GroupPath),
    request_body = MembersRequest,
    responses(
        (status = 200, description = "The members now.", body = GroupMembers),
        (status = 503, description = "Over capacity or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
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
    ok(StatusCode::OK, GroupMembers { group, members: members.unwrap_or_default() })
}

#[utoipa::path(
    get,
    path = "/v1/groups/{id}",
    summary = "A group's members",
    tag = "groups",
    params(GroupPath),
    responses(
        (status = 200, description = "The members.", body = GroupMembers),
        (status = 404, description = "No such group (a group without members no longer exists; `not_found`).", body = ErrorBody),
    )
)]
pub(crate) async fn group(State(app): Shared, PathId(group): PathId) -> ApiResult {
    match app.engine.group(group) {
        Some(members) => ok(StatusCode::OK, GroupMembers { group, members }),
        None => Err(ApiError::not_found(format!("group {group} not found"))),
    }
}

// ---- packets --------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"sender": 1, "amount_fen": 888, "count": 3, "kind": "lucky", "to": {"group": 9}, "greeting": "恭喜发财", "key": "pkt-1-0001"}))]
pub(crate) struct SendRequest {
    /// The user whose balance funds the packet, 1 to 2^53 − 1.
    #[schema(minimum = 1, maximum = 9007199254740991_u64)]
    sender: u64,
    /// The total, fen; at most `packet_amount_max_fen` (default 20000).
    #[schema(minimum = 1)]
    amount_fen: i64,
    /// Shares; at most `packet_count_max` (default 100) and at most
    /// `amount_fen`; 1 for `{"user": …}`.
    #[schema(minimum = 1)]
    count: u32,
    /// `lucky`: random split (double-average rule); `fixed`: equal shares
    /// (the amount a multiple of `count`).
    kind: SplitKind,
    /// The recipients: a group (the sender must be a member), users (at
    /// most 500), or one user.
    to: Target,
    /// At most 256 bytes.
    #[serde(default)]
    #[schema(max_length = 256)]
    greeting: String,
    /// Idempotency key per sender, 1 to 64 bytes.
    #[schema(min_length = 1, max_length = 64)]
    key: String,
}

/// `POST /v1/packets`.
#[derive(Serialize, ToSchema)]
pub(crate) struct SentPacket {
    pub amount_fen: i64,
    pub count: u32,
    /// When an unopened remainder goes back to the sender (wall-clock ms).
    pub expires_ms: u64,
    /// `set << 48 | shard << 40 | day << 26 | n`, below 2^53.
    pub packet: u64,
    /// True when this was a retry and the first result is returned.
    pub repeat: bool,
}

/// Sends a packet on a user's behalf, exactly as if the user had sent it
/// over a connection: same checks, same idempotency, same pushes.
#[utoipa::path(
    post,
    path = "/v1/packets",
    summary = "Send a packet on a user's behalf",
    description = "Exactly what the user's own `send` does: the same checks, the same idempotency (by `key` per sender), the same pushes. The sender's balance funds it.",
    tag = "packets",
    request_body = SendRequest,
    responses(
        (status = 201, description = "Sent (or, for a retry, the first result).", body = SentPacket),
        (status = 404, description = "No such group (`not_found`).", body = ErrorBody),
        (status = 409, description = "Not enough money (`insufficient_funds`), the key was used for another amount, \
                                      count or kind (`key_conflict`), or the sender is not a member of the group \
                                      (`not_eligible`).", body = ErrorBody),
        (status = 429, description = "The sender sends faster than `sends_per_s` allows, or too many of its notices \
                                      are undelivered (`rate_limited`).", body = ErrorBody),
        (status = 503, description = "Over capacity or storage unavailable; nothing moved (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
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
        Reply::Sent { packet, amount_fen, count, expires_ms, repeat } => {
            ok(StatusCode::CREATED, SentPacket { amount_fen, count, expires_ms, packet, repeat })
        }
        Reply::Error { code, message } => Err(ApiError::from_reply(code, message)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            hongbao_proto::ErrorCode::Internal,
            format!("unexpected engine reply to send: {other:?}"),
        )),
    }
}

#[utoipa::path(
    get,
    path = "/v1/packets/{id}",
    summary = "A packet's committed state and every claim",
    tag = "packets",
    params(PacketPath),
    responses(
        (status = 200, description = "The committed state and every claim, in open order.", body = PacketDetail),
        (status = 404, description = "No such packet (a shake win is not a packet; `not_found`).", body = ErrorBody),
        (status = 503, description = "Too many reads of storage queued, or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn packet(State(app): Shared, PathId(packet): PathId) -> ApiResult {
    ok(StatusCode::OK, app.engine.packet_detail(packet).await?)
}

// ---- campaigns ------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"funder": 1, "total_fen": 100000, "rule": {"count": {"packets": 1000}}, "rate_per_s": 200, "win_cap_per_user": 3, "key": "camp-2026"}))]
pub(crate) struct CampaignRequest {
    /// The budget moves from this user's balance into the campaign's escrow.
    #[schema(minimum = 1, maximum = 9007199254740991_u64)]
    funder: u64,
    /// The budget, fen, 1 to 10^12.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    total_fen: i64,
    /// `{"count": {"packets": N}}` (1 ≤ N ≤ 10^8, N ≤ `total_fen`) or
    /// `{"range": {"min_fen": a, "max_fen": b}}` (1 ≤ a ≤ b ≤ `total_fen`).
    rule: AmountRule,
    /// Packets released per second while running, 1 to 1,000,000.
    #[schema(minimum = 1, maximum = 1_000_000)]
    rate_per_s: u32,
    /// Most wins per user (at least 1); absent or null: no cap.
    #[serde(default)]
    #[schema(minimum = 1)]
    win_cap_per_user: Option<u32>,
    /// Idempotency key over all campaigns, 1 to 64 bytes.
    #[schema(min_length = 1, max_length = 64)]
    key: String,
}

#[utoipa::path(
    post,
    path = "/v1/campaigns",
    summary = "Create and fund a shake campaign",
    description = "The budget moves from the funder's balance into the campaign's escrow. Idempotent by `key` over all campaigns: a retry answers the campaign as it is now.",
    tag = "campaigns",
    request_body = CampaignRequest,
    responses(
        (status = 201, description = "Created and funded (for a retry: the campaign as it is now).", body = CampaignInfo),
        (status = 409, description = "Not enough money (`insufficient_funds`) or the key was used for another funder, \
                                      total or rule (`key_conflict`).", body = ErrorBody),
        (status = 503, description = "Over capacity or storage unavailable; nothing moved (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
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

#[utoipa::path(
    post,
    path = "/v1/campaigns/{id}/start",
    summary = "Start releasing a campaign's packets",
    tag = "campaigns",
    params(CampaignPath),
    responses(
        (status = 200, description = "Running (starting a running one changes nothing).", body = CampaignInfo),
        (status = 404, description = "No such campaign (`not_found`).", body = ErrorBody),
        (status = 409, description = "The campaign is stopped or finished (`invalid_request`).", body = ErrorBody),
        (status = 503, description = "Over capacity or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn start_campaign(State(app): Shared, PathId(id): PathId) -> ApiResult {
    ok(StatusCode::OK, app.engine.start_campaign(id).await?)
}

#[utoipa::path(
    post,
    path = "/v1/campaigns/{id}/stop",
    summary = "Stop a campaign and refund the rest",
    tag = "campaigns",
    params(CampaignPath),
    responses(
        (status = 200, description = "Stopped, the rest refunded to the funder (stopping a closed one changes nothing).", body = CampaignInfo),
        (status = 404, description = "No such campaign (`not_found`).", body = ErrorBody),
        (status = 503, description = "Over capacity or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn stop_campaign(State(app): Shared, PathId(id): PathId) -> ApiResult {
    ok(StatusCode::OK, app.engine.stop_campaign(id).await?)
}

#[utoipa::path(
    get,
    path = "/v1/campaigns/{id}",
    summary = "One campaign",
    tag = "campaigns",
    params(CampaignPath),
    responses(
        (status = 200, description = "The campaign.", body = CampaignInfo),
        (status = 404, description = "No such campaign (`not_found`).", body = ErrorBody),
        (status = 503, description = "Too many reads of storage queued, or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn campaign(State(app): Shared, PathId(id): PathId) -> ApiResult {
    ok(StatusCode::OK, app.engine.campaign(id).await?)
}

#[utoipa::path(
    get,
    path = "/v1/campaigns",
    summary = "Every campaign",
    tag = "campaigns",
    responses(
        (status = 200, description = "Every campaign.", body = Vec<CampaignInfo>),
        (status = 503, description = "Too many reads of storage queued, or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn campaigns(State(app): Shared) -> ApiResult {
    ok(StatusCode::OK, app.engine.campaigns().await?)
}

// ---- push -----------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"target": {"group": 9}, "persistent": true, "topic": "event", "text": "Shake starts at 20:00"}))]
pub(crate) struct PushRequest {
    /// At most 500 users.
    target: PushTarget,
    /// Stored for offline users until acknowledged, instead of only reaching
    /// those online now.
    #[serde(default)]
    persistent: bool,
    topic: String,
    text: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"topic": "all", "text": "新年快乐"}))]
pub(crate) struct BroadcastRequest {
    topic: String,
    text: String,
}

#[utoipa::path(
    post,
    path = "/v1/push",
    summary = "A notice to some users",
    description = "`persistent`: stored for offline users until they acknowledge it; otherwise only those online now get it.",
    tag = "push",
    request_body = PushRequest,
    responses(
        (status = 200, description = "Queued to those online (and stored, if persistent).", body = PushReceipt),
        (status = 404, description = "No such group (`not_found`).", body = ErrorBody),
        (status = 503, description = "Over capacity or storage unavailable (`overload`, `unavailable`).", body = ErrorBody),
    )
)]
pub(crate) async fn push(State(app): Shared, ApiJson(body): ApiJson<PushRequest>) -> ApiResult {
    let notice = PushBody::Notice { topic: body.topic, text: body.text };
    ok(StatusCode::OK, app.engine.push(body.target, notice, body.persistent).await?)
}

/// 202: the broadcast runs as a background task; its progress is at
/// `/v1/tasks/{id}`.
#[utoipa::path(
    post,
    path = "/v1/broadcast",
    summary = "A transient notice to everyone online",
    description = "Runs in the background as a stoppable task (`/v1/tasks/{id}`); at most four at once.",
    tag = "push",
    request_body = BroadcastRequest,
    responses(
        (status = 202, description = "The broadcast task, running.", body = TaskInfo),
        (status = 503, description = "Four broadcasts are running already (`overload`).", body = ErrorBody),
    )
)]
pub(crate) async fn broadcast(State(app): Shared, ApiJson(body): ApiJson<BroadcastRequest>) -> ApiResult {
    let notice = PushBody::Notice { topic: body.topic, text: body.text };
    ok(StatusCode::ACCEPTED, app.engine.broadcast(notice)?)
}

#[utoipa::path(
    get,
    path = "/v1/tasks",
    summary = "Broadcast tasks",
    tag = "push",
    responses((status = 200, description = "The most recent broadcast tasks (at most 128).", body = Vec<TaskInfo>))
)]
pub(crate) async fn tasks(State(app): Shared) -> ApiResult {
    ok(StatusCode::OK, app.engine.tasks())
}

#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    summary = "One broadcast task",
    tag = "push",
    params(TaskPath),
    responses(
        (status = 200, description = "The task.", body = TaskInfo),
        (status = 404, description = "No such task, or forgotten (`not_found`).", body = ErrorBody),
    )
)]
pub(crate) async fn task(State(app): Shared, PathId(id): PathId) -> ApiResult {
    match app.engine.task(id) {
        Some(info) => ok(StatusCode::OK, info),
        None => Err(ApiError::not_found(format!("task {id} not found"))),
    }
}

#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/stop",
    summary = "Stop a broadcast task",
    tag = "push",
    params(TaskPath),
    responses(
        (status = 200, description = "The task, stopping (or as it was, if it had ended).", body = TaskInfo),
        (status = 404, description = "No such task, or forgotten (`not_found`).", body = ErrorBody),
    )
)]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user": 1, "ttl_s": 3600}))]
pub(crate) struct TokenRequest {
    /// 1 to 2^53 − 1.
    #[schema(minimum = 1, maximum = 9007199254740991_u64)]
    user: u64,
    /// Lifetime, 1 s to 31 days.
    #[serde(default = "ttl_default")]
    #[schema(minimum = 1, maximum = 2_678_400)]
    ttl_s: u64,
}

/// `POST /v1/tokens`.
#[derive(Serialize, ToSchema)]
pub(crate) struct IssuedToken {
    /// When the token expires (Unix seconds).
    pub expires_s: u64,
    pub token: String,
    pub user: u64,
}

/// Issues a client token with the gateway's secret, for app servers that
/// would rather ask us than hold the secret and sign tokens themselves.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    summary = "Issue a client token",
    description = "Signed with the server's token secret, for app servers that would rather ask than sign tokens themselves.",
    tag = "tokens",
    request_body = TokenRequest,
    responses((status = 200, description = "A client token signed with the server's token secret.", body = IssuedToken))
)]
pub(crate) async fn issue_token(State(app): Shared, ApiJson(body): ApiJson<TokenRequest>) -> ApiResult {
    check_user(body.user, "user")?;
    if body.ttl_s == 0 || body.ttl_s > TOKEN_TTL_S_MAX {
        return Err(ApiError::invalid(format!("ttl_s must be between 1 and {TOKEN_TTL_S_MAX}, got {}", body.ttl_s)));
    }
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let token = app.signer.issue(body.user, body.ttl_s, now_s);
    ok(StatusCode::OK, IssuedToken { expires_s: now_s + body.ttl_s, token, user: body.user })
}

#[utoipa::path(
    get,
    path = "/v1/stats",
    summary = "Live counters and money totals",
    tag = "stats",
    responses((status = 200, description = "Live counters and the committed money totals.", body = Stats))
)]
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
