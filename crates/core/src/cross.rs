//! What one SET tells another about money and notices: the messages of the
//! cross-SET outbox (written on the packet's SET in the commit that decided
//! them) and inbox (applied once on the user's SET).
//!
//! A user homed on SET B who opens a packet of SET A is paid on A into
//! `Account::transit(B)` (what A owes B), and A's outbox gets a `Credit` for
//! them; B applies it once, from `Account::transit(A)` to the user. A send on
//! A to users homed on B stores each of them a `Notice` (their
//! `packet_received` push, as stored bytes) the same way. The transport
//! between SETs delivers at least once; the key (`CrossKey`) makes the
//! applying exactly once.
//!
//! Plain data with serde derives (the transport's wire form): no I/O here.

use serde::{Deserialize, Serialize};

use crate::campaign::CampaignSpec;
use crate::sets::SetId;
use crate::{PacketId, UserId};

/// What a cross-SET message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrossKind {
    /// A share of a packet, for a user homed on the receiving SET.
    Credit,
    /// A packet's `packet_received` notice for such a user.
    Notice,
    /// A campaign's home SET funds the receiving SET's part: the part's
    /// budget and spec. Key: `packet` = the campaign, `user` = the receiving
    /// SET (one campaign funds every other SET, and the outbox key must be
    /// unique on the home SET; the funder travels in the spec).
    Fund,
    /// A campaign part's unreleased budget back to the funder on the
    /// campaign's home SET, when the part stops or finishes. Key: `packet` =
    /// the campaign, `user` = the funder.
    Refund,
}

impl CrossKind {
    pub const ALL: [CrossKind; 4] = [CrossKind::Credit, CrossKind::Notice, CrossKind::Fund, CrossKind::Refund];

    /// The name stored in the outbox and inbox rows, and the metrics' `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            CrossKind::Credit => "credit",
            CrossKind::Notice => "notice",
            CrossKind::Fund => "fund",
            CrossKind::Refund => "refund",
        }
    }

    /// True for the kinds that move money (through the transit accounts).
    pub fn moves_money(self) -> bool {
        !matches!(self, CrossKind::Notice)
    }

    pub fn parse(s: &str) -> Option<CrossKind> {
        CrossKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A message's identity: at most one message per key is ever made (the
/// outbox's unique key is `(kind, packet, user)` on the sending SET), and
/// the receiving SET applies each key at most once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CrossKey {
    /// The SET that wrote the message (the packet's).
    pub from: SetId,
    pub kind: CrossKind,
    pub packet: PacketId,
    pub user: UserId,
}

/// `<from>.<kind>.<packet>.<user>`: the key as a broker's message id.
impl std::fmt::Display for CrossKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}.{}", self.from, self.kind.as_str(), self.packet, self.user)
    }
}

/// One outbox row as it travels from SET `from` to SET `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrossMessage {
    pub from: SetId,
    pub to: SetId,
    pub packet: PacketId,
    /// Homed on `to`.
    pub user: UserId,
    /// Wall-clock ms of the commit on `from` that made it (the lag is
    /// measured from here to its applying on `to`).
    pub created_ms: u64,
    pub body: CrossBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrossBody {
    /// The user's share of `packet`, fen.
    Credit { amount_fen: i64 },
    /// The `packet_received` push body as stored for messages (postcard
    /// bytes of `hongbao_proto::PushBody`, opaque here).
    Notice { body: Vec<u8> },
    /// A campaign part's spec (its budget is `spec.total_fen`, the money
    /// moved), for the receiving SET to create and fund.
    Fund { spec: CampaignSpec },
    /// A campaign part's unreleased money, fen, back to the funder.
    Refund { amount_fen: i64 },
}

impl CrossMessage {
    pub fn kind(&self) -> CrossKind {
        match self.body {
            CrossBody::Credit { .. } => CrossKind::Credit,
            CrossBody::Notice { .. } => CrossKind::Notice,
            CrossBody::Fund { .. } => CrossKind::Fund,
            CrossBody::Refund { .. } => CrossKind::Refund,
        }
    }

    pub fn key(&self) -> CrossKey {
        CrossKey { from: self.from, kind: self.kind(), packet: self.packet, user: self.user }
    }

    /// The money it moves: a credit's, a fund's or a refund's amount, 0
    /// for a notice.
    pub fn amount_fen(&self) -> i64 {
        match &self.body {
            CrossBody::Credit { amount_fen } | CrossBody::Refund { amount_fen } => *amount_fen,
            CrossBody::Fund { spec } => spec.total_fen,
            CrossBody::Notice { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_a_message_names_its_key() {
        for kind in CrossKind::ALL {
            assert_eq!(CrossKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(CrossKind::parse("debit"), None);
        let msg = CrossMessage {
            from: 0,
            to: 1,
            packet: crate::ids::make_packet_id(0, 2, 9),
            user: 7,
            created_ms: 5,
            body: CrossBody::Credit { amount_fen: 42 },
        };
        assert_eq!(msg.key(), CrossKey { from: 0, kind: CrossKind::Credit, packet: msg.packet, user: 7 });
        assert_eq!(msg.amount_fen(), 42);
        let notice = CrossMessage { body: CrossBody::Notice { body: vec![1, 2] }, ..msg };
        assert_eq!((notice.kind(), notice.amount_fen()), (CrossKind::Notice, 0));
    }
}
