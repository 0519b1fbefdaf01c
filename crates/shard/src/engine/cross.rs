//! Money and notices across SETs, as the transport between SETs sees the
//! engine: this SET's outbox (read, then marked published once the broker
//! holds it) and the messages of other SETs applied here, each exactly once.
//!
//! The outbox rows are written by the writer in the commit that decided
//! them (a foreign user's open, a send to users homed elsewhere), so
//! nothing the transport does, or fails to do, can lose or invent money: it
//! may deliver a message any number of times; `apply_cross` applies it once.

use hongbao_boundary::EngineError;
use hongbao_core::cross::{CrossBody, CrossKey, CrossMessage};
use hongbao_core::ids::{campaign_seq, campaign_set, set_of};
use hongbao_core::limits::{CROSS_MESSAGES_PER_CALL_MAX, CROSS_NOTICE_BYTES_MAX};
use hongbao_core::sets::home_set;
use hongbao_proto::{Push, PushBody};
use hongbao_store::ops::{ApplyCross, MarkCrossPublished};

use super::Engine;
use crate::checks::{homed_here, op_error, valid_amount, valid_user};

impl Engine {
    /// Outbox rows not yet marked published, oldest first, at most `limit`
    /// (and at most `CROSS_MESSAGES_PER_CALL_MAX`): a read through the read
    /// gate, so `overload` when too many reads wait. A row stays here until
    /// `cross_published` names it: a transport that crashed in between
    /// hands it out again, and its SET applies it once.
    pub async fn cross_unpublished(&self, limit: usize) -> Result<Vec<CrossMessage>, EngineError> {
        let limit = limit.min(CROSS_MESSAGES_PER_CALL_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let from = self.parts.set.set();
        self.read(move |r| r.cross_unpublished(from, limit)).await
    }

    /// The broker has these durably: `cross_unpublished` never hands them
    /// out again (a writer operation; keys already marked, or unknown, are
    /// ignored). Every key must be of this SET's outbox, and at most
    /// `CROSS_MESSAGES_PER_CALL_MAX` at once.
    pub async fn cross_published(&self, keys: Vec<CrossKey>) -> Result<(), EngineError> {
        let set = self.parts.set.set();
        if keys.len() > CROSS_MESSAGES_PER_CALL_MAX {
            return Err(EngineError::Invalid(format!(
                "at most {CROSS_MESSAGES_PER_CALL_MAX} keys at once, got {}",
                keys.len()
            )));
        }
        if let Some(k) = keys.iter().find(|k| k.from != set) {
            return Err(EngineError::Invalid(format!(
                "key of SET {}'s outbox (packet {}, user {}), this is SET {set}",
                k.from, k.packet, k.user
            )));
        }
        if keys.is_empty() {
            return Ok(());
        }
        let keys = keys.into_iter().map(|k| (k.kind, k.packet, k.user)).collect();
        self.parts.writer.run(MarkCrossPublished { keys }).await.map_err(op_error)?;
        Ok(())
    }

    /// Applies one message of another SET, exactly once: `Ok(true)` if it
    /// was applied now, `Ok(false)` if it had been (nothing changes). A
    /// credit pays the user from the sending SET's transit account; a
    /// notice is stored for the user (as other users' notices are, capped
    /// alike) and pushed to their connections. Refused (`Invalid`): a
    /// message for another SET, from this SET or from no SET of the cluster,
    /// for a user not homed here, about a packet not of the sending SET, of
    /// an amount out of range, a notice that is not a push body, and a
    /// repeat whose amount differs from the one applied (one is corrupt).
    /// `Unavailable` while storage fails: the transport tries again later.
    pub async fn apply_cross(&self, msg: CrossMessage) -> Result<bool, EngineError> {
        let push = self.check_cross(&msg)?;
        let (kind, user, created_ms) = (msg.kind(), msg.user, msg.created_ms);
        let at_ms = self.parts.clock.now_ms();
        let applied = self.parts.writer.run(ApplyCross { msg, at_ms }).await.map_err(op_error)?;
        if applied.repeat {
            metrics::counter!("hongbao_cross_repeats_total", "kind" => kind.as_str()).increment(1);
            return Ok(false);
        }
        metrics::counter!("hongbao_cross_applied_total", "kind" => kind.as_str()).increment(1);
        // Wall clock of two hosts: a clock behind the sender's reads as no lag.
        let lag_ms = at_ms.saturating_sub(created_ms);
        metrics::histogram!("hongbao_cross_lag_seconds", "kind" => kind.as_str()).record(lag_ms as f64 / 1000.0);
        if let (Some(msg), Some(body)) = (applied.message, push) {
            self.parts.push_hub.deliver(user, &Push { msg, body });
        }
        Ok(true)
    }

    /// Outbox rows not yet marked published, as committed (the writer keeps
    /// the count: no read). Also the `hongbao_cross_backlog` gauge.
    pub fn cross_backlog(&self) -> u64 {
        self.parts.writer.cross_backlog()
    }

    /// What `apply_cross` refuses before anything is queued; a notice's
    /// push, decoded.
    fn check_cross(&self, msg: &CrossMessage) -> Result<Option<PushBody>, EngineError> {
        let set = self.parts.set;
        let refuse = |why: String| Err(EngineError::Invalid(why));
        if msg.to != set.set() {
            return refuse(format!("a message for SET {}, this is SET {}", msg.to, set.set()));
        }
        if msg.from == set.set() || msg.from >= set.sets() {
            return refuse(format!("a message from SET {}, this is SET {} of {}", msg.from, set.set(), set.sets()));
        }
        match &msg.body {
            // Campaign parts: a fund is keyed by the SET it funds, for a
            // campaign of the sending SET and a funder homed there; a
            // refund is for a campaign of this SET and its funder, homed here.
            CrossBody::Fund { spec } => {
                if msg.user != u64::from(set.set()) {
                    return refuse(format!("a fund keyed for SET {}, this is SET {}", msg.user, set.set()));
                }
                if campaign_set(msg.packet) != msg.from || campaign_seq(msg.packet) == 0 {
                    return refuse(format!("campaign {} is not one of SET {}'s", msg.packet, msg.from));
                }
                spec.validate().map_err(|e| EngineError::Invalid(format!("a fund of campaign {}: {e}", msg.packet)))?;
                if home_set(spec.funder, set.sets()) != msg.from {
                    return refuse(format!(
                        "a fund of campaign {} whose funder is not homed on SET {}",
                        msg.packet, msg.from
                    ));
                }
                return Ok(None);
            }
            CrossBody::Refund { amount_fen } => {
                valid_user(msg.user)?;
                homed_here(msg.user, set)?;
                if campaign_set(msg.packet) != set.set() || campaign_seq(msg.packet) == 0 {
                    return refuse(format!("campaign {} is not one of this SET's", msg.packet));
                }
                return valid_amount(*amount_fen).map(|()| None);
            }
            _ => {}
        }
        valid_user(msg.user)?;
        homed_here(msg.user, set)?;
        if set_of(msg.packet) != msg.from {
            return refuse(format!("packet {} is not one of SET {}'s", msg.packet, msg.from));
        }
        match &msg.body {
            CrossBody::Fund { .. } | CrossBody::Refund { .. } => unreachable!("checked above"),
            CrossBody::Credit { amount_fen } => valid_amount(*amount_fen).map(|()| None),
            CrossBody::Notice { body } if body.len() > CROSS_NOTICE_BYTES_MAX => {
                refuse(format!("a notice of {} bytes (at most {CROSS_NOTICE_BYTES_MAX})", body.len()))
            }
            CrossBody::Notice { body } => match postcard::from_bytes::<PushBody>(body) {
                Ok(push) => Ok(Some(push)),
                Err(e) => refuse(format!("a notice that is not a push body: {e}")),
            },
        }
    }
}
