//! The live figures over HTTP: `GET /v1/live` (Server-Sent Events),
//! `GET /v1/live/now` and `GET /v1/alerts`. What they serve is made by
//! `hongbao-watch` (its sampler and detector); this module only reads its
//! `Live` handle, so a slow or stuck reader holds nothing of the sampler.
//!
//! A stream replays the last `REPLAY_MAX` snapshots, then sends each new
//! one; each is serialised once by the sampler, not once per stream.
//! Streams are capped (`LIVE_STREAMS_MAX`, over it 503 `overload`) and end
//! on the server's shutdown signal, so the admin server's graceful shutdown
//! is not held up by a dashboard left open.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hongbao_proto::ErrorCode;
use hongbao_shard::Engine;
use hongbao_watch::{Alert, EngineReading, EngineSource, Live, Published, Snapshot, REPLAY_MAX};
use serde::Serialize;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::conn::Streaming;
use crate::error::ApiError;
use crate::limits::{LIVE_KEEPALIVE_MS, LIVE_STREAMS_MAX};
use crate::AppState;

type Shared = State<Arc<AppState>>;

/// What the live sampler reads of the engine each second: levels and the
/// money totals, none of which passes through the metrics. Here because
/// this crate knows both sides (`hongbao-watch` links no engine); `serve`
/// hands it to the sampler.
pub struct EngineFeed(pub Engine);

impl EngineSource for EngineFeed {
    async fn read(&self) -> EngineReading {
        let s = self.0.stats().await;
        let storage_failure = self.0.storage_failure().map(|f| hongbao_watch::StorageFailure {
            reason: f.reason,
            since_ms: f.since_ms,
            failed_tries: f.failed_tries,
        });
        EngineReading {
            connections: s.connections,
            campaigns_running: s.campaigns_running,
            writer_queue_depth: s.writer_queue_depth,
            shard_queue_depth: s.shard_queue_depth,
            user_balances_fen: s.user_balances_fen,
            packet_escrow_fen: s.packet_escrow_fen,
            campaign_escrow_fen: s.campaign_escrow_fen,
            // What this SET owes the other SETs (0 on a single node): with
            // it, users + escrows + in flight = deposits - withdrawals holds
            // per SET while credits travel between SETs.
            in_flight_fen: s.transit_fen,
            deposits_minus_withdrawals_fen: s.deposits_minus_withdrawals_fen,
            storage_failure,
        }
    }
}

/// `GET /v1/alerts`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AlertsBody {
    /// Firing first (newest first), then the most recently cleared.
    pub alerts: Vec<Alert>,
}

/// `GET /v1/live/now`: the latest snapshot; 503 `unavailable` in the first
/// second after start, before there is one.
#[utoipa::path(
    get,
    path = "/v1/live/now",
    summary = "The latest second's live figures",
    tag = "live",
    responses(
        (status = 200, description = "The latest snapshot (docs/api.md, \"Live figures and alerts\").", body = Snapshot),
        (status = 503, description = "No snapshot yet: the first is taken a second after start (`unavailable`).", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn now(State(app): Shared) -> Result<Json<Snapshot>, ApiError> {
    match app.live.latest() {
        Some(p) => Ok(Json(p.snapshot.clone())),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "no snapshot yet: the first one is taken a second after start",
        )),
    }
}

/// `GET /v1/alerts`.
#[utoipa::path(
    get,
    path = "/v1/alerts",
    summary = "Alerts firing and recently cleared",
    tag = "live",
    responses((status = 200, description = "Firing alerts first (newest first), then the last 100 cleared.", body = AlertsBody))
)]
pub(crate) async fn alerts(State(app): Shared) -> Json<AlertsBody> {
    Json(AlertsBody { alerts: app.live.alerts() })
}

/// `GET /v1/live`: `text/event-stream`, one `event: snapshot` per second.
#[utoipa::path(
    get,
    path = "/v1/live",
    summary = "The live figures as a stream of Server-Sent Events",
    description = "`text/event-stream`: the last 120 snapshots, then one a second, each as `event: snapshot` \
                   with the `Snapshot` JSON on one `data:` line; a `: keepalive` comment after 15 s without \
                   one. Endless: it ends when the client goes or the server shuts down. Browsers read it \
                   with `fetch()` (an `EventSource` cannot send the key).",
    tag = "live",
    responses(
        (status = 200, description = "The stream; each event's data is a `Snapshot`.", content_type = "text/event-stream", body = String),
        (status = 503, description = "Already 8 streams open (`overload`).", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn stream(State(app): Shared) -> Response {
    let Ok(permit) = app.live_streams.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Overload,
            format!("at most {LIVE_STREAMS_MAX} live streams at once; try again later or use /v1/live/now"),
        )
        .into_response();
    };
    let pending: VecDeque<_> = app.live.since(0, REPLAY_MAX).into();
    let seen = pending.back().map_or(0, |p| p.snapshot.seq);
    let state = StreamState {
        live: app.live.clone(),
        updates: app.live.subscribe(),
        shutdown: app.shutdown.clone(),
        pending,
        seen,
        _permit: permit,
    };
    let body = Body::from_stream(futures_util::stream::unfold(state, next_chunk));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies (nginx) must pass each event on as it comes.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // Long-lived: the connection's idle deadline follows the stream's
    // progress instead of running out under it (`conn::Streaming`).
    response.extensions_mut().insert(Streaming);
    response
}

/// One stream's place in the series.
struct StreamState {
    live: Live,
    updates: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    /// Snapshots due to this stream, oldest first.
    pending: VecDeque<Arc<Published>>,
    /// The last `seq` queued.
    seen: u64,
    /// Its place under `LIVE_STREAMS_MAX`, given back when the body is dropped.
    _permit: OwnedSemaphorePermit,
}

/// The next piece of the body: a snapshot, a keep-alive comment after
/// `LIVE_KEEPALIVE_MS` of silence, or the end on shutdown.
async fn next_chunk(mut s: StreamState) -> Option<(Result<Bytes, Infallible>, StreamState)> {
    loop {
        if *s.shutdown.borrow() {
            return None;
        }
        if let Some(p) = s.pending.pop_front() {
            return Some((Ok(event(&p)), s));
        }
        let woke = tokio::select! {
            changed = s.updates.changed() => Woke::Update(changed.is_ok()),
            _ = s.shutdown.wait_for(|stop| *stop) => Woke::Shutdown,
            () = tokio::time::sleep(Duration::from_millis(LIVE_KEEPALIVE_MS)) => Woke::Quiet,
        };
        match woke {
            Woke::Update(true) => {
                let newer = s.live.since(s.seen, hongbao_watch::series::SNAPSHOTS_KEPT);
                if let Some(last) = newer.last() {
                    s.seen = last.snapshot.seq;
                }
                s.pending.extend(newer);
            }
            // The sampler's handle is gone: nothing more will come.
            Woke::Update(false) | Woke::Shutdown => return None,
            Woke::Quiet => return Some((Ok(Bytes::from_static(b": keepalive\n\n")), s)),
        }
    }
}

enum Woke {
    Update(bool),
    Shutdown,
    Quiet,
}

fn event(p: &Published) -> Bytes {
    let mut text = String::with_capacity(p.json.len() + 32);
    text.push_str("event: snapshot\ndata: ");
    text.push_str(&p.json);
    text.push_str("\n\n");
    Bytes::from(text)
}

#[cfg(test)]
mod tests;
