//! The operator HTTP API: JSON over HTTP/1.1 beside the gateway.
//!
//! Owns: the routes under `/v1` (accounts, groups, packets, campaigns,
//! pushes and broadcast tasks, client tokens, stats, and the live figures
//! `hongbao-watch` makes: `/v1/live`, `/v1/live/now`, `/v1/alerts`), API-key
//! authentication of operators, the error format
//! (`{"error":{"code","message"}}`) and its HTTP statuses, `/health`, the
//! Prometheus scrape endpoint `/metrics` (money totals only for the key),
//! the web pages compiled into the binary (`ui`: the dashboard at `/`, the
//! user page at `/app`, their files under `/ui/`), the live figures and
//! alerts (`live`, read from `hongbao-watch`), the API's OpenAPI 3.1
//! document `/openapi.json` (generated from the handlers' annotations,
//! `openapi`), and its own HTTP server: the accept loop, the connection cap
//! and every time and size bound on a connection (`limits`). The route list
//! and examples are in `docs/api.md`. `cluster` is the cluster admin: the
//! same paths over every SET of a cluster, answered by the SETs' own admin
//! APIs over HTTP, on the same server (`bind`, `spawn_server`) with the same
//! key check (`guard`); it holds no `Engine`.
//!
//! **One route list.** `route_table` lists every API handler once; its
//! `#[utoipa::path]` names the method and path. The router registers each
//! handler there and `openapi` documents it from the same list, so a route
//! is served if and only if it is documented (checked by the tests, with
//! docs/api.md's route table). The web pages (`ui::pages`) are not API
//! routes: they are registered beside the table and not in the document.
//!
//! The server (`server`, `conn`) is hyper's HTTP/1.1 connection under our
//! own accept loop, because `axum::serve` bounds nothing: a peer that sends
//! half a request and goes quiet held a connection forever (issue 9).
//! - **Cap:** a semaphore permit per connection, taken at accept; over the
//!   cap a connection is closed at once and counted.
//! - **Time:** a head must arrive within the header timeout, a body within
//!   the body timeout (else 408), the next request within the idle
//!   timeout; a failing `accept` backs off and logs at most once per
//!   interval.
//! - **Keep-alive is honest:** every body is read (bounded) before routing,
//!   so an answer never goes out with its body unread, which is when hyper
//!   closes the connection under the client; the few answers sent before
//!   the body was read say `Connection: close`.
//! - **Shutdown:** stop accepting, let requests in flight finish within a
//!   grace, drop the rest, end the task.
//!
//! Must not: hold money rules, packet state or SQL. Every decision is the
//! engine's (a SET's, for `cluster`); a handler only parses, calls
//! `hongbao_shard::Engine` (or a SET's admin API), and maps the answer to
//! JSON and a status. A packet sent through this API goes through
//! `Engine::call` exactly like one sent over a client connection, so there
//! is no second, subtly different path for money to move.

pub mod cluster;
mod conn;
mod error;
mod extract;
pub mod limits;
mod live;
mod openapi;
mod routes;
mod server;
#[cfg(test)]
mod tests;
mod ui;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Router;
use hongbao_boundary::TokenSigner;
use hongbao_shard::Engine;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use utoipa_axum::router::UtoipaMethodRouter;
use utoipa_axum::routes;

pub use error::{status_for, ApiError};
pub use live::{AlertsBody, EngineFeed};
/// The OpenAPI 3.1 document `/openapi.json` serves.
pub use openapi::document as openapi_document;
pub use routes::{TOKEN_TTL_S_DEFAULT, TOKEN_TTL_S_MAX};

pub use limits::BODY_BYTES_MAX;
/// The request bodies as the handlers parse them, for the fuzz targets.
#[cfg(fuzzing)]
pub use routes::fuzz;

/// Where and how the admin API listens.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Listen address; port 0 picks a free port (see the address `start`
    /// returns).
    pub addr: SocketAddr,
    /// Operators must send this key (`Authorization: Bearer <key>` or
    /// `x-api-key: <key>`) on every `/v1` route. `None` leaves the API open,
    /// which `serve` only does in dev mode.
    pub api_key: Option<String>,
    /// Dev mode: changes how loudly an open API is reported, and the user
    /// page says that a bare user id works as a token.
    pub dev: bool,
    /// The gateway's WebSocket address as bound, for the user page
    /// (`/ui/config.json` tells it the port). `None`: no gateway beside this
    /// API.
    pub ws_addr: Option<SocketAddr>,
    /// Connection cap and timeouts.
    pub limits: AdminLimits,
    /// A dependency besides storage whose failure `/health` reports (a
    /// SET's NATS relay): why it fails now, or `None`. Money still moves
    /// while it fails, so `/health` says `degraded` with 200.
    pub dependency: Option<DependencyProbe>,
}

/// Reads a dependency's failure now (`AdminConfig::dependency`).
#[derive(Clone)]
pub struct DependencyProbe(pub Arc<dyn Fn() -> Option<String> + Send + Sync>);

impl std::fmt::Debug for DependencyProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DependencyProbe")
    }
}

/// The bounds the server holds its connections to. `Default` gives the
/// production values from `limits`, where each one's reason is written; tests
/// shorten them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections held at once (`limits::ADMIN_CONNECTIONS_MAX`).
    pub connections_max: usize,
    /// `limits::HEADER_READ_TIMEOUT_MS`.
    pub header_read_timeout_ms: u64,
    /// `limits::BODY_READ_TIMEOUT_MS`.
    pub body_read_timeout_ms: u64,
    /// `limits::IDLE_TIMEOUT_MS`.
    pub idle_timeout_ms: u64,
    /// `limits::SHUTDOWN_GRACE_MS`.
    pub shutdown_grace_ms: u64,
}

impl Default for AdminLimits {
    fn default() -> AdminLimits {
        AdminLimits {
            connections_max: limits::ADMIN_CONNECTIONS_MAX,
            header_read_timeout_ms: limits::HEADER_READ_TIMEOUT_MS,
            body_read_timeout_ms: limits::BODY_READ_TIMEOUT_MS,
            idle_timeout_ms: limits::IDLE_TIMEOUT_MS,
            shutdown_grace_ms: limits::SHUTDOWN_GRACE_MS,
        }
    }
}

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid admin config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// How old a stats reading may be when served again.
const STATS_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(250);

/// What every handler shares.
pub(crate) struct AppState {
    engine: Engine,
    /// Signs the client tokens issued by `POST /v1/tokens`; the same secret
    /// the gateway verifies with.
    signer: TokenSigner,
    /// Renders `/metrics`.
    prometheus: PrometheusHandle,
    /// `None`: no authentication.
    api_key: Option<String>,
    /// The last `Engine::stats` and when it was taken. Stats sum the ledger's
    /// balances in storage, and `/metrics` needs no key: many scrapers get
    /// one reading per `STATS_MAX_AGE` instead of one scan each.
    stats: tokio::sync::Mutex<Option<(std::time::Instant, hongbao_shard::Stats)>>,
    /// What `/ui/config.json` tells the web pages.
    ui: ui::UiConfig,
    /// See `AdminConfig::dependency`.
    dependency: Option<DependencyProbe>,
    /// The per-second snapshots and alerts (`hongbao-watch`).
    live: hongbao_watch::Live,
    /// Places for `/v1/live` streams (`limits::LIVE_STREAMS_MAX`).
    live_streams: Arc<tokio::sync::Semaphore>,
    /// The server's shutdown signal: live streams end on it.
    shutdown: watch::Receiver<bool>,
}

/// Binds `config.addr` and serves until `shutdown` becomes `true` (or its
/// sender is dropped). Returns the bound address and the server task, which
/// ends once in-flight requests are answered, or `shutdown_grace_ms` after
/// the signal at the latest. Once started, nothing stops the server but the
/// signal: a failing `accept` is retried, a failing connection ends alone.
/// `/v1/live*` and `/v1/alerts` serve what `live` is given (its sampler is
/// started by the caller).
pub async fn start(
    config: AdminConfig,
    engine: Engine,
    signer: TokenSigner,
    prometheus: PrometheusHandle,
    live: hongbao_watch::Live,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), AdminError> {
    let (listener, addr) = bind(config.addr, config.api_key.as_deref(), &config.limits).await?;
    log_listening("admin API", addr, config.api_key.is_some(), config.dev);
    let ui = ui::UiConfig { ws_port: config.ws_addr.map(|a| a.port()), dev: config.dev };
    let app = router(Arc::new(AppState {
        engine,
        signer,
        prometheus,
        api_key: config.api_key,
        stats: Default::default(),
        ui,
        dependency: config.dependency,
        live,
        live_streams: Arc::new(tokio::sync::Semaphore::new(limits::LIVE_STREAMS_MAX)),
        shutdown: shutdown.clone(),
    }));
    Ok((addr, spawn_server(listener, app, config.limits, shutdown)))
}

/// What every admin server checks before it listens (a key, if any, is
/// not blank; the limits are usable), then the bound listener and its
/// address.
pub(crate) async fn bind(
    addr: SocketAddr,
    api_key: Option<&str>,
    limits: &AdminLimits,
) -> Result<(TcpListener, SocketAddr), AdminError> {
    if api_key.is_some_and(|k| k.trim().is_empty()) {
        return Err(AdminError::Config("the admin API key must not be empty".into()));
    }
    limits.validate()?;
    let listener = TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| AdminError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Says where `what` listens and how loudly it is open.
pub(crate) fn log_listening(what: &str, addr: SocketAddr, keyed: bool, dev: bool) {
    match (keyed, dev) {
        (true, _) => tracing::info!(%addr, "{what} listening (API key required)"),
        (false, true) => tracing::warn!(%addr, "{what} listening WITHOUT authentication (dev mode)"),
        (false, false) => {
            tracing::warn!(%addr, "{what} listening WITHOUT authentication: anyone who can reach it can move money")
        }
    }
}

/// Serves `router` on `listener` with the bounded HTTP server (`server`,
/// `conn`) until `shutdown`; the single node's API and the cluster admin
/// share it.
pub(crate) fn spawn_server(
    listener: TcpListener,
    router: Router,
    limits: AdminLimits,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let shared = Arc::new(conn::ConnShared::new(router, limits));
    tokio::spawn(server::serve(listener, shared, shutdown))
}

impl AdminLimits {
    fn validate(&self) -> Result<(), AdminError> {
        if self.connections_max == 0 || self.connections_max > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(AdminError::Config(format!(
                "the admin connection cap must be between 1 and {}, got {}",
                tokio::sync::Semaphore::MAX_PERMITS,
                self.connections_max
            )));
        }
        let timeouts = [
            ("header read", self.header_read_timeout_ms),
            ("body read", self.body_read_timeout_ms),
            ("idle", self.idle_timeout_ms),
        ];
        for (name, ms) in timeouts {
            if ms == 0 {
                return Err(AdminError::Config(format!("the admin {name} timeout must be at least 1 ms")));
            }
        }
        Ok(())
    }
}

pub(crate) const WRONG_KEY: &str = "missing or wrong API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`";

/// The label and auth requirement of one route, handed to `guard`.
#[derive(Clone)]
pub(crate) struct RouteCtx {
    pub(crate) path: Arc<str>,
    pub(crate) auth: bool,
    /// The key to check when `auth`; `None`: the API is open.
    pub(crate) api_key: Option<Arc<str>>,
}

/// The `route` label of a response for `hongbao_admin_requests_total`. Set
/// from the route's pattern, never from the raw path, so ids in paths cannot
/// create unbounded label values.
#[derive(Clone)]
pub(crate) struct RouteLabel(String);

/// Every route, one line each. A handler's method and path are written
/// once, in its `#[utoipa::path]`: `routes!` registers the handler there
/// and carries the annotation into the document, so a route cannot be
/// served undocumented or documented unserved. A new route: annotate the
/// handler, add its line here and its row to docs/api.md's route table
/// (a test checks that table).
pub(crate) fn route_table() -> Vec<UtoipaMethodRouter<Arc<AppState>>> {
    vec![
        routes!(routes::health),
        routes!(routes::metrics),
        routes!(openapi::serve_document),
        routes!(routes::account),
        routes!(routes::deposit),
        routes!(routes::withdraw),
        routes!(routes::group),
        routes!(routes::set_group),
        routes!(routes::change_members),
        routes!(routes::send_packet),
        routes!(routes::packet),
        routes!(routes::campaigns),
        routes!(routes::create_campaign),
        routes!(routes::campaign),
        routes!(routes::start_campaign),
        routes!(routes::stop_campaign),
        routes!(routes::push),
        routes!(routes::broadcast),
        routes!(routes::tasks),
        routes!(routes::task),
        routes!(routes::stop_task),
        routes!(routes::issue_token),
        routes!(routes::stats),
        routes!(live::stream),
        routes!(live::now),
        routes!(live::alerts),
        routes!(ui::config),
    ]
}

/// Whether a route needs the admin key: everything under `/v1` (the
/// document says so from this same rule).
pub(crate) fn needs_key(path: &str) -> bool {
    path.starts_with("/v1/")
}

pub(crate) fn router(app: Arc<AppState>) -> Router {
    // The handlers of one path (a group's GET and PUT) share one route, so
    // they share its guard; `merge` panics on a method listed twice.
    let mut by_path: BTreeMap<String, MethodRouter<Arc<AppState>>> = BTreeMap::new();
    for (_, paths, handlers) in route_table() {
        for path in paths.paths.into_keys() {
            let merged = match by_path.remove(&path) {
                Some(earlier) => earlier.merge(handlers.clone()),
                None => handlers.clone(),
            };
            by_path.insert(path, merged);
        }
    }
    let api_key: Option<Arc<str>> = app.api_key.as_deref().map(Arc::from);
    let mut r = Router::new();
    for (path, handlers) in by_path {
        let ctx = RouteCtx { path: Arc::from(path.as_str()), auth: needs_key(&path), api_key: api_key.clone() };
        r = r.route(&path, handlers.layer(middleware::from_fn_with_state(ctx, guard)));
    }
    // The web pages and their files: no key (they hold no data), and not
    // in the API's document.
    for (path, handlers) in ui::pages() {
        let ctx = RouteCtx { path: Arc::from(path), auth: false, api_key: None };
        r = r.route(path, handlers.layer(middleware::from_fn_with_state(ctx, guard)));
    }
    r.fallback(routes::no_route)
        .method_not_allowed_fallback(routes::wrong_method)
        .layer(middleware::from_fn(count))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(app)
}

/// Per-route: checks the API key where one is required, and labels the
/// response with its route for `count`.
pub(crate) async fn guard(State(ctx): State<RouteCtx>, req: Request, next: Next) -> Response {
    let label = RouteLabel(format!("{} {}", req.method(), ctx.path));
    let mut response = if ctx.auth && !authorized(ctx.api_key.as_deref(), req.headers()) {
        ApiError::unauthorized(WRONG_KEY).into_response()
    } else {
        next.run(req).await
    };
    response.extensions_mut().insert(label);
    response
}

/// Around everything: one count per request by route and status.
pub(crate) async fn count(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    match response.extensions().get::<RouteLabel>() {
        Some(label) => count_request(&label.0, response.status()),
        None => count_request("unmatched", response.status()),
    }
    response
}

/// `hongbao_admin_requests_total{route,status}`.
pub(crate) fn count_request(route: &str, status: StatusCode) {
    metrics::counter!("hongbao_admin_requests_total", "route" => route.to_owned(), "status" => status.as_u16().to_string())
        .increment(1);
}

/// Who sent a request, as far as the admin key tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// The right key, or no key is configured (the API is open).
    Operator,
    /// No key offered.
    Anonymous,
    /// A key offered, and wrong.
    Refused,
}

pub(crate) fn caller(expected: Option<&str>, headers: &HeaderMap) -> Caller {
    let Some(expected) = expected else { return Caller::Operator };
    let header_str = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header_str(header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match bearer.or_else(|| header_str("x-api-key").map(str::trim)) {
        Some(given) if hongbao_boundary::constant_time_eq(given.as_bytes(), expected.as_bytes()) => Caller::Operator,
        Some(_) => Caller::Refused,
        None => Caller::Anonymous,
    }
}

fn authorized(expected: Option<&str>, headers: &HeaderMap) -> bool {
    caller(expected, headers) == Caller::Operator
}

impl AppState {
    /// Engine stats, at most `STATS_MAX_AGE` old; concurrent callers wait
    /// for one reading instead of each starting their own.
    pub(crate) async fn stats(&self) -> hongbao_shard::Stats {
        let mut cached = self.stats.lock().await;
        if let Some((at, stats)) = cached.as_ref() {
            if at.elapsed() < STATS_MAX_AGE {
                return stats.clone();
            }
        }
        let stats = self.engine.stats().await;
        *cached = Some((std::time::Instant::now(), stats.clone()));
        stats
    }
}
