//! The cluster admin (`hongbao cluster-admin`): one operator API over every
//! SET of a cluster, serving the same paths and bodies as a single server's
//! admin API (docs/api.md, "The cluster admin") by calling the SETs' own
//! admin APIs over HTTP.
//!
//! Owns: which SET answers each route (`routes`: a user's home SET, the SET
//! in a packet id, SET 0, or every SET), how answers of several SETs become
//! one (sums, lists, a 502 naming the SETs a change did and did not reach),
//! the cluster's broadcast task ids (`set << 32 | id`), and the HTTP client
//! of the SETs (`client`: timeouts, a bound on calls in flight, a typed
//! error naming the SET). The HTTP server, the key check, the error body
//! and the request counts are the single node's (`crate::server`,
//! `crate::conn`, `crate::guard`, `crate::error`).
//!
//! Also the one route that is no SET's: `GET /v1/gateways`, the live
//! gateways from the cluster's directory in Redis (`hongbao_cluster::
//! directory`), public like `/health` because clients call it to pick a
//! gateway; it shows only what the gateways advertise.
//!
//! Must not: decide anything a SET decides, or link an engine: it holds no
//! `hongbao_shard::Engine` and moves no money itself. Every check of a
//! request's content is the SET's (a request the cluster admin cannot
//! route, such as a body that is not JSON, goes to SET 0 for its answer),
//! except where a request is split over SETs (`/v1/push`), which is checked
//! whole first so that a refusal never leaves it half done.

mod client;
mod routes;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use hongbao_cluster::Directory;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use client::{SetAnswer, SetClient, SetError, SetErrorKind};
pub use routes::{cluster_task_id, split_task_id, TASK_SET_SHIFT};

use crate::{limits, AdminError, AdminLimits, RouteCtx};

/// Where the cluster admin listens and which SETs it serves.
#[derive(Clone, Debug)]
pub struct ClusterAdminConfig {
    /// Listen address; port 0 picks a free port.
    pub addr: SocketAddr,
    /// Operators must send this key on every `/v1` route, and it is sent on
    /// to the SETs (a cluster has one admin key). `None`: open (dev mode).
    pub api_key: Option<String>,
    pub dev: bool,
    /// Each SET's admin API, SET 0 first (the cluster file's order).
    pub sets: Vec<SocketAddr>,
    /// Connection cap and timeouts of the cluster admin's own server.
    pub limits: AdminLimits,
    /// One call to a SET: connect, request and the whole answer
    /// (`limits::SET_CALL_TIMEOUT_MS`).
    pub set_timeout: Duration,
    /// The gateway directory's Redis (`redis://host:port`), read by
    /// `GET /v1/gateways`; `None`: the cluster has no directory (404).
    pub redis: Option<String>,
}

impl ClusterAdminConfig {
    /// The production bounds for `sets`, listening on `addr`.
    pub fn new(addr: SocketAddr, api_key: Option<String>, dev: bool, sets: Vec<SocketAddr>) -> ClusterAdminConfig {
        ClusterAdminConfig {
            addr,
            api_key,
            dev,
            sets,
            limits: AdminLimits::default(),
            set_timeout: Duration::from_millis(limits::SET_CALL_TIMEOUT_MS),
            redis: None,
        }
    }
}

/// What every cluster handler shares.
pub(crate) struct ClusterState {
    pub(crate) client: SetClient,
    /// Renders `/metrics` (this process's own metrics); `None`: no
    /// `/metrics` route.
    pub(crate) prometheus: Option<PrometheusHandle>,
    /// The gateway directory; `None`: the cluster has none.
    pub(crate) directory: Option<Directory>,
}

/// Binds `config.addr` and serves the cluster admin until `shutdown`
/// becomes `true`, on the same bounded server as the single node's API.
/// Returns the bound address and the server task.
pub async fn start(
    config: ClusterAdminConfig,
    prometheus: Option<PrometheusHandle>,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), AdminError> {
    let sets = config.sets.len();
    if sets == 0 || sets > usize::from(hongbao_core::sets::SETS_MAX) {
        return Err(AdminError::Config(format!(
            "a cluster has 1 to {} SETs, got {sets}",
            hongbao_core::sets::SETS_MAX
        )));
    }
    if config.set_timeout.is_zero() {
        return Err(AdminError::Config("the SET call timeout must be at least 1 ms".into()));
    }
    let directory = match &config.redis {
        Some(url) => Some(Directory::new(url).map_err(|e| AdminError::Config(e.to_string()))?),
        None => None,
    };
    let (listener, addr) = crate::bind(config.addr, config.api_key.as_deref(), &config.limits).await?;
    let client = SetClient::new(
        config.sets,
        config.api_key.as_deref(),
        config.set_timeout,
        limits::SET_CALLS_MAX,
        limits::SET_ANSWER_BYTES_MAX,
    )
    .map_err(AdminError::Config)?;
    crate::log_listening("cluster admin API", addr, config.api_key.is_some(), config.dev);
    let api_key = config.api_key.as_deref().map(Arc::from);
    let app = router(Arc::new(ClusterState { client, prometheus, directory }), api_key);
    Ok((addr, crate::spawn_server(listener, app, config.limits, shutdown)))
}

type Handlers = MethodRouter<Arc<ClusterState>>;

/// `/v1` routes of the cluster admin that need no key: the gateway list
/// reveals only the addresses gateways advertise to clients anyway.
const PUBLIC_PATHS: &[&str] = &["/v1/gateways"];

/// Every route of the cluster admin, with its handlers. Its paths are the
/// single node's (`crate::route_table`); what is not here is a 404.
fn route_list() -> Vec<(&'static str, Handlers)> {
    use routes as r;
    vec![
        ("/health", get(r::health)),
        ("/metrics", get(r::metrics)),
        // Public: clients pick a gateway here (`PUBLIC_PATHS`).
        ("/v1/gateways", get(r::gateways)),
        ("/v1/stats", get(r::stats)),
        ("/v1/accounts/{user}", get(r::by_user)),
        ("/v1/accounts/{user}/deposit", post(r::by_user)),
        ("/v1/accounts/{user}/withdraw", post(r::by_user)),
        ("/v1/packets", post(r::by_sender)),
        ("/v1/packets/{id}", get(r::by_packet)),
        ("/v1/groups/{id}", get(r::to_set_0).put(r::to_every_set)),
        ("/v1/groups/{id}/members", post(r::to_every_set)),
        ("/v1/push", post(r::push)),
        ("/v1/broadcast", post(r::broadcast)),
        ("/v1/tasks", get(r::tasks)),
        ("/v1/tasks/{id}", get(r::task)),
        ("/v1/tasks/{id}/stop", post(r::stop_task)),
        ("/v1/tokens", post(r::to_set_0)),
        // A campaign is split over the SETs: created on the funder's home
        // SET, its parts (same id on every SET) started, stopped and read
        // together.
        ("/v1/campaigns", get(r::list_campaigns).post(r::create_campaign)),
        ("/v1/campaigns/{id}", get(r::get_campaign)),
        ("/v1/campaigns/{id}/start", post(r::start_campaign)),
        ("/v1/campaigns/{id}/stop", post(r::stop_campaign)),
    ]
}

fn router(state: Arc<ClusterState>, api_key: Option<Arc<str>>) -> Router {
    let mut r = Router::new();
    for (path, handlers) in route_list() {
        let auth = crate::needs_key(path) && !PUBLIC_PATHS.contains(&path);
        let ctx = RouteCtx { path: Arc::from(path), auth, api_key: api_key.clone() };
        r = r.route(path, handlers.layer(middleware::from_fn_with_state(ctx, crate::guard)));
    }
    r.fallback(crate::routes::no_route)
        .method_not_allowed_fallback(crate::routes::wrong_method)
        .layer(middleware::from_fn(crate::count))
        .layer(DefaultBodyLimit::max(crate::BODY_BYTES_MAX))
        .with_state(state)
}
