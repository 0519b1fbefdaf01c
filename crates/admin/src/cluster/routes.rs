//! The cluster admin's handlers: each picks the SET (or SETs) a request
//! belongs to, calls it, and passes its answer on or combines the answers.
//!
//! - one SET: a user's home SET (`user % sets`), the SET in a packet id, or
//!   SET 0 (groups are read there; tokens are signed there). Its answer,
//!   status and body, is passed through unchanged.
//! - every SET in order (group changes): SET 0 first, so a refusal is
//!   SET 0's and nothing changed; then the others. A SET that fails after
//!   SET 0 took the change makes the answer a 502 naming the SETs with and
//!   without it (the change is idempotent: retrying it is the fix).
//! - every SET at once (health, stats, tasks, broadcast, a push split by
//!   home SET): the answers combined. A read that misses a SET is a 503
//!   naming it (partial money totals would mislead); a write that reached
//!   some SETs and not others is a 502 naming both.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::join_all;
use hongbao_cluster::directory::GATEWAYS_LISTED_MAX;
use hongbao_core::ids::{campaign_set, set_of};
use hongbao_core::limits::GROUP_MEMBERS_MAX;
use hongbao_core::sets::{home_set, SetId};
use hongbao_core::ID_MAX;
use hongbao_proto::ErrorCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::client::{SetAnswer, SetError, SetErrorKind};
use super::ClusterState;
use crate::error::ApiError;
use crate::extract::{parse_json, PathId};

type Shared = State<Arc<ClusterState>>;

/// A cluster task id is `set << TASK_SET_SHIFT | id`, `id` being the task's
/// id on its SET: below 2^37 for the largest cluster, so it survives JSON.
pub const TASK_SET_SHIFT: u32 = 32;
const TASK_ID_MASK: u64 = (1 << TASK_SET_SHIFT) - 1;

/// The cluster's id of task `id` of SET `set`; `None` for an id of 2^32 or
/// more (four billion broadcasts on one SET since its start).
pub fn cluster_task_id(set: SetId, id: u64) -> Option<u64> {
    (id >> TASK_SET_SHIFT == 0).then(|| u64::from(set) << TASK_SET_SHIFT | id)
}

/// The SET and its task id in a cluster task id (`None`: it names no SET
/// a cluster can have).
pub fn split_task_id(id: u64) -> Option<(SetId, u64)> {
    let set = SetId::try_from(id >> TASK_SET_SHIFT).ok()?;
    Some((set, id & TASK_ID_MASK))
}

// ---- errors -----------------------------------------------------------------

impl From<SetError> for ApiError {
    fn from(e: SetError) -> ApiError {
        let (status, advice) = match &e.kind {
            SetErrorKind::Connect(_) => (StatusCode::SERVICE_UNAVAILABLE, "nothing was done there; retry later"),
            SetErrorKind::TimedOut(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "the request may have been done there; retry it (a request with a key is done once)",
            ),
            _ => (
                StatusCode::BAD_GATEWAY,
                "the request may have been done there; retry it (a request with a key is done once)",
            ),
        };
        ApiError::new(status, ErrorCode::Unavailable, format!("{e}; {advice}"))
    }
}

impl IntoResponse for SetError {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

/// A SET that did not do what it was asked.
enum Failure {
    /// It answered, with an error status.
    Refused(SetAnswer),
    /// No usable answer.
    Unreached(SetError),
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Refused(answer) => answer.describe(),
            Failure::Unreached(e) => e.kind.to_string(),
        }
    }

    fn entry(&self, set: SetId) -> Value {
        let status = match self {
            Failure::Refused(answer) => json!(answer.status.as_u16()),
            Failure::Unreached(_) => Value::Null,
        };
        json!({"set": set, "status": status, "error": self.describe()})
    }

    /// Passed on as the whole answer (when no SET did anything).
    fn into_response(self) -> Response {
        match self {
            Failure::Refused(answer) => pass(answer),
            Failure::Unreached(e) => e.into_response(),
        }
    }
}

/// What one request sent to several SETs did on each.
struct Spread {
    done: Vec<(SetId, SetAnswer)>,
    failed: Vec<(SetId, Failure)>,
}

impl Spread {
    fn of(results: Vec<(SetId, Result<SetAnswer, SetError>)>) -> Spread {
        let mut spread = Spread { done: Vec::new(), failed: Vec::new() };
        for (set, result) in results {
            match result {
                Ok(answer) if answer.status.is_success() => spread.done.push((set, answer)),
                Ok(answer) => spread.failed.push((set, Failure::Refused(answer))),
                Err(e) => spread.failed.push((set, Failure::Unreached(e))),
            }
        }
        spread
    }

    /// 502: `what` reached some SETs and not others. `extra` fields go
    /// beside the error (the tasks a broadcast did start).
    fn partial(&self, what: &str, advice: &str, extra: Map<String, Value>) -> Response {
        let done: Vec<SetId> = self.done.iter().map(|(set, _)| *set).collect();
        let failed: Vec<SetId> = self.failed.iter().map(|(set, _)| *set).collect();
        let why: Vec<String> = self.failed.iter().map(|(set, f)| format!("SET {set}: {}", f.describe())).collect();
        let message =
            format!("{what} reached {} but not {} ({}); {advice}", named(&done), named(&failed), why.join("; "));
        let mut body = Map::new();
        body.insert("error".into(), json!({"code": ErrorCode::Unavailable, "message": message}));
        body.insert("sets_done".into(), json!(done));
        body.insert("sets_failed".into(), self.failed.iter().map(|(set, f)| f.entry(*set)).collect());
        body.extend(extra);
        tracing::warn!(what, done = ?done, failed = ?failed, "cluster admin: a request reached only some SETs");
        (StatusCode::BAD_GATEWAY, Json(Value::Object(body))).into_response()
    }

    /// 503: a read that needs every SET missed some.
    fn missing(&self, what: &str) -> Response {
        let why: Vec<String> = self.failed.iter().map(|(set, f)| format!("SET {set}: {}", f.describe())).collect();
        let failed: Vec<SetId> = self.failed.iter().map(|(set, _)| *set).collect();
        let message = format!("{what}: every SET must answer, and {} did not ({})", named(&failed), why.join("; "));
        let body = json!({
            "error": {"code": ErrorCode::Unavailable, "message": message},
            "sets_failed": self.failed.iter().map(|(set, f)| f.entry(*set)).collect::<Vec<_>>(),
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `SET 1`, `SETs 0, 2`.
fn named(sets: &[SetId]) -> String {
    match sets {
        [one] => format!("SET {one}"),
        more => format!("SETs {}", more.iter().map(SetId::to_string).collect::<Vec<_>>().join(", ")),
    }
}

// ---- passing through --------------------------------------------------------

/// A SET's answer as the cluster admin's: status, content type and body.
fn pass(answer: SetAnswer) -> Response {
    let content_type = answer.content_type.unwrap_or(HeaderValue::from_static("application/json"));
    let mut response = (answer.status, answer.body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    response
}

fn path_of(uri: &Uri) -> &str {
    uri.path_and_query().map_or(uri.path(), |p| p.as_str())
}

/// The request as it came, to SET `set`; its answer passed through.
async fn forward(s: &ClusterState, set: SetId, method: Method, uri: &Uri, body: Bytes) -> Response {
    match s.client.call(set, method, path_of(uri), body).await {
        Ok(answer) => pass(answer),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/accounts/{user}`, `POST …/deposit`, `POST …/withdraw`: the
/// user's home SET.
pub(crate) async fn by_user(State(s): Shared, PathId(user): PathId, method: Method, uri: Uri, body: Bytes) -> Response {
    forward(&s, home_set(user, s.client.count()), method, &uri, body).await
}

/// `GET /v1/packets/{id}`: the SET in the id; an id naming no SET of the
/// cluster is no packet.
pub(crate) async fn by_packet(State(s): Shared, PathId(id): PathId, method: Method, uri: Uri, body: Bytes) -> Response {
    let set = set_of(id);
    if set >= s.client.count() {
        return ApiError::not_found(format!("packet {id} not found")).into_response();
    }
    forward(&s, set, method, &uri, body).await
}

/// `POST /v1/packets`: the sender's home SET. A body without a readable
/// `sender` goes to SET 0, which refuses it as a single node would.
pub(crate) async fn by_sender(State(s): Shared, method: Method, uri: Uri, body: Bytes) -> Response {
    let sender = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("sender").and_then(Value::as_u64));
    let set = sender.map_or(0, |user| home_set(user, s.client.count()));
    forward(&s, set, method, &uri, body).await
}

/// `GET /v1/groups/{id}` (every SET holds a copy; SET 0's is read) and
/// `POST /v1/tokens` (every SET signs with the cluster's one secret).
pub(crate) async fn to_set_0(State(s): Shared, method: Method, uri: Uri, body: Bytes) -> Response {
    forward(&s, 0, method, &uri, body).await
}

/// `PUT /v1/groups/{id}` and `POST /v1/groups/{id}/members`: every SET, in
/// order; the answer is SET 0's.
pub(crate) async fn to_every_set(State(s): Shared, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = path_of(&uri);
    let first = match s.client.call(0, method.clone(), path, body.clone()).await {
        Ok(answer) if answer.status.is_success() => answer,
        // Refused by SET 0, or SET 0 not reached: nothing changed anywhere.
        Ok(answer) => return pass(answer),
        Err(e) => return e.into_response(),
    };
    let mut results = vec![(0, Ok(first.clone()))];
    for set in 1..s.client.count() {
        results.push((set, s.client.call(set, method.clone(), path, body.clone()).await));
    }
    let spread = Spread::of(results);
    if spread.failed.is_empty() {
        return pass(first);
    }
    spread.partial("the group change", "it is idempotent: retry it", Map::new())
}

// ---- health, metrics, stats ------------------------------------------------

/// Every SET asked the same thing at once, answers in SET order.
async fn ask_every_set(
    s: &ClusterState,
    method: Method,
    path: &str,
    body: Bytes,
) -> Vec<(SetId, Result<SetAnswer, SetError>)> {
    let sets: Vec<SetId> = (0..s.client.count()).collect();
    let calls = sets.iter().map(|&set| s.client.call(set, method.clone(), path, body.clone()));
    sets.iter().copied().zip(join_all(calls).await).collect()
}

/// `GET /health`: 200 if every SET answers 200, else 503; each SET's
/// status either way.
pub(crate) async fn health(State(s): Shared) -> Response {
    let mut all_ok = true;
    let mut sets = Vec::new();
    for (set, result) in ask_every_set(&s, Method::GET, "/health", Bytes::new()).await {
        let admin = s.client.addr(set).to_string();
        let mut entry = match result {
            Ok(answer) => {
                all_ok &= answer.status == StatusCode::OK;
                match answer.json() {
                    Value::Object(body) if body.get("status").is_some_and(Value::is_string) => body,
                    _ => {
                        let mut entry = Map::new();
                        entry.insert("status".into(), json!(format!("HTTP {}", answer.status.as_u16())));
                        entry
                    }
                }
            }
            Err(e) => {
                all_ok = false;
                let mut entry = Map::new();
                entry.insert("status".into(), json!(format!("unreachable: {}", e.kind)));
                entry
            }
        };
        entry.insert("set".into(), json!(set));
        entry.insert("admin".into(), json!(admin));
        sets.push(Value::Object(entry));
    }
    let (status, word) = if all_ok { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "unavailable") };
    (status, Json(json!({"status": word, "sets": sets}))).into_response()
}

/// `GET /metrics`: this process's own metrics (requests by route, calls to
/// SETs that failed). The money totals are each SET's, on its own
/// `/metrics`.
pub(crate) async fn metrics(State(s): Shared) -> Response {
    match &s.prometheus {
        Some(prometheus) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], prometheus.render()).into_response()
        }
        None => crate::routes::no_route().await.into_response(),
    }
}

/// `GET /v1/gateways`: the live gateways in the cluster's directory, least
/// loaded first (at most `GATEWAYS_LISTED_MAX`); 503 while its Redis is
/// unreachable, 404 if the cluster has no directory.
pub(crate) async fn gateways(State(s): Shared) -> Response {
    let Some(directory) = &s.directory else {
        return ApiError::not_found(
            "this cluster has no gateway directory: the cluster file has no `redis = \"redis://host:port\"`",
        )
        .into_response();
    };
    match directory.list(GATEWAYS_LISTED_MAX).await {
        Ok(gateways) => Json(json!({ "gateways": gateways })).into_response(),
        Err(e) => {
            metrics::counter!("hongbao_directory_errors_total").increment(1);
            tracing::warn!(error = %e, "cluster admin: cannot read the gateway directory");
            let message = format!("the gateway directory cannot be read ({e}); retry later");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, message).into_response()
        }
    }
}

/// `GET /v1/stats`: every numeric field summed over the SETs, and each
/// SET's stats as it answered (`sets`); 503 if a SET did not answer.
pub(crate) async fn stats(State(s): Shared) -> Response {
    let mut spread = Spread::of(ask_every_set(&s, Method::GET, "/v1/stats", Bytes::new()).await);
    // An answer that is not an object cannot be summed: that SET failed.
    let mut bodies = Vec::new();
    for (set, answer) in std::mem::take(&mut spread.done) {
        match answer.json() {
            Value::Object(body) => bodies.push(body),
            _ => {
                let e = s.client.bad_answer(set, "stats that are not a JSON object");
                spread.failed.push((set, Failure::Unreached(e)));
            }
        }
    }
    if !spread.failed.is_empty() {
        spread.failed.sort_by_key(|(set, _)| *set);
        return spread.missing("the cluster's stats");
    }
    (StatusCode::OK, Json(sum_stats(bodies))).into_response()
}

/// The sum of every integer field but `set` and `sets`, plus `sets`: the
/// SETs' own stats in SET order.
pub(crate) fn sum_stats(per_set: Vec<Map<String, Value>>) -> Value {
    let mut sums: BTreeMap<String, i128> = BTreeMap::new();
    for body in &per_set {
        for (name, value) in body {
            if name == "set" || name == "sets" {
                continue;
            }
            if let Some(n) = value.as_i64().map(i128::from).or_else(|| value.as_u64().map(i128::from)) {
                *sums.entry(name.clone()).or_default() += n;
            }
        }
    }
    let mut out = Map::new();
    for (name, n) in sums {
        let value = match (i64::try_from(n), u64::try_from(n)) {
            (Ok(n), _) => json!(n),
            (_, Ok(n)) => json!(n),
            // Past u64 only with 32 SETs each near u64::MAX: say it as a float.
            _ => json!(n as f64),
        };
        out.insert(name, value);
    }
    out.insert("sets".into(), Value::Array(per_set.into_iter().map(Value::Object).collect()));
    Value::Object(out)
}

// ---- push -------------------------------------------------------------------

/// `POST /v1/push`, as the single node reads it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    target: PushTarget,
    #[serde(default)]
    persistent: bool,
    topic: String,
    text: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum PushTarget {
    User(u64),
    Users(Vec<u64>),
    Group(u64),
}

fn check_id(id: u64, what: &str) -> Result<(), ApiError> {
    if id == 0 || id > ID_MAX {
        return Err(ApiError::invalid(format!("{what} id {id} is not between 1 and 2^53-1")));
    }
    Ok(())
}

/// `POST /v1/push`: the targets split by home SET (a group's members read
/// from SET 0's copy first), one push per SET with its users at once; the
/// answer sums the SETs' `targets`, `delivered` and `stored`. The request
/// is checked whole first (ids, at most 500 users), so a SET refuses only
/// for what it alone knows (its storage failing).
pub(crate) async fn push(State(s): Shared, body: Bytes) -> Response {
    match push_split(&s, &body).await {
        Ok(response) | Err(response) => response,
    }
}

async fn push_split(s: &ClusterState, body: &[u8]) -> Result<Response, Response> {
    let request: PushRequest = parse_json(body).map_err(IntoResponse::into_response)?;
    let mut users = match request.target {
        PushTarget::User(user) => vec![user],
        PushTarget::Users(users) => users,
        PushTarget::Group(group) => {
            check_id(group, "group").map_err(IntoResponse::into_response)?;
            group_members(s, group).await?
        }
    };
    for &user in &users {
        check_id(user, "user").map_err(IntoResponse::into_response)?;
    }
    // A user listed twice is one target, as on a single node.
    users.sort_unstable();
    users.dedup();
    if users.len() > GROUP_MEMBERS_MAX {
        let message = format!("at most {GROUP_MEMBERS_MAX} users per push; use a broadcast");
        return Err(ApiError::invalid(message).into_response());
    }
    let count = s.client.count();
    let mut by_set: Vec<Vec<u64>> = vec![Vec::new(); usize::from(count)];
    for user in users {
        by_set[usize::from(home_set(user, count))].push(user);
    }
    let calls: Vec<(SetId, Bytes)> = by_set
        .into_iter()
        .enumerate()
        .filter(|(_, users)| !users.is_empty())
        .map(|(set, users)| {
            let body = json!({"target": {"users": users}, "persistent": request.persistent,
                              "topic": request.topic, "text": request.text});
            (set as SetId, Bytes::from(body.to_string()))
        })
        .collect();
    let answers = join_all(calls.iter().map(|(set, body)| s.client.call(*set, Method::POST, "/v1/push", body.clone())));
    let spread = Spread::of(calls.iter().map(|(set, _)| *set).zip(answers.await).collect());
    if spread.done.is_empty() {
        if let Some((_, failure)) = spread.failed.into_iter().next() {
            return Err(failure.into_response());
        }
    } else if !spread.failed.is_empty() {
        let advice = "retrying sends it again to the users of the SETs it reached";
        return Err(spread.partial("the push", advice, Map::new()));
    }
    let mut receipt = json!({"targets": 0, "delivered": 0, "stored": 0});
    for (_, answer) in &spread.done {
        let body = answer.json();
        for field in ["targets", "delivered", "stored"] {
            let sum = receipt[field].as_u64().unwrap_or(0) + body[field].as_u64().unwrap_or(0);
            receipt[field] = json!(sum);
        }
    }
    Ok((StatusCode::OK, Json(receipt)).into_response())
}

/// A group's members from SET 0's copy; SET 0's answer if it has none.
async fn group_members(s: &ClusterState, group: u64) -> Result<Vec<u64>, Response> {
    let answer = s.client.call(0, Method::GET, &format!("/v1/groups/{group}"), Bytes::new()).await;
    let answer = answer.map_err(IntoResponse::into_response)?;
    if !answer.status.is_success() {
        return Err(pass(answer));
    }
    serde_json::from_value(answer.json()["members"].clone())
        .map_err(|_| s.client.bad_answer(0, "a group without a list of members").into_response())
}

// ---- broadcast and tasks ----------------------------------------------------

/// A SET's task as the cluster shows it: the cluster task id and `set`.
fn cluster_task(s: &ClusterState, set: SetId, task: Value) -> Result<Value, SetError> {
    let Value::Object(mut task) = task else { return Err(s.client.bad_answer(set, "a task that is not an object")) };
    let id = task.get("id").and_then(Value::as_u64).and_then(|id| cluster_task_id(set, id));
    let Some(id) = id else { return Err(s.client.bad_answer(set, "a task without an id below 2^32")) };
    task.insert("id".into(), json!(id));
    task.insert("set".into(), json!(set));
    Ok(Value::Object(task))
}

/// `POST /v1/broadcast`: started on every SET at once (each reaches its own
/// users' connections). 202 with each SET's task and the sum of their
/// `targets`.
pub(crate) async fn broadcast(State(s): Shared, body: Bytes) -> Response {
    let spread = Spread::of(ask_every_set(&s, Method::POST, "/v1/broadcast", body).await);
    let mut tasks = Vec::new();
    let mut targets = 0u64;
    for (set, answer) in &spread.done {
        let task = answer.json();
        targets += task["targets"].as_u64().unwrap_or(0);
        match cluster_task(&s, *set, task) {
            Ok(task) => tasks.push(task),
            Err(e) => return e.into_response(),
        }
    }
    if spread.done.is_empty() {
        if let Some((_, failure)) = spread.failed.into_iter().next() {
            return failure.into_response();
        }
    } else if !spread.failed.is_empty() {
        let mut extra = Map::new();
        extra.insert("tasks".into(), Value::Array(tasks));
        let advice = "the tasks started are listed; retrying starts it again where it did start";
        return spread.partial("the broadcast", advice, extra);
    }
    (StatusCode::ACCEPTED, Json(json!({"targets": targets, "tasks": tasks}))).into_response()
}

/// `GET /v1/tasks`: every SET's tasks, SET by SET, each with its `set` and
/// cluster id; 503 if a SET did not answer.
pub(crate) async fn tasks(State(s): Shared) -> Response {
    let mut spread = Spread::of(ask_every_set(&s, Method::GET, "/v1/tasks", Bytes::new()).await);
    let mut all = Vec::new();
    for (set, answer) in std::mem::take(&mut spread.done) {
        let listed = match answer.json() {
            Value::Array(listed) => listed.into_iter().map(|task| cluster_task(&s, set, task)).collect(),
            _ => Err(s.client.bad_answer(set, "a task list that is not an array")),
        };
        match listed {
            Ok(listed) => all.extend::<Vec<Value>>(listed),
            Err(e) => spread.failed.push((set, Failure::Unreached(e))),
        }
    }
    if !spread.failed.is_empty() {
        spread.failed.sort_by_key(|(set, _)| *set);
        return spread.missing("the task list");
    }
    (StatusCode::OK, Json(Value::Array(all))).into_response()
}

/// `GET /v1/tasks/{id}`: the task's SET, by the cluster task id.
pub(crate) async fn task(State(s): Shared, PathId(id): PathId) -> Response {
    one_task(&s, id, false).await
}

/// `POST /v1/tasks/{id}/stop`.
pub(crate) async fn stop_task(State(s): Shared, PathId(id): PathId) -> Response {
    one_task(&s, id, true).await
}

async fn one_task(s: &ClusterState, id: u64, stop: bool) -> Response {
    let not_found = || ApiError::not_found(format!("task {id} not found")).into_response();
    let Some((set, local)) = split_task_id(id).filter(|(set, local)| *set < s.client.count() && *local != 0) else {
        return not_found();
    };
    let (method, path) = if stop {
        (Method::POST, format!("/v1/tasks/{local}/stop"))
    } else {
        (Method::GET, format!("/v1/tasks/{local}"))
    };
    match s.client.call(set, method, &path, Bytes::new()).await {
        Ok(answer) if answer.status.is_success() => match cluster_task(s, set, answer.json()) {
            Ok(task) => (answer.status, Json(task)).into_response(),
            Err(e) => e.into_response(),
        },
        Ok(answer) if answer.status == StatusCode::NOT_FOUND => not_found(),
        Ok(answer) => pass(answer),
        Err(e) => e.into_response(),
    }
}

// ---- campaigns ----------------------------------------------------------

/// How long a start or stop waits for a SET's part of a campaign that is
/// not funded there yet (its `fund` still in flight), ms.
pub(crate) const CAMPAIGN_PART_WAIT_MS: u64 = 5_000;
const CAMPAIGN_PART_RETRY_MS: u64 = 100;

/// The home SET of campaign `id` (its id carries it), if the cluster has it.
fn campaign_home(s: &ClusterState, id: u64) -> Option<SetId> {
    Some(campaign_set(id)).filter(|&set| set < s.client.count() && id != 0)
}

fn no_campaign(id: u64) -> Response {
    ApiError::not_found(format!("campaign {id} not found")).into_response()
}

/// `POST /v1/campaigns`: the funder's home SET, which splits the campaign
/// over the SETs and, in the same commit, funds every other SET's part
/// through its outbox. The answer is the home SET's (its own part). A body
/// without a readable `funder` goes to SET 0, which refuses it.
pub(crate) async fn create_campaign(State(s): Shared, method: Method, uri: Uri, body: Bytes) -> Response {
    let funder = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("funder").and_then(Value::as_u64));
    let set = funder.map_or(0, |user| home_set(user, s.client.count()));
    forward(&s, set, method, &uri, body).await
}

/// `GET /v1/campaigns`: every SET's parts, one entry per campaign with its
/// parts summed (`sum_campaign`); 503 if a SET did not answer.
pub(crate) async fn list_campaigns(State(s): Shared) -> Response {
    let mut spread = Spread::of(ask_every_set(&s, Method::GET, "/v1/campaigns", Bytes::new()).await);
    let mut by_id: BTreeMap<u64, Vec<(SetId, Value)>> = BTreeMap::new();
    for (set, answer) in std::mem::take(&mut spread.done) {
        match answer.json() {
            Value::Array(parts) => {
                for part in parts {
                    match part.get("id").and_then(Value::as_u64) {
                        Some(id) => by_id.entry(id).or_default().push((set, part)),
                        None => spread
                            .failed
                            .push((set, Failure::Unreached(s.client.bad_answer(set, "a campaign without an id")))),
                    }
                }
            }
            _ => spread
                .failed
                .push((set, Failure::Unreached(s.client.bad_answer(set, "a campaign list that is not an array")))),
        }
    }
    if !spread.failed.is_empty() {
        spread.failed.sort_by_key(|(set, _)| *set);
        return spread.missing("the campaign list");
    }
    let all: Vec<Value> = by_id.into_iter().map(|(id, parts)| sum_campaign(campaign_set(id), parts)).collect();
    (StatusCode::OK, Json(Value::Array(all))).into_response()
}

/// `GET /v1/campaigns/{id}`: every SET's part, summed. The home SET's 404
/// is the answer (no such campaign); another SET's 404 is a part not funded
/// yet, named in `sets_unfunded`. 503 if a SET did not answer.
pub(crate) async fn get_campaign(State(s): Shared, PathId(id): PathId) -> Response {
    campaign_sum(&s, id).await
}

async fn campaign_sum(s: &ClusterState, id: u64) -> Response {
    let Some(home) = campaign_home(s, id) else { return no_campaign(id) };
    let path = format!("/v1/campaigns/{id}");
    let mut spread = Spread::of(ask_every_set(s, Method::GET, &path, Bytes::new()).await);
    let mut unfunded = Vec::new();
    spread.failed.retain(|(set, f)| match f {
        Failure::Refused(answer) if answer.status == StatusCode::NOT_FOUND && *set != home => {
            unfunded.push(*set);
            false
        }
        _ => true,
    });
    if let Some(pos) = spread
        .failed
        .iter()
        .position(|(set, f)| *set == home && matches!(f, Failure::Refused(a) if a.status == StatusCode::NOT_FOUND))
    {
        return spread.failed.swap_remove(pos).1.into_response();
    }
    if !spread.failed.is_empty() {
        return spread.missing(&format!("campaign {id}"));
    }
    let parts = spread.done.into_iter().map(|(set, answer)| (set, answer.json())).collect();
    let mut sum = sum_campaign(home, parts);
    sum["sets_unfunded"] = json!(unfunded);
    (StatusCode::OK, Json(sum)).into_response()
}

/// One campaign of the cluster from its SETs' parts: the home part's fields,
/// with `total_fen`, `rate_per_s`, a Count rule's `packets`, `released`,
/// `won`, `won_fen`, `refunded_fen` and `escrow_fen` summed over the parts
/// (so total and rate are the whole campaign's once every part is funded),
/// `status` running if any part runs, else the home part's; `sets` names the
/// SETs that have a part.
pub(crate) fn sum_campaign(home: SetId, parts: Vec<(SetId, Value)>) -> Value {
    let mut sum = parts
        .iter()
        .find(|(set, _)| *set == home)
        .or_else(|| parts.first())
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| json!({}));
    for field in ["total_fen", "rate_per_s", "released", "won", "won_fen", "refunded_fen", "escrow_fen"] {
        let total: i64 = parts.iter().filter_map(|(_, v)| v.get(field).and_then(Value::as_i64)).sum();
        sum[field] = json!(total);
    }
    if sum["rule"].get("count").is_some() {
        let packets: u64 = parts.iter().filter_map(|(_, v)| v["rule"]["count"]["packets"].as_u64()).sum();
        sum["rule"]["count"]["packets"] = json!(packets);
    }
    if parts.iter().any(|(_, v)| v["status"] == "running") {
        sum["status"] = json!("running");
    }
    sum["home_set"] = json!(home);
    sum["sets"] = json!(parts.iter().map(|(set, _)| *set).collect::<Vec<_>>());
    sum
}

/// `POST /v1/campaigns/{id}/start`: every SET's part at once (they have
/// the same id). The home SET's refusal (no such campaign, closed) is the
/// answer, and nothing is asked of the others; another SET's 404 is a part
/// whose fund is still in flight, asked again for up to
/// `CAMPAIGN_PART_WAIT_MS`; then a 502 names the SETs not done. Done
/// everywhere: the campaign, summed, as `GET` answers it.
pub(crate) async fn start_campaign(State(s): Shared, PathId(id): PathId) -> Response {
    campaign_everywhere(&s, id, "start").await
}

/// `POST /v1/campaigns/{id}/stop`: like start. Each part returns its
/// unreleased money to the funder (another SET's through its outbox); a
/// second stop returns nothing.
pub(crate) async fn stop_campaign(State(s): Shared, PathId(id): PathId) -> Response {
    campaign_everywhere(&s, id, "stop").await
}

async fn campaign_everywhere(s: &ClusterState, id: u64, action: &str) -> Response {
    let Some(home) = campaign_home(s, id) else { return no_campaign(id) };
    let path = format!("/v1/campaigns/{id}/{action}");
    let first = match s.client.call(home, Method::POST, &path, Bytes::new()).await {
        Ok(answer) if answer.status.is_success() => answer,
        Ok(answer) => return pass(answer),
        Err(e) => return e.into_response(),
    };
    let others: Vec<SetId> = (0..s.client.count()).filter(|&set| set != home).collect();
    let calls = others.iter().map(|&set| part_action(s, set, &path));
    let mut results = vec![(home, Ok(first))];
    results.extend(others.iter().copied().zip(join_all(calls).await));
    let spread = Spread::of(results);
    if !spread.failed.is_empty() {
        let advice = "a part not funded yet waits for its SET to apply the fund; retry it (it is idempotent)";
        return spread.partial(&format!("the {action} of campaign {id}"), advice, Map::new());
    }
    campaign_sum(s, id).await
}

/// One SET's part of a start or stop, asked again while the SET answers
/// 404 (its fund not applied yet), for up to `CAMPAIGN_PART_WAIT_MS`.
async fn part_action(s: &ClusterState, set: SetId, path: &str) -> Result<SetAnswer, SetError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(CAMPAIGN_PART_WAIT_MS);
    loop {
        let answer = s.client.call(set, Method::POST, path, Bytes::new()).await?;
        if answer.status != StatusCode::NOT_FOUND || tokio::time::Instant::now() >= deadline {
            return Ok(answer);
        }
        tokio::time::sleep(std::time::Duration::from_millis(CAMPAIGN_PART_RETRY_MS)).await;
    }
}
