//! The seam between a gateway and an engine.

use std::future::Future;

use hongbao_core::UserId;
use hongbao_proto::{Reply, Request, ShakeResult};
use tokio::sync::watch;

use crate::{EngineError, GateView, Outbox, Responder};

/// What a gateway needs from the engine. The engine in the same process
/// serves it; a link's remote engine serves it from a gateway process; tests
/// use a fake so the connection logic is tested without shards or storage.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Keeps the connection registered for pushes while alive, and names it
    /// to `submit`.
    type Guard: Send + 'static;
    /// A reply the engine can give at once, on this thread (a shake with
    /// nothing to win); `None`: `submit` the request.
    fn answer_inline(&self, _user: UserId, _req: &Request) -> Option<Reply> {
        None
    }
    /// Hands over a request of the connection `connection` (what `connect`
    /// returned). Never waits; the answer goes to `responder`.
    fn submit(&self, connection: &Self::Guard, user: UserId, req: Request, responder: Responder);
    /// Registers a connection of `user` whose frames go to `outbox`.
    fn connect(&self, user: UserId, outbox: Outbox) -> impl Future<Output = Result<Self::Guard, EngineError>> + Send;
}

/// The engine as the owner of the shards offers it to gateways in other
/// processes, through `hongbao-link`'s core side: it submits the requests of
/// connections the link knows by their id there (so no guard is needed to
/// name them), holds a registration for each, and publishes the shake gates
/// those gateways copy to answer empty shakes themselves.
pub trait LinkedEngine: Clone + Send + Sync + 'static {
    /// Keeps a remote connection registered for pushes while held.
    type Registration: Send + 'static;
    /// As `Backend::answer_inline`.
    fn answer_inline(&self, user: UserId, req: &Request) -> Option<Reply>;
    /// Hands over a request; never waits.
    fn submit(&self, user: UserId, req: Request, responder: Responder);
    /// Registers a remote connection of `user` whose frames go to `outbox`.
    fn register(
        &self,
        user: UserId,
        outbox: Outbox,
    ) -> impl Future<Output = Result<Self::Registration, EngineError>> + Send;
    /// Every shard's gate now.
    fn gate_view(&self) -> GateView;
    /// Changes whenever `gate_view` would answer differently.
    fn gate_changes(&self) -> watch::Receiver<u64>;
    /// Counts `n` shakes a remote gateway answered with `result` from its
    /// `GateView`, so the engine's shake counters include them.
    fn count_remote_shakes(&self, result: &ShakeResult, n: u64);
}
