//! Where replies and pushes for one client connection go.

use std::sync::Arc;

use hongbao_proto::{Reply, ServerFrame};
use tokio::sync::{mpsc, oneshot, Notify};

/// The sending half of one connection's bounded outbox. Shards (replies) and
/// the push hub (pushes) hold clones; the gateway's connection task drains it.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<ServerFrame>,
    /// Signalled when a frame could not be queued: the connection is too slow
    /// and the gateway closes it (a `SlowConsumer` close).
    overflow: Arc<Notify>,
}

/// The receiving half, owned by the gateway's connection task.
#[derive(Debug)]
pub struct OutboxReceiver {
    pub frames: mpsc::Receiver<ServerFrame>,
    pub overflow: Arc<Notify>,
}

impl Outbox {
    pub fn new(capacity_frames: usize) -> (Outbox, OutboxReceiver) {
        let (tx, frames) = mpsc::channel(capacity_frames);
        let overflow = Arc::new(Notify::new());
        (Outbox { tx, overflow: overflow.clone() }, OutboxReceiver { frames, overflow })
    }

    /// Queues a frame without waiting. Returns false when the connection is
    /// gone or full (then it is told to close).
    pub fn send(&self, frame: ServerFrame) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("hongbao_outbox_overflows_total").increment(1);
                self.overflow.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// True if both are the same connection.
    pub fn same(&self, other: &Outbox) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

/// Where the answer to one request goes.
#[derive(Debug)]
pub enum Responder {
    /// A client connection: the reply is queued with the request's id.
    Client { outbox: Outbox, request_id: u64 },
    /// An in-process caller (the admin API) awaiting the reply.
    Oneshot(oneshot::Sender<Reply>),
}

impl Responder {
    pub fn send(self, reply: Reply) {
        match self {
            Responder::Client { outbox, request_id } => {
                outbox.send(ServerFrame::Reply { id: request_id, reply });
            }
            Responder::Oneshot(tx) => {
                let _ = tx.send(reply);
            }
        }
    }
}
