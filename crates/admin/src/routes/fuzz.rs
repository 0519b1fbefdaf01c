//! Entry point for the fuzz target `admin_bodies` (`fuzz/`), compiled only
//! with `--cfg fuzzing` (which `cargo fuzz` sets), so the product's public
//! API does not grow: every JSON request body of the API, parsed exactly as
//! its handler parses it (`ApiJson` → `parse_json`), then put through the
//! checks the handler makes before it calls the engine.

use hongbao_core::campaign::CampaignSpec;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::*;
use crate::extract::parse_json;

/// One route's body type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// `POST /v1/accounts/{id}/deposit` and `/withdraw`.
    Money,
    /// `PUT /v1/groups/{id}`.
    Group,
    /// `POST /v1/groups/{id}/members`.
    Members,
    /// `POST /v1/packets`.
    Send,
    /// `POST /v1/campaigns`.
    Campaign,
    /// `POST /v1/push`.
    Push,
    /// `POST /v1/broadcast`.
    Broadcast,
    /// `POST /v1/tokens`.
    Token,
}

impl Body {
    pub const ALL: [Body; 8] =
        [Body::Money, Body::Group, Body::Members, Body::Send, Body::Campaign, Body::Push, Body::Broadcast, Body::Token];
}

/// A body that parsed: every field as the handler sees it, written back as
/// JSON (so a target can check that it parses to the same again), and what
/// the handler's own checks said before any engine call.
#[derive(Debug)]
pub struct Parsed {
    pub fields: Value,
    pub checked: Result<(), String>,
}

/// Parses `bytes` as the handler for `body` does.
pub fn parse(body: Body, bytes: &[u8]) -> Result<Parsed, ApiError> {
    match body {
        Body::Money => parsed::<MoneyRequest>(bytes, |b| json!({"amount_fen": b.amount_fen, "key": b.key}), |_| Ok(())),
        Body::Group => parsed::<GroupRequest>(bytes, |b| json!({"members": b.members}), |_| Ok(())),
        Body::Members => parsed::<MembersRequest>(
            bytes,
            |b| json!({"add": b.add, "remove": b.remove}),
            |b| if b.add.is_empty() && b.remove.is_empty() { Err("nothing to change".into()) } else { Ok(()) },
        ),
        Body::Send => parsed::<SendRequest>(
            bytes,
            |b| {
                json!({"sender": b.sender, "amount_fen": b.amount_fen, "count": b.count, "kind": b.kind,
                       "to": b.to, "greeting": b.greeting, "key": b.key})
            },
            |b| check_user(b.sender, "sender").map_err(|e| e.message),
        ),
        Body::Campaign => parsed::<CampaignRequest>(
            bytes,
            |b| {
                json!({"funder": b.funder, "total_fen": b.total_fen, "rule": b.rule, "rate_per_s": b.rate_per_s,
                       "win_cap_per_user": b.win_cap_per_user, "key": b.key})
            },
            |b| {
                let spec = CampaignSpec {
                    funder: b.funder,
                    total_fen: b.total_fen,
                    rule: b.rule,
                    rate_per_s: b.rate_per_s,
                    win_cap_per_user: b.win_cap_per_user,
                };
                spec.validate().map_err(|e| e.to_string())
            },
        ),
        Body::Push => parsed::<PushRequest>(
            bytes,
            |b| json!({"target": b.target, "persistent": b.persistent, "topic": b.topic, "text": b.text}),
            |_| Ok(()),
        ),
        Body::Broadcast => parsed::<BroadcastRequest>(bytes, |b| json!({"topic": b.topic, "text": b.text}), |_| Ok(())),
        Body::Token => parsed::<TokenRequest>(
            bytes,
            |b| json!({"user": b.user, "ttl_s": b.ttl_s}),
            |b| {
                check_user(b.user, "user").map_err(|e| e.message)?;
                if b.ttl_s == 0 || b.ttl_s > TOKEN_TTL_S_MAX {
                    return Err("ttl_s out of range".into());
                }
                Ok(())
            },
        ),
    }
}

fn parsed<T: DeserializeOwned>(
    bytes: &[u8],
    fields: impl Fn(&T) -> Value,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<Parsed, ApiError> {
    let body = parse_json::<T>(bytes)?;
    Ok(Parsed { fields: fields(&body), checked: check(&body) })
}
