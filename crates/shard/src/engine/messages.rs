//! Pushes to users: unicast and multicast (transient or stored), broadcast
//! tasks, and registering connections with the push hub.

use hongbao_boundary::{EngineError, Outbox};
use hongbao_core::limits::{GROUP_MEMBERS_MAX, MESSAGES_ON_CONNECT_MAX};
use hongbao_core::{PacketId, UserId};
use hongbao_proto::{PacketDetail, Push, PushBody, ServerFrame};
use hongbao_store::ops::StoreMessages;

use super::requests::detail;
use super::Engine;
use crate::checks::{
    encode_body, first_foreign, foreign_packet, foreign_user, homed_here, names_a_set, op_error, valid_group,
    valid_user,
};
use crate::push::{Connection, PushReceipt, PushTarget};
use crate::types::TaskInfo;

impl Engine {
    /// Committed state of a packet and every claim. A packet of another SET
    /// is refused (its rows are in that SET's store).
    pub async fn packet_detail(&self, id: PacketId) -> Result<PacketDetail, EngineError> {
        let set = self.parts.set;
        if !set.owns_packet(id) && names_a_set(id, set) {
            return Err(EngineError::Invalid(foreign_packet(id, set)));
        }
        let p = self.read(move |r| r.packet(id)).await?.ok_or_else(|| EngineError::NotFound(format!("packet {id}")))?;
        Ok(detail(&p))
    }

    /// Unicast or multicast. Persistent messages are stored (durably) for
    /// every target and delivered now to those online; transient ones only go
    /// to those online. Every target must be homed on this SET (their
    /// connections and stored messages are there): a push naming a user of
    /// another SET is refused whole, not sent to a part.
    pub async fn push(&self, target: PushTarget, body: PushBody, persistent: bool) -> Result<PushReceipt, EngineError> {
        let users = self.target_users(&target)?;
        let targets = users.len() as u64;
        if persistent {
            self.push_stored(users, body).await
        } else {
            let push = Push { msg: 0, body };
            let delivered = users.into_iter().map(|u| self.parts.push_hub.deliver(u, &push) as u64).sum();
            Ok(PushReceipt { targets, delivered, stored: 0 })
        }
    }

    async fn push_stored(&self, users: Vec<UserId>, body: PushBody) -> Result<PushReceipt, EngineError> {
        let targets = users.len() as u64;
        let op = StoreMessages { users, body: encode_body(&body), at_ms: self.parts.clock.now_ms() };
        let ids = self.parts.writer.run(op).await.map_err(op_error)?;
        let mut receipt = PushReceipt { targets, delivered: 0, stored: ids.len() as u64 };
        for (u, msg) in ids {
            receipt.delivered += self.parts.push_hub.deliver(u, &Push { msg, body: body.clone() }) as u64;
        }
        Ok(receipt)
    }

    fn target_users(&self, target: &PushTarget) -> Result<Vec<UserId>, EngineError> {
        let users = match target {
            PushTarget::User(u) => vec![*u],
            // A user listed twice is one target: one stored copy, one
            // delivery per device.
            PushTarget::Users(us) => {
                let mut users = us.clone();
                users.sort_unstable();
                users.dedup();
                users
            }
            PushTarget::Group(g) => {
                valid_group(*g)?;
                self.group(*g).ok_or_else(|| EngineError::NotFound(format!("group {g}")))?
            }
        };
        if users.len() > GROUP_MEMBERS_MAX {
            return Err(EngineError::Invalid(format!("at most {GROUP_MEMBERS_MAX} users per push; use a broadcast")));
        }
        for &u in &users {
            valid_user(u)?;
        }
        if let Some(u) = first_foreign(users.iter().copied(), self.parts.set) {
            return Err(EngineError::Invalid(format!("cannot push to {}", foreign_user(u, self.parts.set))));
        }
        Ok(users)
    }

    /// Starts a transient broadcast to everyone online, as a stoppable task.
    /// `Overload` while the most broadcasts that may run at once are running.
    /// It reaches the connections registered with this engine, which are
    /// those of this SET's users: a cluster-wide broadcast is one per SET.
    pub fn broadcast(&self, body: PushBody) -> Result<TaskInfo, EngineError> {
        self.parts.push_hub.broadcast(body).ok_or(EngineError::Overload)
    }

    pub fn task(&self, id: u64) -> Option<TaskInfo> {
        self.parts.push_hub.task(id)
    }

    pub fn stop_task(&self, id: u64) -> Option<TaskInfo> {
        self.parts.push_hub.stop_task(id)
    }

    pub fn tasks(&self) -> Vec<TaskInfo> {
        self.parts.push_hub.tasks()
    }

    /// Registers a connection for pushes; the returned guard unregisters it
    /// when dropped. Pending persistent messages are queued to `outbox` first.
    /// Only a user homed on this SET is registered: a gateway registers a
    /// connection with its user's home SET, where their pushes come from.
    pub async fn connect(&self, user: UserId, outbox: Outbox) -> Result<Connection, EngineError> {
        valid_user(user)?;
        homed_here(user, self.parts.set)?;
        // Register first so nothing pushed from now on is missed; a message
        // may then arrive twice (live and from storage): clients dedupe by `msg`.
        let conn = Connection::register(&self.parts.push_hub, user, outbox.clone());
        // Waits for a reader rather than being refused: the client has its
        // welcome already, and a login storm must not close connections.
        let pending = self.parts.reads.run_waiting(move |r| r.messages(user, MESSAGES_ON_CONNECT_MAX)).await?;
        for (msg, body) in pending {
            match postcard::from_bytes::<PushBody>(&body) {
                Ok(body) => {
                    outbox.send(ServerFrame::Push(Push { msg, body }));
                }
                Err(e) => tracing::warn!(msg, error = %e, "undecodable stored message skipped"),
            }
        }
        Ok(conn)
    }
}
