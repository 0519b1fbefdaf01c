//! Client requests: answered inline when nothing can be won, routed to the
//! shard that owns them, or answered from committed state.

use std::future::Future;
use std::sync::atomic::Ordering;

use hongbao_boundary::{inline_shake_result, Backend, EngineError, GateView, LinkedEngine, Outbox, Responder};
use hongbao_core::ids::shard_of;
use hongbao_core::limits;
use hongbao_core::packet::{Packet, PacketStatus, Recipients};
use hongbao_core::{PacketId, UserId};
use hongbao_proto::{ClaimInfo, ErrorCode, PacketDetail, Reply, Request, ShakeResult, Target};
use hongbao_store::ops::AckMessage;
use tokio::sync::{mpsc, watch};

use super::Engine;
use crate::checks::{foreign_packet, foreign_user, names_a_set, op_error, valid_group};
use crate::push::Connection;
use crate::reads::reads_full;
use crate::shard::{Event, SendArgs};

/// A packet's committed state as its sender and recipients see it.
pub(super) fn detail(p: &Packet) -> PacketDetail {
    PacketDetail {
        packet: p.id,
        sender: p.sender,
        kind: p.kind,
        amount_fen: p.total_fen,
        count: p.count,
        remaining_fen: p.remaining_fen,
        refunded_fen: p.refunded_fen,
        status: p.status.as_str().to_owned(),
        greeting: p.greeting.clone(),
        created_ms: p.created_ms,
        expires_ms: p.expires_ms,
        best_luck: if p.status == PacketStatus::Finished { p.best_luck() } else { None },
        claims: p.claims.iter().map(|c| ClaimInfo { user: c.user, amount_fen: c.amount_fen, at_ms: c.at_ms }).collect(),
    }
}

fn overload(event: Event) {
    metrics::counter!("hongbao_overload_total", "where" => "shard_queue").increment(1);
    match event {
        Event::Shake { reply, .. } => reply.send(Reply::Shake(ShakeResult::Overload)),
        Event::Grab { reply, .. } | Event::Open { reply, .. } | Event::Send { reply, .. } => {
            reply.send(Reply::error(ErrorCode::Overload, "shard queue is full, retry later"))
        }
        Event::StartPool { .. } | Event::StopPool { .. } | Event::Shutdown { .. } => {
            unreachable!("control events are sent with send(), never try_send()")
        }
        #[cfg(test)]
        Event::CatchUp { .. } => unreachable!("control events are sent with send(), never try_send()"),
    }
}

impl Engine {
    /// Answers a plain shake at once, on the caller's thread, when the
    /// user's shard has nothing to give: no campaign running (`not_running`)
    /// or, for "any campaign", no packet ready (`none`). That is nearly every
    /// shake of a campaign (200 packets/s against tens of thousands of
    /// shakes), and it then costs two atomic loads: no queue, no wake-up of
    /// the shard, no storage. `None` means: `submit` it (which is also the
    /// answer for a user homed on another SET: this SET's gates say nothing
    /// about theirs, and `submit` refuses them).
    pub fn answer_inline(&self, user: UserId, req: &Request) -> Option<Reply> {
        let Request::Shake { campaign, key: None } = req else { return None };
        if self.parts.shutting_down.load(Ordering::Relaxed) || !self.parts.set.owns_user(user) {
            return None;
        }
        let gate = self.parts.shards[self.user_shard(user)].gate.state();
        let result = inline_shake_result(*campaign, gate.open, gate.ready)?;
        self.count_inline_shakes(&result, 1);
        Some(Reply::Shake(result))
    }

    /// Counts shakes answered without the shard: here, or by a gateway in
    /// another process from its `GateView`.
    pub fn count_remote_shakes(&self, result: &ShakeResult, n: u64) {
        self.count_inline_shakes(result, n)
    }

    fn count_inline_shakes(&self, result: &ShakeResult, n: u64) {
        self.parts.counters.shakes.fetch_add(n, Ordering::Relaxed);
        let (none, not_running) = &self.parts.inline_shake_counters;
        if *result == ShakeResult::None { none } else { not_running }.increment(n);
    }

    /// Submits a client request on behalf of an authenticated user. Never
    /// waits: a full shard queue answers `Overload` (shakes: `ShakeResult::Overload`).
    /// `Hello` and `Ping` are the gateway's and answered with an error here.
    /// What belongs to another SET is refused with `InvalidRequest` (a
    /// gateway that routes right never sends it): a packet id of another
    /// SET, or a user homed elsewhere asking for anything but a packet of
    /// this SET. Packet requests are served whoever asks: a user homed on
    /// another SET opens here, and is paid on their SET (the outbox).
    pub fn submit(&self, user: UserId, req: Request, reply: Responder) {
        if self.parts.shutting_down.load(Ordering::Relaxed) {
            return reply.send(Reply::error(ErrorCode::Overload, "server is shutting down"));
        }
        if let Some(refusal) = self.not_this_sets(user, &req) {
            return reply.send(refusal);
        }
        if self.parts.writer.is_failing() && moves_money(&req) {
            // Told at once, before any shard decides anything that could
            // not be committed.
            return reply.send(match req {
                Request::Shake { .. } => Reply::Shake(ShakeResult::Overload),
                _ => unavailable(self.parts.writer.failure()),
            });
        }
        let (shard, event) = match req {
            Request::Shake { campaign, key } => (self.user_shard(user), Event::Shake { user, campaign, key, reply }),
            Request::Send { amount_fen, count, kind, to, greeting, key } => {
                let recipients = match self.recipients(user, to) {
                    Ok(r) => r,
                    Err((code, message)) => return reply.send(Reply::error(code, message)),
                };
                let send = Box::new(SendArgs { amount_fen, count, kind, recipients, greeting, key });
                (self.user_shard(user), Event::Send { user, send, reply })
            }
            Request::Grab { packet } => match self.packet_shard(packet) {
                Some(shard) => (shard, Event::Grab { user, packet, reply }),
                None => return reply.send(not_found(packet)),
            },
            Request::Open { packet } => match self.packet_shard(packet) {
                Some(shard) => (shard, Event::Open { user, packet, reply }),
                None => return reply.send(not_found(packet)),
            },
            Request::Detail { packet } => return self.detail_for(user, packet, reply),
            Request::Balance => return self.balance_for(user, reply),
            Request::Ack { msg } => return self.ack_for(user, msg, reply),
            Request::Hello { .. } | Request::Ping => {
                return reply.send(Reply::error(ErrorCode::InvalidRequest, "hello and ping are handled by the gateway"))
            }
        };
        if let Err(mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e)) =
            self.parts.shards[shard].tx.try_send(event)
        {
            overload(e);
        }
    }

    /// `submit` for in-process callers.
    pub async fn call(&self, user: UserId, req: Request) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(user, req, Responder::Oneshot(tx));
        rx.await.unwrap_or_else(|_| Reply::error(ErrorCode::Internal, "engine stopped"))
    }

    /// The refusal of a request that is not this SET's to answer; `None`,
    /// without allocating, for every request it serves (on a single node: a
    /// compare, and no division).
    fn not_this_sets(&self, user: UserId, req: &Request) -> Option<Reply> {
        let set = self.parts.set;
        match req {
            Request::Grab { packet } | Request::Open { packet } | Request::Detail { packet } => {
                let packet = *packet;
                // An id that names no SET at all is not found, as before
                // there were SETs.
                (!set.owns_packet(packet)).then(|| {
                    if names_a_set(packet, set) {
                        Reply::error(ErrorCode::InvalidRequest, foreign_packet(packet, set))
                    } else {
                        not_found(packet)
                    }
                })
            }
            Request::Hello { .. } | Request::Ping => None,
            Request::Shake { .. } | Request::Send { .. } | Request::Balance | Request::Ack { .. } => {
                (!set.owns_user(user)).then(|| Reply::error(ErrorCode::InvalidRequest, foreign_user(user, set)))
            }
        }
    }

    /// The shard named in a packet id, if this engine has it.
    fn packet_shard(&self, packet: PacketId) -> Option<usize> {
        let shard = shard_of(packet) as usize;
        (packet != 0 && shard < self.parts.shards.len()).then_some(shard)
    }

    /// A send's recipients, resolved here, off the shard: the packet keeps
    /// this snapshot of a group (this SET's copy of it). Recipients may be
    /// homed on any SET: those homed elsewhere get their notice, and their
    /// shares when they open, through the cross-SET outbox.
    fn recipients(&self, user: UserId, to: Target) -> Result<Recipients, (ErrorCode, String)> {
        if let Target::Group(g) = to {
            valid_group(g).map_err(|e| (e.code(), e.to_string()))?;
        }
        match to {
            Target::Group(g) => match hongbao_boundary::sync::read(&self.parts.groups).get(&g) {
                Some(members) if members.binary_search(&user).is_ok() => {
                    Ok(Recipients::group(g, members.iter().copied()))
                }
                Some(_) => Err((ErrorCode::NotEligible, format!("you are not a member of group {g}"))),
                None => Err((ErrorCode::NotFound, format!("group {g} not found"))),
            },
            Target::Users(users) if users.len() > limits::PACKET_RECIPIENTS_MAX => {
                Err((ErrorCode::InvalidRequest, format!("at most {} recipients", limits::PACKET_RECIPIENTS_MAX)))
            }
            Target::Users(users) => Ok(Recipients::users(users)),
            Target::User(u) => Ok(Recipients::User(u)),
        }
    }

    fn detail_for(&self, user: UserId, packet: PacketId, reply: Responder) {
        self.parts.reads.reply_with(reply, reads_full(), move |reader| match reader.packet(packet) {
            Ok(Some(p)) if p.sender == user || p.recipients.contains(user) => Reply::Detail(detail(&p)),
            Ok(Some(_)) => Reply::error(ErrorCode::NotEligible, "only the sender and recipients may see this packet"),
            Ok(None) => not_found(packet),
            Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
        });
    }

    /// From the balances the writer publishes as it commits: no read.
    fn balance_for(&self, user: UserId, reply: Responder) {
        let balance_fen = self.parts.writer.committed.balance(hongbao_core::ledger::Account::user(user));
        reply.send(Reply::Balance { balance_fen });
    }

    fn ack_for(&self, user: UserId, msg: u64, reply: Responder) {
        let acked = move |r: Result<bool, hongbao_store::OpError>| match r {
            Ok(_) => reply.send(Reply::Acked { msg }),
            Err(e) => reply.send(op_error(e).to_reply()),
        };
        let writer = self.parts.writer.clone();
        tokio::spawn(async move { writer.submit(AckMessage { user, msg }, acked).await });
    }
}

/// Requests whose answer needs a commit (a shake only if it wins, which is
/// why shakes that cannot win are answered inline before this is asked).
fn moves_money(req: &Request) -> bool {
    matches!(req, Request::Shake { .. } | Request::Send { .. } | Request::Open { .. } | Request::Ack { .. })
}

/// The answer while storage fails.
fn unavailable(failure: Option<hongbao_store::StorageFailure>) -> Reply {
    let reason = failure.map(|f| f.reason).unwrap_or_else(|| "storage is failing".into());
    Reply::error(ErrorCode::Unavailable, format!("storage unavailable ({reason}); nothing was done, retry later"))
}

fn not_found(packet: PacketId) -> Reply {
    Reply::error(ErrorCode::NotFound, format!("packet {packet} not found"))
}

impl Backend for Engine {
    type Guard = Connection;
    fn answer_inline(&self, user: UserId, req: &Request) -> Option<Reply> {
        Engine::answer_inline(self, user, req)
    }
    fn submit(&self, _connection: &Connection, user: UserId, req: Request, responder: Responder) {
        Engine::submit(self, user, req, responder)
    }
    fn connect(&self, user: UserId, outbox: Outbox) -> impl Future<Output = Result<Connection, EngineError>> + Send {
        Engine::connect(self, user, outbox)
    }
}

impl LinkedEngine for Engine {
    type Registration = Connection;
    fn answer_inline(&self, user: UserId, req: &Request) -> Option<Reply> {
        Engine::answer_inline(self, user, req)
    }
    fn submit(&self, user: UserId, req: Request, responder: Responder) {
        Engine::submit(self, user, req, responder)
    }
    fn register(&self, user: UserId, outbox: Outbox) -> impl Future<Output = Result<Connection, EngineError>> + Send {
        Engine::connect(self, user, outbox)
    }
    fn gate_view(&self) -> GateView {
        Engine::gate_view(self)
    }
    fn gate_changes(&self) -> watch::Receiver<u64> {
        Engine::gate_changes(self)
    }
    fn count_remote_shakes(&self, result: &ShakeResult, n: u64) {
        Engine::count_remote_shakes(self, result, n)
    }
}
