//! What every connection task of one gateway shares, and what each
//! admitted connection holds.

use std::sync::Arc;

use hongbao_proto::{Reply, ShakeResult};
use metrics::Gauge;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::limits::REJECTS_INFLIGHT_MAX;
use crate::GatewayConfig;

/// State every connection task shares.
pub(crate) struct Shared<B> {
    pub config: GatewayConfig,
    pub engine: B,
    /// Flips to `true` once, when the server is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// One permit per open connection.
    pub connections: Arc<Semaphore>,
    /// Bounds the work spent telling refused WebSocket clients why.
    pub rejects: Arc<Semaphore>,
    pub hot_counters: HotCounters,
    /// Never sent on: it is dropped with the last `Arc<Shared>`, held by the
    /// accept loops and every connection task, which closes `done_rx`.
    _done_tx: mpsc::Sender<()>,
}

impl<B> Shared<B> {
    pub(crate) fn new(
        config: GatewayConfig,
        engine: B,
        shutdown: watch::Receiver<bool>,
    ) -> (Arc<Shared<B>>, mpsc::Receiver<()>) {
        let (done_tx, done_rx) = mpsc::channel(1);
        let shared = Shared {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            rejects: Arc::new(Semaphore::new(REJECTS_INFLIGHT_MAX)),
            hot_counters: HotCounters::new(),
            config,
            engine,
            shutdown,
            _done_tx: done_tx,
        };
        (Arc::new(shared), done_rx)
    }
}

/// What an admitted connection holds until it ends: its permit, and its
/// place in the open-connections gauge.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Admission {
    pub(crate) fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Admission {
        open.increment(1.0);
        Admission { _permit: permit, open }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// `hongbao_requests_total` handles of the requests a busy server answers
/// most (shakes that find nothing, heartbeats), made once per gateway: the
/// `counter!` macro looks its labels up in the registry on every call.
pub(crate) struct HotCounters {
    shake_none: metrics::Counter,
    shake_not_running: metrics::Counter,
    ping: metrics::Counter,
}

impl HotCounters {
    pub(crate) fn new() -> HotCounters {
        let requests = |op: &'static str, result: &'static str| metrics::counter!("hongbao_requests_total", "op" => op, "result" => result);
        HotCounters {
            shake_none: requests("shake", "none"),
            shake_not_running: requests("shake", "not_running"),
            ping: requests("ping", "ok"),
        }
    }

    pub(crate) fn get(&self, op: &'static str, reply: &Reply) -> Option<&metrics::Counter> {
        match (op, reply) {
            ("shake", Reply::Shake(ShakeResult::None)) => Some(&self.shake_none),
            ("shake", Reply::Shake(ShakeResult::NotRunning)) => Some(&self.shake_not_running),
            ("ping", Reply::Pong) => Some(&self.ping),
            _ => None,
        }
    }
}
