//! Group packets in their shard: sends, grabs, opens, expiry and eviction.

use std::sync::atomic::Ordering;

use hongbao_boundary::Responder;
use hongbao_core::packet::{GrabState, OpenDecision, OpenError, Packet, PacketSpec, PacketStatus, Recipients};
use hongbao_core::sets::{home_set, SetId, SetMap};
use hongbao_core::split::SplitKind;
use hongbao_core::{PacketId, UserId};
use hongbao_proto::{ErrorCode, Push, PushBody, Reply};
use hongbao_store::ops::{Barrier, FindClaim, FundPacket, Funded, NewPacket, OpenShare, Refund, Refunded};
use hongbao_store::{OpError, Reader};
use tokio::sync::mpsc::UnboundedSender;

use super::{Completed, ShardState, TimerKind, RETAIN_CLOSED_MS};

/// Pause before a packet whose refund failed is refunded again, or a failed
/// reload is read again: storage is failing, and retrying at once would spin.
const REFUND_RETRY_MS: u64 = 1_000;
use crate::checks::{encode_body, op_error, open_error_reply, valid_key};
use crate::push::PushHub;
use crate::reads::reads_full;

/// A send, with its recipients resolved by the engine.
pub(crate) struct SendArgs {
    pub amount_fen: i64,
    pub count: u32,
    pub kind: SplitKind,
    pub recipients: Recipients,
    pub greeting: String,
    pub key: String,
}

fn sent(p: &Packet, repeat: bool) -> Reply {
    Reply::Sent { packet: p.id, amount_fen: p.total_fen, count: p.count, expires_ms: p.expires_ms, repeat }
}

fn received_notice(p: &Packet) -> PushBody {
    PushBody::PacketReceived {
        packet: p.id,
        sender: p.sender,
        amount_fen: p.total_fen,
        count: p.count,
        kind: p.kind,
        greeting: p.greeting.clone(),
    }
}

/// The writer's answer to a send: a new packet goes back to its shard, which
/// adopts it and then replies, so no open can arrive before the packet is in
/// place; a repeat is answered at once.
fn fund_committed(
    r: Result<Funded, OpError>,
    packet: Packet,
    completions: &UnboundedSender<Completed>,
    reply: Responder,
) {
    match r {
        Ok(Funded::New { messages }) => {
            let _ = completions.send(Completed::Funded { packet: Box::new(packet), messages, reply });
        }
        Ok(Funded::Repeat(e)) => reply.send(Reply::Sent {
            packet: e.id,
            amount_fen: e.total_fen,
            count: e.count,
            expires_ms: e.expires_ms,
            repeat: true,
        }),
        Err(e) => {
            // A commit that failed may still have reached the disk (the
            // writer reads the file again before it goes on): read the
            // packet back, so a packet funded after all is held and its
            // opens and refund work, instead of waiting for a restart.
            if matches!(e, OpError::Storage(_)) {
                let _ = completions.send(Completed::Reload { packet: packet.id });
            }
            reply.send(op_error(e).to_reply())
        }
    }
}

/// What an open tells once committed: the opener its share, the sender
/// who opened (and who had the best luck, when it was the last share).
struct OpenNotice {
    packet: PacketId,
    user: UserId,
    amount_fen: i64,
    finished: bool,
    sender: UserId,
    remaining_count: u32,
    best_luck: Option<UserId>,
}

/// The reply to an open whose share was not committed: the client may
/// retry; the shard reloads the packet, since memory holds a claim storage
/// does not (and any open decided after it is refused as stale).
fn open_failed(e: OpError, packet: PacketId, completions: &UnboundedSender<Completed>) -> Reply {
    let _ = completions.send(Completed::Reload { packet });
    match e {
        OpError::Stale(_) | OpError::QueueFull => {
            Reply::error(ErrorCode::Overload, format!("packet {packet} is being reloaded, retry"))
        }
        e => op_error(e).to_reply(),
    }
}

fn open_committed(
    r: Result<(), OpError>,
    notice: OpenNotice,
    hub: &PushHub,
    completions: &UnboundedSender<Completed>,
    reply: Responder,
) {
    let OpenNotice { packet, user, amount_fen, finished, sender, remaining_count, best_luck } = notice;
    if let Err(e) = r {
        return reply.send(open_failed(e, packet, completions));
    }
    metrics::counter!("hongbao_opens_total", "result" => "opened").increment(1);
    reply.send(Reply::Opened { packet, amount_fen, repeat: false, finished });
    // Sender notifications are transient: the packet detail has them all.
    let opened = PushBody::PacketOpened { packet, user, amount_fen, remaining_count };
    hub.deliver(sender, &Push { msg: 0, body: opened });
    if let Some(best_luck) = best_luck {
        hub.deliver(sender, &Push { msg: 0, body: PushBody::PacketFinished { packet, best_luck } });
    }
}

/// The answer to a repeated open: the share, once storage confirms it is
/// committed (the first open may have failed since memory recorded it).
fn repeat_confirmed(
    r: Result<Option<i64>, OpError>,
    packet: PacketId,
    finished: bool,
    completions: &UnboundedSender<Completed>,
    reply: Responder,
) {
    match r {
        Ok(Some(amount_fen)) => reply.send(Reply::Opened { packet, amount_fen, repeat: true, finished }),
        Ok(None) => reply.send(open_failed(OpError::Stale(format!("packet {packet}")), packet, completions)),
        Err(e) => reply.send(op_error(e).to_reply()),
    }
}

fn refund_committed(
    r: Result<Refunded, OpError>,
    notice: (PacketId, UserId, PushBody),
    hub: &PushHub,
    completions: &UnboundedSender<Completed>,
) {
    let (packet, sender, body) = notice;
    match r {
        Ok(Refunded { message }) => {
            metrics::counter!("hongbao_refunds_total").increment(1);
            if let Some(msg) = message {
                hub.deliver(sender, &Push { msg, body });
            }
        }
        Err(e) => {
            // Memory says refunded, storage does not: reload the packet, and
            // its expiry refunds it again after `REFUND_RETRY_MS`.
            tracing::warn!(packet, error = %e, "refund failed; retried after a reload");
            let _ = completions.send(Completed::Reload { packet });
        }
    }
}

impl ShardState {
    pub(super) async fn send(&mut self, user: UserId, send: SendArgs, reply: Responder) {
        let now = self.clock.now_ms();
        let SendArgs { amount_fen, count, kind, recipients, greeting, key } = send;
        if let Err(e) = valid_key(&key) {
            return reply.send(e.to_reply());
        }
        let spec = PacketSpec { sender: user, total_fen: amount_fen, count, kind, recipients, greeting };
        if let Err(e) = spec.validate(&self.rules) {
            return reply.send(Reply::error(ErrorCode::InvalidRequest, e.to_string()));
        }
        // After the checks: a refused request spends none of the sender's rate.
        if !self.send_limits.allow(user, now) {
            metrics::counter!("hongbao_rate_limited_total", "op" => "send").increment(1);
            let message = format!(
                "sending too fast: at most {} packets a second (bursts of {})",
                self.rules.sends_per_s, self.rules.send_burst
            );
            return reply.send(Reply::error(ErrorCode::RateLimited, message));
        }
        let Some(id) = self.next_id() else {
            return reply.send(Reply::error(ErrorCode::Overload, "packet ids are being reserved, retry"));
        };
        let expires_ms = now + self.rules.expiry_s.saturating_mul(1000);
        let packet = Packet::new(id, spec, now, expires_ms);
        let new = NewPacket {
            id,
            sender: user,
            kind: packet.kind,
            total_fen: packet.total_fen,
            count: packet.count,
            recipients: packet.recipients.clone(),
            greeting: packet.greeting.clone(),
            created_ms: now,
            expires_ms,
        };
        // Recipients homed on other SETs get their notice through the
        // outbox (their messages live in their SET's store).
        let away = away_recipients(packet.recipients.list(), self.set);
        let op = FundPacket { packet: new, key, notice: encode_body(&received_notice(&packet)), away, at_ms: now };
        let completions = self.completions.clone();
        self.writer.submit(op, move |r| fund_committed(r, packet, &completions, reply)).await;
    }

    /// A new packet is committed: reply, tell its recipients, then hold it.
    pub(super) fn funded(&mut self, p: Packet, messages: Vec<(UserId, u64)>, reply: Responder) {
        reply.send(sent(&p, false));
        let body = received_notice(&p);
        for (user, msg) in messages {
            self.hub.deliver(user, &Push { msg, body: body.clone() });
        }
        metrics::counter!("hongbao_packets_sent_total").increment(1);
        self.adopt(p);
    }

    pub(super) fn grab(&mut self, user: UserId, packet: PacketId, reply: Responder) {
        match self.packets.get(&packet) {
            Some(p) => reply.send(Reply::Grab { packet, state: p.grab(user, self.clock.now_ms()) }),
            None => self.grab_from_storage(user, packet, reply),
        }
    }

    pub(super) async fn open(&mut self, user: UserId, packet: PacketId, reply: Responder) {
        let now = self.clock.now_ms();
        let Some(p) = self.packets.get_mut(&packet) else {
            return self.open_from_storage(user, packet, reply);
        };
        let decision = match p.open(user, now, &mut self.rng) {
            Ok(d) => d,
            Err(e) => {
                metrics::counter!("hongbao_opens_total", "result" => "rejected").increment(1);
                return reply.send(open_error_reply(e));
            }
        };
        let completions = self.completions.clone();
        match decision {
            OpenDecision::Repeat { .. } => {
                let finished = p.status == PacketStatus::Finished;
                // The first open may not be committed yet, or may have
                // failed: the lookup is queued behind it and reads storage.
                let answer = move |r| repeat_confirmed(r, packet, finished, &completions, reply);
                self.writer.submit(FindClaim { packet, user }, answer).await;
            }
            OpenDecision::New { amount_fen, finished, best_luck } => {
                self.counters.opens.fetch_add(1, Ordering::Relaxed);
                let seq = (p.claims.len() - 1) as u32;
                let notice = OpenNotice {
                    packet,
                    user,
                    amount_fen,
                    finished,
                    sender: p.sender,
                    remaining_count: p.remaining_count(),
                    best_luck,
                };
                if finished {
                    self.timers.remove(&(p.expires_ms, packet, TimerKind::Expire));
                    self.timers.insert((now + RETAIN_CLOSED_MS, packet, TimerKind::Evict));
                }
                let remaining_before_fen = p.remaining_fen + amount_fen;
                // A user homed on another SET is paid there, through the
                // outbox; the claim, and the reply, are this SET's as for
                // anyone. A single node never divides here.
                let cross_to = (!self.set.owns_user(user)).then(|| home_set(user, self.set.sets()));
                let op =
                    OpenShare { packet, user, amount_fen, seq, at_ms: now, best_luck, remaining_before_fen, cross_to };
                let hub = self.hub.clone();
                self.writer.submit(op, move |r| open_committed(r, notice, &hub, &completions, reply)).await;
            }
        }
    }

    /// A grab of a packet no longer (or never) in memory, answered from
    /// committed state off the shard's loop.
    fn grab_from_storage(&self, user: UserId, packet: PacketId, reply: Responder) {
        self.reads.reply_with(reply, reads_full(), move |reader| match stored_grab(reader, user, packet) {
            Ok((_, state)) => Reply::Grab { packet, state },
            Err((code, message)) => Reply::error(code, message),
        });
    }

    /// An open of a packet no longer (or never) in memory: only a repeat or
    /// a refusal can be answered from committed state.
    fn open_from_storage(&self, user: UserId, packet: PacketId, reply: Responder) {
        self.reads.reply_with(reply, reads_full(), move |reader| {
            let (finished, state) = match stored_grab(reader, user, packet) {
                Ok(found) => found,
                Err((code, message)) => return Reply::error(code, message),
            };
            match state {
                GrabState::AlreadyOpened { amount_fen } => Reply::Opened { packet, amount_fen, repeat: true, finished },
                GrabState::NotEligible => open_error_reply(OpenError::NotEligible),
                GrabState::Finished => open_error_reply(OpenError::Finished),
                GrabState::Expired => open_error_reply(OpenError::Expired),
                GrabState::CanOpen => Reply::error(ErrorCode::Overload, "packet is being loaded, retry"),
            }
        });
    }

    pub(super) async fn fire_timers(&mut self) {
        let now = self.clock.now_ms();
        while let Some(&(at, packet, kind)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match kind {
                TimerKind::Evict => self.evict(packet),
                TimerKind::Expire => self.expire(packet, now).await,
                TimerKind::Reload => self.reload(packet).await,
            }
        }
    }

    /// Refunds an expired packet's remainder to its sender, once.
    async fn expire(&mut self, packet: PacketId, now: u64) {
        let Some(p) = self.packets.get_mut(&packet) else { return };
        let Some(amount_fen) = p.expire(now) else { return };
        let sender = p.sender;
        self.timers.insert((now + RETAIN_CLOSED_MS, packet, TimerKind::Evict));
        let body = PushBody::PacketRefunded { packet, amount_fen };
        let op = Refund { packet, sender, amount_fen, at_ms: now, notice: encode_body(&body) };
        let hub = self.hub.clone();
        let completions = self.completions.clone();
        self.writer.submit(op, move |r| refund_committed(r, (packet, sender, body), &hub, &completions)).await;
    }

    /// Drops a closed packet from memory; later questions about it are
    /// answered from storage. An open packet stays (an evict timer can
    /// outlive a reload that brought the packet back open).
    fn evict(&mut self, packet: PacketId) {
        if self.packets.get(&packet).is_some_and(|p| p.status != PacketStatus::Open) {
            self.packets.remove(&packet);
            self.counters.packets_in_memory.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes a packet out of memory and reads it again from what is
    /// committed. Meanwhile its requests are answered from storage (an open
    /// hears `overload`, retry), so nothing more is decided on what memory
    /// held. The read waits for a barrier queued behind every operation the
    /// shard has handed to the writer, so no operation decided on the old
    /// state can commit after the packet was read.
    pub(super) async fn reload(&mut self, packet: PacketId) {
        if !self.reloading.insert(packet) {
            // Already out of memory and being read again (each failed op of
            // the packet asks): nothing to take out, no timer to scan for.
            return;
        }
        if self.packets.remove(&packet).is_some() {
            self.counters.packets_in_memory.fetch_sub(1, Ordering::Relaxed);
            self.timers.retain(|t| t.1 != packet);
        }
        metrics::counter!("hongbao_packet_reloads_total").increment(1);
        let completions = self.completions.clone();
        let settled = move |_| drop(completions.send(Completed::Settled { packet }));
        self.writer.submit(Barrier, settled).await;
    }

    /// The second half of `reload`: the read itself, off the loop.
    pub(super) fn read_back(&self, packet: PacketId) {
        let (completions, refused) = (self.completions.clone(), self.completions.clone());
        self.reads.spawn(
            move |reader| {
                let _ = completions.send(match reader.packet(packet) {
                    Ok(stored) => Completed::Loaded { packet, stored: stored.map(Box::new) },
                    Err(e) => {
                        tracing::warn!(packet, error = %e, "reloading a packet failed; retried");
                        Completed::LoadFailed { packet }
                    }
                });
            },
            move || drop(refused.send(Completed::LoadFailed { packet })),
        );
    }

    /// A reloaded packet goes back into memory as committed. If it is open
    /// and past its expiry (its refund failed), the refund is tried again
    /// after `REFUND_RETRY_MS`, not at once in a loop.
    pub(super) fn loaded(&mut self, packet: PacketId, stored: Option<Packet>) {
        self.reloading.remove(&packet);
        let Some(p) = stored else { return };
        let now = self.clock.now_ms();
        match p.status {
            PacketStatus::Open => {
                let at = if p.expires_ms > now { p.expires_ms } else { now + REFUND_RETRY_MS };
                self.hold(p, at, TimerKind::Expire);
            }
            _ => self.hold(p, now + RETAIN_CLOSED_MS, TimerKind::Evict),
        }
    }

    pub(super) fn load_failed(&mut self, packet: PacketId) {
        // Still reloading: requests keep being answered from storage.
        self.reloading.remove(&packet);
        self.timers.insert((self.clock.now_ms() + REFUND_RETRY_MS, packet, TimerKind::Reload));
    }
}

/// The recipients homed on other SETs than `set`, each with their SET, in
/// recipient order; nothing at all on a single node.
fn away_recipients(recipients: &[UserId], set: SetMap) -> Vec<(UserId, SetId)> {
    if set.sets() == 1 {
        return Vec::new();
    }
    recipients.iter().filter(|&&u| !set.owns_user(u)).map(|&u| (u, home_set(u, set.sets()))).collect()
}

/// A stored packet as `user` finds it: whether it finished, and the grab
/// state; or the error for a packet that cannot be read.
fn stored_grab(reader: &Reader, user: UserId, packet: PacketId) -> Result<(bool, GrabState), (ErrorCode, String)> {
    let p = match reader.packet(packet) {
        Ok(Some(p)) => p,
        Ok(None) => return Err((ErrorCode::NotFound, format!("packet {packet} not found"))),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    // Expiry is judged by status here: an open packet not in memory is
    // being loaded or refunded, and is reported as its row says.
    let state = p.grab(user, if p.status == PacketStatus::Refunded { u64::MAX } else { 0 });
    Ok((p.status == PacketStatus::Finished, state))
}
