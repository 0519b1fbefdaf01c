//! Checks of request fields and the mapping of storage errors to the
//! boundary error, shared by the engine and its shards. A leaf.

use hongbao_boundary::EngineError;
use hongbao_core::ids::set_of;
use hongbao_core::limits;
use hongbao_core::packet::OpenError;
use hongbao_core::sets::{home_set, SetMap};
use hongbao_core::{GroupId, PacketId, UserId};
use hongbao_proto::{ErrorCode, PushBody, Reply, ShakeResult};
use hongbao_store::OpError;

pub(crate) fn op_error(e: OpError) -> EngineError {
    match e {
        OpError::InsufficientFunds { balance_fen, needed_fen } => {
            EngineError::InsufficientFunds { balance_fen, needed_fen }
        }
        OpError::KeyConflict => EngineError::KeyConflict,
        OpError::NotFound(what) => EngineError::NotFound(what),
        OpError::Invalid(msg) => EngineError::Invalid(msg),
        OpError::QueueFull => EngineError::Overload,
        OpError::RateLimited(why) => EngineError::RateLimited(why),
        OpError::Storage(msg) => EngineError::Unavailable(msg),
        // Only opens can be stale, and the shard answers those itself.
        OpError::Stale(what) => EngineError::Unavailable(format!("{what}; retry")),
    }
}

pub(crate) fn store_error(e: hongbao_store::StoreError) -> EngineError {
    EngineError::Internal(e.to_string())
}

/// Why `user` is not served here: they are homed on another SET (and a
/// gateway that routes by `home_set` never sends them here).
pub(crate) fn foreign_user(user: UserId, set: SetMap) -> String {
    format!("user {user} is homed on SET {}, this is SET {}", home_set(user, set.sets()), set.set())
}

/// Why a request for `packet` is not answered here: another SET made it.
pub(crate) fn foreign_packet(packet: PacketId, set: SetMap) -> String {
    format!("packet {packet} belongs to SET {}, this is SET {}", set_of(packet), set.set())
}

/// True when `packet` names a SET of the cluster (an id no SET can make is
/// simply not found, as before there were SETs).
pub(crate) fn names_a_set(packet: PacketId, set: SetMap) -> bool {
    set_of(packet) < set.sets()
}

/// The first of `users` homed on another SET; `None` at once on a single node.
pub(crate) fn first_foreign(users: impl IntoIterator<Item = UserId>, set: SetMap) -> Option<UserId> {
    if set.sets() == 1 {
        return None;
    }
    users.into_iter().find(|&u| !set.owns_user(u))
}

/// `Invalid` unless `user` is homed on this SET: the admin API's money,
/// campaign, push and connection entry points serve only this SET's users.
pub(crate) fn homed_here(user: UserId, set: SetMap) -> Result<(), EngineError> {
    if set.owns_user(user) {
        Ok(())
    } else {
        Err(EngineError::Invalid(foreign_user(user, set)))
    }
}

pub(crate) fn valid_user(user: UserId) -> Result<(), EngineError> {
    if user == 0 || user > hongbao_core::ID_MAX {
        return Err(EngineError::Invalid(format!("user id {user} is not between 1 and 2^53-1")));
    }
    Ok(())
}

/// Group ids are in the same range as user ids (they travel in JSON too).
pub(crate) fn valid_group(group: GroupId) -> Result<(), EngineError> {
    if group == 0 || group > hongbao_core::ID_MAX {
        return Err(EngineError::Invalid(format!("group id {group} is not between 1 and 2^53-1")));
    }
    Ok(())
}

pub(crate) fn valid_key(key: &str) -> Result<(), EngineError> {
    if key.is_empty() || key.len() > limits::IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(EngineError::Invalid(format!(
            "idempotency key must be 1 to {} bytes",
            limits::IDEMPOTENCY_KEY_BYTES_MAX
        )));
    }
    Ok(())
}

pub(crate) fn valid_amount(amount_fen: i64) -> Result<(), EngineError> {
    if amount_fen <= 0 || amount_fen > limits::AMOUNT_FEN_MAX {
        return Err(EngineError::Invalid(format!(
            "amount must be between 1 and {} fen, got {amount_fen}",
            limits::AMOUNT_FEN_MAX
        )));
    }
    Ok(())
}

pub(crate) fn open_error_reply(e: OpenError) -> Reply {
    let code = match e {
        OpenError::NotEligible => ErrorCode::NotEligible,
        OpenError::Finished => ErrorCode::Finished,
        OpenError::Expired => ErrorCode::Expired,
    };
    Reply::error(code, e.to_string())
}

/// The `result` label of `hongbao_shakes_total`.
pub(crate) fn shake_label(result: &ShakeResult) -> &'static str {
    match result {
        ShakeResult::Won { .. } => "won",
        ShakeResult::None => "none",
        ShakeResult::Overload => "overload",
        ShakeResult::NotRunning => "not_running",
    }
}

/// A push body as stored for offline users (opaque bytes to the store).
pub(crate) fn encode_body(body: &PushBody) -> Vec<u8> {
    postcard::to_allocvec(body).expect("push bodies serialise")
}
