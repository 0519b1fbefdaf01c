//! The client protocol: every message a client and the server exchange, and
//! the binary frame codec.
//!
//! Owns: message types (`ClientFrame`, `Request`, `ServerFrame`, `Reply`,
//! `Push`, `ErrorCode`) and the binary encoding (a 4-byte big-endian length,
//! then the postcard encoding of the message). The same types serialise to
//! JSON for WebSocket text frames; that mapping lives in the gateway.
//!
//! Must not: do I/O, know about shards or storage. A frame is checked against
//! `FRAME_BYTES_MAX` from its header before anything is allocated for its body.

use serde::{Deserialize, Serialize};

pub use hongbao_core::limits::FRAME_BYTES_MAX;
pub use hongbao_core::packet::GrabState;
pub use hongbao_core::split::SplitKind;

/// Protocol version announced in `Welcome`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Bytes of the binary frame header (body length, u32 big-endian).
pub const FRAME_HEADER_BYTES: usize = 4;

/// One message from a client. `id` is chosen by the client and echoed in the
/// reply; pushes carry no id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    pub id: u64,
    pub req: Request,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Must be the first request of a connection.
    Hello {
        token: String,
    },
    /// Heartbeat; any request also counts as activity.
    Ping,
    /// "Is there a packet for me now?" `campaign` = 0 means any running one.
    /// `key` makes a retry return the win it got the first time.
    Shake {
        campaign: u64,
        key: Option<String>,
    },
    /// Fund a group packet from the caller's balance.
    Send {
        amount_fen: i64,
        count: u32,
        kind: SplitKind,
        to: Target,
        greeting: String,
        key: String,
    },
    /// Cheap check: can I still open this packet?
    Grab {
        packet: u64,
    },
    /// Take one share (idempotent per user and packet).
    Open {
        packet: u64,
    },
    /// Every claim of a packet.
    Detail {
        packet: u64,
    },
    Balance,
    /// The client has a persistent push message; it is deleted.
    Ack {
        msg: u64,
    },
}

/// Number of `Request` variants; binary op codes are `0..REQUEST_OPS`.
pub const REQUEST_OPS: u32 = 9;

/// Recipients of a packet.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    // `Id`: the range the engine checks.
    #[cfg_attr(feature = "openapi", schema(value_type = hongbao_core::openapi::Id))]
    Group(u64),
    /// At most 500 (`PACKET_RECIPIENTS_MAX`).
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<hongbao_core::openapi::Id>))]
    Users(Vec<u64>),
    /// An exclusive packet for one user.
    #[cfg_attr(feature = "openapi", schema(value_type = hongbao_core::openapi::Id))]
    User(u64),
}

/// One message from the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerFrame {
    Reply {
        id: u64,
        reply: Reply,
    },
    Push(Push),
    /// The server is closing this connection, and why.
    Close {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Welcome {
        user: u64,
        protocol: u32,
        heartbeat_s: u32,
        server_time_ms: u64,
    },
    Pong,
    Shake(ShakeResult),
    Sent {
        packet: u64,
        amount_fen: i64,
        count: u32,
        expires_ms: u64,
        repeat: bool,
    },
    Grab {
        packet: u64,
        state: GrabState,
    },
    Opened {
        packet: u64,
        amount_fen: i64,
        repeat: bool,
        finished: bool,
    },
    Detail(PacketDetail),
    Balance {
        balance_fen: i64,
    },
    Acked {
        msg: u64,
    },
    /// The request failed; the connection stays open.
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShakeResult {
    Won { campaign: u64, packet: u64, amount_fen: i64 },
    None,
    Overload,
    NotRunning,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketDetail {
    pub packet: u64,
    pub sender: u64,
    pub kind: SplitKind,
    pub amount_fen: i64,
    pub count: u32,
    pub remaining_fen: i64,
    pub refunded_fen: i64,
    /// `open`, `finished` or `refunded`.
    #[cfg_attr(feature = "openapi", schema(value_type = hongbao_core::packet::PacketStatus))]
    pub status: String,
    pub greeting: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub best_luck: Option<u64>,
    pub claims: Vec<ClaimInfo>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimInfo {
    pub user: u64,
    pub amount_fen: i64,
    pub at_ms: u64,
}

/// A server-initiated message. `msg` is non-zero for persistent messages,
/// which are kept until the client sends `Ack { msg }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub msg: u64,
    pub body: PushBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushBody {
    /// A packet addressed to you (or your group) was sent.
    PacketReceived { packet: u64, sender: u64, amount_fen: i64, count: u32, kind: SplitKind, greeting: String },
    /// Someone opened your packet (to the sender).
    PacketOpened { packet: u64, user: u64, amount_fen: i64, remaining_count: u32 },
    /// All shares are gone (to the sender).
    PacketFinished { packet: u64, best_luck: u64 },
    /// Your expired packet's remainder came back (to the sender).
    PacketRefunded { packet: u64, amount_fen: i64 },
    /// An operator message.
    Notice { topic: String, text: String },
}

/// Every error a client can see. Stable snake_case names on the wire.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded (fatal).
    Malformed,
    /// The frame is larger than `FRAME_BYTES_MAX` (fatal).
    FrameTooLarge,
    /// The request names an operation this server does not know (fatal).
    UnknownOp,
    /// The first request was not `hello`, or a second `hello` came (fatal).
    HelloRequired,
    /// The token's signature is wrong or it is not a token (fatal).
    BadToken,
    /// The token has expired (fatal).
    TokenExpired,
    /// No request within the idle timeout (fatal).
    IdleTimeout,
    /// The connection could not keep up with its replies and pushes (fatal).
    SlowConsumer,
    /// The server is shutting down (fatal).
    ShuttingDown,
    /// A field is out of range or inconsistent; the message says which.
    InvalidRequest,
    InsufficientFunds,
    NotFound,
    NotEligible,
    Finished,
    Expired,
    /// Same idempotency key, different request.
    KeyConflict,
    /// Too many requests in flight on this connection, or a queue is full: retry later.
    Overload,
    Internal,
    /// Storage cannot commit right now (disk full, database locked or
    /// unreachable): nothing was done; retry later with the same key.
    Unavailable,
    /// This user sends faster than allowed, or too many of its notices are
    /// still undelivered: retry later.
    RateLimited,
}

impl ErrorCode {
    /// Errors after which the server closes the connection.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::Malformed
                | ErrorCode::FrameTooLarge
                | ErrorCode::UnknownOp
                | ErrorCode::HelloRequired
                | ErrorCode::BadToken
                | ErrorCode::TokenExpired
                | ErrorCode::IdleTimeout
                | ErrorCode::SlowConsumer
                | ErrorCode::ShuttingDown
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InsufficientFunds => "insufficient_funds",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotEligible => "not_eligible",
            ErrorCode::Finished => "finished",
            ErrorCode::Expired => "expired",
            ErrorCode::KeyConflict => "key_conflict",
            ErrorCode::Overload => "overload",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

impl Reply {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error { code, message: message.into() }
    }

    /// The answer to `req` when the server sheds it: a shake gets its own
    /// result (`ShakeResult::Overload`), anything else an `overload` error.
    pub fn overload(req: &Request, message: impl Into<String>) -> Reply {
        match req {
            Request::Shake { .. } => Reply::Shake(ShakeResult::Overload),
            _ => Reply::error(ErrorCode::Overload, message),
        }
    }
}

impl Request {
    /// The operation name used in metrics and logs.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Ping => "ping",
            Request::Shake { .. } => "shake",
            Request::Send { .. } => "send",
            Request::Grab { .. } => "grab",
            Request::Open { .. } => "open",
            Request::Detail { .. } => "detail",
            Request::Balance => "balance",
            Request::Ack { .. } => "ack",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown operation")]
    UnknownOp,
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownOp => ErrorCode::UnknownOp,
            DecodeError::Malformed(_) => ErrorCode::Malformed,
        }
    }
}

/// Binary framing: `[u32 BE body length][postcard body]`.
pub mod binary {
    use super::*;

    /// Reads a frame header. `Ok(None)` means more bytes are needed; an
    /// oversized length is rejected before any body byte is read or allocated.
    pub fn body_len(header: &[u8]) -> Result<Option<usize>, DecodeError> {
        let Some(h) = header.get(..FRAME_HEADER_BYTES) else { return Ok(None) };
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(DecodeError::TooLarge { len, max: FRAME_BYTES_MAX });
        }
        Ok(Some(len))
    }

    fn finish(mut out: Vec<u8>) -> Vec<u8> {
        let len = (out.len() - FRAME_HEADER_BYTES) as u32;
        out[..FRAME_HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// Encodes a whole frame (header included).
    pub fn encode_client(frame: &ClientFrame) -> Vec<u8> {
        frame_with_header(frame)
    }
    pub fn encode_server(frame: &ServerFrame) -> Vec<u8> {
        frame_with_header(frame)
    }

    fn frame_with_header<T: Serialize>(msg: &T) -> Vec<u8> {
        let out = postcard::to_extend(msg, vec![0u8; FRAME_HEADER_BYTES]).expect("messages always serialise");
        finish(out)
    }

    /// Decodes a frame body (without its header).
    pub fn decode_client(body: &[u8]) -> Result<ClientFrame, DecodeError> {
        // Tell an unknown operation (a variant index past the last request)
        // from a malformed frame: postcard reports both as a serde error.
        if let Ok((_, rest)) = postcard::take_from_bytes::<u64>(body) {
            if let Ok((op, _)) = postcard::take_from_bytes::<u32>(rest) {
                if op >= REQUEST_OPS {
                    return Err(DecodeError::UnknownOp);
                }
            }
        }
        decode(body)
    }
    pub fn decode_server(body: &[u8]) -> Result<ServerFrame, DecodeError> {
        decode(body)
    }

    fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, DecodeError> {
        if body.len() > FRAME_BYTES_MAX {
            return Err(DecodeError::TooLarge { len: body.len(), max: FRAME_BYTES_MAX });
        }
        match postcard::from_bytes::<T>(body) {
            Ok(v) => Ok(v),
            Err(postcard::Error::DeserializeBadEnum) => Err(DecodeError::UnknownOp),
            Err(e) => Err(DecodeError::Malformed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_round_trip() {
        let f = ClientFrame {
            id: 7,
            req: Request::Send {
                amount_fen: 100,
                count: 3,
                kind: SplitKind::Lucky,
                to: Target::Group(9),
                greeting: "恭喜发财".into(),
                key: "k1".into(),
            },
        };
        let bytes = binary::encode_client(&f);
        let len = binary::body_len(&bytes).unwrap().unwrap();
        assert_eq!(len, bytes.len() - FRAME_HEADER_BYTES);
        assert_eq!(binary::decode_client(&bytes[FRAME_HEADER_BYTES..]).unwrap(), f);
    }

    #[test]
    fn request_ops_counts_every_variant() {
        let bytes = binary::encode_client(&ClientFrame { id: 0, req: Request::Ack { msg: 0 } });
        assert_eq!(bytes[FRAME_HEADER_BYTES + 1] as u32, REQUEST_OPS - 1, "Ack must stay the last op");
    }

    #[test]
    fn oversized_header_is_rejected_before_the_body() {
        let header = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        assert!(matches!(binary::body_len(&header), Err(DecodeError::TooLarge { .. })));
        assert_eq!(binary::body_len(&header[..2]), Ok(None));
    }

    #[test]
    fn unknown_operation_and_truncation_are_told_apart() {
        // id = 1, then variant index 99: no such request.
        assert_eq!(binary::decode_client(&[1, 99]), Err(DecodeError::UnknownOp));
        let bytes = binary::encode_client(&ClientFrame { id: 1, req: Request::Open { packet: 1 << 41 } });
        let body = &bytes[FRAME_HEADER_BYTES..bytes.len() - 1];
        assert!(matches!(binary::decode_client(body), Err(DecodeError::Malformed(_))));
    }
}
