//! `ClusterBackend`: a gateway's engine when the engines are SETs in other
//! processes, maybe on other hosts.
//!
//! Each request goes to the SET that owns it: `grab`, `open` and `detail` to
//! the SET named in the packet id, everything else to the user's home SET.
//! A connection is registered (`Connect`) with its home SET only, which is
//! where its pushes and stored messages come from; the first time it asks
//! another SET something it is `Attach`ed there (known for replies, never
//! for pushes). So a SET's push hub holds its own users' connections, and a
//! connection costs another SET something only once it has visited.
//!
//! Each SET is one resilient link (`hongbao_link::connect_resilient`): while
//! a SET is unreachable its requests are answered `unavailable` at once, the
//! others' go on, and when it is back every connection is introduced to it
//! again.

use std::future::Future;
use std::sync::{Arc, Mutex};

use hongbao_boundary::sync::lock;
use hongbao_boundary::{Backend, EngineError, Outbox, Responder};
use hongbao_core::ids::set_of;
use hongbao_core::sets::{home_set, SetId};
use hongbao_link::{RemoteConnection, RemoteEngine};
use hongbao_proto::{ErrorCode, Reply, Request};

/// The gateway's view of every SET, in the cluster file's order.
#[derive(Clone)]
pub struct ClusterBackend {
    sets: Arc<[RemoteEngine]>,
}

/// A client connection of this gateway, as the SETs know it.
pub struct ClusterConnection {
    home: SetId,
    /// Registered for pushes on the home SET.
    registration: RemoteConnection,
    /// Kept to attach the connection to another SET on its first visit.
    outbox: Outbox,
    /// The other SETs this connection has asked something, each attached
    /// once; empty (no allocation) for a connection that stays home.
    visits: Mutex<Vec<(SetId, RemoteConnection)>>,
}

impl ClusterBackend {
    /// `sets[i]` is the link to SET `i`.
    pub fn new(sets: Vec<RemoteEngine>) -> ClusterBackend {
        assert!(!sets.is_empty() && sets.len() <= usize::from(hongbao_core::sets::SETS_MAX), "1 to SETS_MAX SETs");
        ClusterBackend { sets: sets.into() }
    }

    fn count(&self) -> u8 {
        self.sets.len() as u8
    }

    /// The SET that answers `req` of `user`; an error reply for a packet id
    /// that names no SET of this cluster. The error is the reply itself,
    /// sent at once on the rare path, so its size costs nothing worth a box.
    #[allow(clippy::result_large_err)]
    fn route(&self, user: u64, req: &Request) -> Result<SetId, Reply> {
        match req {
            Request::Grab { packet } | Request::Open { packet } | Request::Detail { packet } => {
                let set = set_of(*packet);
                if set < self.count() {
                    Ok(set)
                } else {
                    Err(Reply::error(ErrorCode::NotFound, format!("packet {packet} not found")))
                }
            }
            Request::Shake { .. }
            | Request::Send { .. }
            | Request::Balance
            | Request::Ack { .. }
            | Request::Hello { .. }
            | Request::Ping => Ok(home_set(user, self.count())),
        }
    }
}

impl Backend for ClusterBackend {
    type Guard = ClusterConnection;

    fn answer_inline(&self, user: u64, req: &Request) -> Option<Reply> {
        // Only shakes are answered inline, and a shake is its home SET's.
        let Request::Shake { .. } = req else { return None };
        self.sets[usize::from(home_set(user, self.count()))].answer_inline(user, req)
    }

    fn submit(&self, connection: &ClusterConnection, user: u64, req: Request, responder: Responder) {
        let set = match self.route(user, &req) {
            Ok(set) => set,
            Err(reply) => return responder.send(reply),
        };
        let engine = &self.sets[usize::from(set)];
        if set == connection.home {
            return engine.submit(&connection.registration, user, req, responder);
        }
        let mut visits = lock(&connection.visits);
        if let Some((_, visit)) = visits.iter().find(|(s, _)| *s == set) {
            return engine.submit(visit, user, req, responder);
        }
        match engine.attach(user, connection.outbox.clone()) {
            Ok(visit) => {
                engine.submit(&visit, user, req, responder);
                visits.push((set, visit));
            }
            Err(e) => responder.send(e.to_reply()),
        }
    }

    fn connect(
        &self,
        user: u64,
        outbox: Outbox,
    ) -> impl Future<Output = Result<ClusterConnection, EngineError>> + Send {
        let home = home_set(user, self.count());
        let engine = self.sets[usize::from(home)].clone();
        async move {
            let registration = engine.connect(user, outbox.clone()).await?;
            Ok(ClusterConnection { home, registration, outbox, visits: Mutex::new(Vec::new()) })
        }
    }
}
